import os

import pytest

from agent.atomic import atomic_path, remove_stale


def test_success_replaces_the_target_with_the_umask_mode(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        os.chmod(tmp, 0o600)  # as a writer that recreates the file privately would
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_write_text_creates_the_folder_and_replaces_whole(tmp_path):
    from agent.atomic import write_text

    target = tmp_path / "new" / "report.md"
    write_text(target, "first")
    write_text(target, "second")
    assert target.read_text() == "second" and [p.name for p in target.parent.iterdir()] == ["report.md"]


def test_remove_stale_takes_only_what_a_killed_writer_of_that_target_left(tmp_path):
    target = tmp_path / "a [1].protected.jpg"
    left = tmp_path / ".a [1].protected.jpg.0123456789ab.tmp"  # a run killed before its rename
    fresh = tmp_path / ".a [1].protected.jpg.ba9876543210.tmp"  # a writer still at work
    others = [tmp_path / ".a [1].protected.jpg.notours.tmp", tmp_path / ".b.protected.jpg.0123456789ab.tmp",
              tmp_path / "a [1].protected.jpg.0123456789ab.tmp"]
    for path in (left, fresh, *others):
        path.write_bytes(b"")
    os.utime(left, (1, 1))
    assert remove_stale(target, older_than=60) == [left]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (fresh, *others))
    assert remove_stale(target) == [fresh]  # the caller holds the target's lock: all of them
