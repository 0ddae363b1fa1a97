"""The everyday `agent` commands end to end: typer's runner for every command and failure mode, and
one run of the installed `agent` in real processes (init → protect a folder → log verify → recover)."""

import fcntl
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE
from PIL import Image
from typer.testing import CliRunner

from agent import keys as keystore
from agent import store as db

from agent.cli import app
from agent.images import image_psnr
from agent.images import read_image
from agent.pipeline import working_copy
from agent.service import home as service_home
from agent.service.home import CRASH_ENV
from agent.service.log import log_records, verify_log
from agent.service.users import init_user

PW = "correct horse"
runner = CliRunner()


def crop(x: int = 0, y: int = 0, w: int = 160, h: int = 120) -> Image.Image:
    with Image.open(SAMPLE) as image:
        return image.convert("RGB").crop((x, y, x + w, y + h))


def make_photos(folder: Path) -> dict[Path, str]:
    """A PNG and a JPEG (EXIF orientation 6) crop of the sample; returns their SHA-256."""
    folder.mkdir(parents=True)
    crop().save(folder / "park.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    crop(150, 80).save(folder / "street.jpg", quality=92, exif=exif.tobytes())
    return {p: sha(p) for p in folder.iterdir()}


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """$AGENT_HOME in tmp_path and the passphrase in the environment; new key files use scrypt's
    2**14 (init reads keys.KDF_N when it runs) so that each unlock is fast."""
    monkeypatch.setattr(keystore, "KDF_N", 2**14)
    monkeypatch.setattr(service_home, "LOCK_WAIT", 0.1)
    values = {"AGENT_HOME": str(tmp_path / "home"), "AGENT_PASSPHRASE": PW}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def agent(env: dict, *args, **overrides):
    return runner.invoke(app, [str(a) for a in args], env={**env, **overrides})


def test_init_protect_log_verify_recover_with_the_runner(env, tmp_path):
    photos = tmp_path / "photos"
    before = make_photos(photos)
    result = agent(env, "init")
    assert result.exit_code == 0, result.output
    assert "created user default" in result.output
    users = json.loads(agent(env, "users", "list", "--json").stdout)
    assert [(u["user"], u["records"]) for u in users] == [("default", 0)]

    result = agent(env, "protect", photos, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    protected = {Path(r["source"]).name: r for r in json.loads(result.stdout)}
    assert {name: Path(r["output"]).name for name, r in protected.items()} == {
        "park.png": "park.protected.png", "street.jpg": "street.protected.jpg"}
    for name, size, fmt in (("park.png", (160, 120), "PNG"), ("street.jpg", (120, 160), "JPEG")):
        with Image.open(protected[name]["output"]) as image:
            assert (image.format, image.size) == (fmt, size)  # working size, the right way up

    listing = json.loads(agent(env, "log", "--json").stdout)
    assert sorted(r["file_name"] for r in listing["records"]) == ["park.png", "street.jpg"]
    assert {r["id"] for r in listing["records"]} == {r["record_id"] for r in protected.values()}
    assert json.loads(agent(env, "log", "--json", "--since", "2999-01-01").stdout)["records"] == []
    result = agent(env, "log", "verify")
    assert result.exit_code == 0 and "the chains verify" in result.output

    result = agent(env, "recover", protected["street.jpg"]["output"], "-o", tmp_path / "rec", "--json")
    assert result.exit_code == 0, result.output
    [recovered] = json.loads(result.stdout)
    assert recovered["matched_by"] == "sha256" and recovered["user"] == "default"
    working = working_copy(read_image(photos / "street.jpg"))
    out = read_image(recovered["output"])
    assert out.shape == working.shape
    # issue 4's target for JPEG outputs (written at the original's quality, 92)
    assert image_psnr(out, working) >= 38
    copy = tmp_path / "copy.jpg"  # what a platform keeps: the PNG recompressed
    with Image.open(protected["park.png"]["output"]) as image:
        image.save(copy, quality=88)
    result = agent(env, "recover", copy, "--json")
    assert result.exit_code == 0, result.output
    [found] = json.loads(result.stdout)
    assert found["matched_by"] == "phash" and found["record_id"] == protected["park.png"]["record_id"]

    result = agent(env, "check", protected["park.png"]["output"])
    assert result.exit_code == 0 and "protected by user default" in result.output
    assert "self-check, platform views fooled:" in result.output and "this copy:" in result.output

    # tampering: one record's PSNR changed in the database
    target = protected["park.png"]["record_id"]
    with sqlite3.connect(db.database_path(Path(env["AGENT_HOME"]))) as connection:
        connection.execute("UPDATE protections SET psnr = 50.0 WHERE id = ?", (target,))
    result = agent(env, "log", "verify")
    assert result.exit_code == 1 and f"altered: user 'default' #1 record {target}" in result.output
    report = json.loads(agent(env, "log", "verify", "--json").stdout)
    assert [p["record_id"] for p in report["problems"]] == [target]
    # and every command that uses the record refuses it, naming it
    result = agent(env, "check", protected["park.png"]["output"])
    assert result.exit_code == 2 and f"record {target} does not verify" in result.output
    result = agent(env, "recover", protected["park.png"]["output"], "--overwrite")
    assert result.exit_code == 2 and f"record {target}" in result.output and "does not verify" in result.output
    result = agent(env, "log")
    assert result.exit_code == 0 and "ALTERED" in result.output and f"record {target}" in result.output
    listed = json.loads(agent(env, "log", "--json").stdout)
    assert {r["id"]: r["verifies"] for r in listed["records"]}[target] is False
    assert {p: sha(p) for p in before} == before  # the originals were never written


def test_users_and_keys_commands(env, tmp_path):
    assert agent(env, "init", "--user", "alice").exit_code == 0
    secret = tmp_path / "bob.pass"
    secret.write_text("bob's words\n")
    result = agent(env, "users", "add", "bob", "--passphrase-file", secret)
    assert result.exit_code == 0, result.output
    shown = json.loads(agent(env, "keys", "show", "--user", "bob", "--json").stdout)
    assert shown["user"] == "bob" and len(shown["rgan_keys"]) == 1
    result = agent(env, "keys", "rotate", "--user", "bob", "--passphrase-file", secret)
    assert result.exit_code == 0, result.output
    rotated = json.loads(agent(env, "keys", "show", "--user", "bob", "--json").stdout)
    assert len(rotated["rgan_keys"]) == 2 and rotated["active_key_id"] != shown["active_key_id"]

    fresh = tmp_path / "fresh.pass"
    fresh.write_text("fresh words")
    result = agent(env, "keys", "change-passphrase", "--user", "bob", "--passphrase-file", secret,
                   "--new-passphrase-file", fresh)
    assert result.exit_code == 0, result.output
    keystore.unlock(Path(env["AGENT_HOME"]) / "keys", "bob", "fresh words")

    backup = tmp_path / "bob.backup"
    result = agent(env, "keys", "export", backup, "--user", "bob", "--passphrase-file", fresh,
                   "--backup-passphrase-file", secret)
    assert result.exit_code == 0 and backup.is_file(), result.output
    result = agent(env, "keys", "import", backup, "--as", "carol", "--backup-passphrase-file", secret)
    assert result.exit_code == 0, result.output
    assert [u["user"] for u in json.loads(agent(env, "users", "list", "--json").stdout)] == ["alice", "bob", "carol"]

    result = agent(env, "users", "remove", "carol")
    assert result.exit_code == 2 and "--yes" in result.output
    result = agent(env, "users", "remove", "carol", "--yes")
    assert result.exit_code == 0, result.output
    # several users and none called default: commands ask which
    result = agent(env, "keys", "show")
    assert result.exit_code == 2 and "several users" in result.output


@pytest.mark.parametrize("case", ["wrong passphrase", "no passphrase", "missing file", "not an image",
                                  "unknown user", "unwritable output", "second process", "locked log",
                                  "not initialised",
                                  "bad --since", "bad --max-side", "bad --strength"])
def test_bad_input_gets_one_clear_line_and_exit_2(env, tmp_path, monkeypatch, case):
    photos = tmp_path / "photos"
    make_photos(photos)
    if case != "not initialised":
        assert agent(env, "init").exit_code == 0
    overrides = {}
    args: list = ["protect", photos / "park.png"]
    expected = ""
    if case == "wrong passphrase":
        overrides, expected = {"AGENT_PASSPHRASE": "not it"}, "wrong passphrase for user 'default'"
    elif case == "no passphrase":
        overrides, expected = {"AGENT_PASSPHRASE": None}, "no passphrase: set AGENT_PASSPHRASE or pass --passphrase-file"
    elif case == "missing file":
        args, expected = ["protect", photos / "gone.jpg"], "gone.jpg: no such file"
    elif case == "not an image":
        (photos / "fake.png").write_text("hello")
        args, expected = ["protect", photos / "fake.png"], "fake.png: not an image"
    elif case == "unknown user":
        args, expected = ["protect", photos / "park.png", "--user", "zed"], "unknown user 'zed'"
    elif case == "unwritable output":
        (tmp_path / "file").write_text("")
        args, expected = ["protect", photos / "park.png", "-o", tmp_path / "file" / "out"], "is not a folder"
    elif case == "not initialised":
        args, expected = ["log"], "run `agent init` first"
    elif case == "bad --since":
        args, expected = ["log", "--since", "yesterday"], "not an ISO date"
    elif case == "bad --max-side":
        args, expected = ["protect", photos / "park.png", "--max-side", "8"], "--max-side"
    elif case == "bad --strength":
        args, expected = ["protect", photos / "park.png", "--strength", "max"], "--strength must be one of low, medium"
    if case == "second process":
        expected = "another agent process"
        with open(Path(env["AGENT_HOME"]) / service_home.LOCK_NAME, "a+") as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            result = agent(env, *args, **overrides)
    elif case == "locked log":  # something other than an agent holds SQLite's write lock
        monkeypatch.setattr(service_home, "DB_TIMEOUT", 0.2)
        expected = "the provenance database is locked by another process"
        other = sqlite3.connect(db.database_path(Path(env["AGENT_HOME"])), isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            result = agent(env, *args, **overrides)
        finally:
            other.close()
    else:
        result = agent(env, *args, **overrides)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert "Traceback" not in result.output
    assert not list(photos.glob("*.protected.*"))


def test_a_batch_does_the_good_files_and_exits_2_for_the_bad(env, tmp_path):
    photos = tmp_path / "photos"
    make_photos(photos)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert agent(env, "init").exit_code == 0
    result = agent(env, "protect", photos)
    assert result.exit_code == 2
    assert "broken.jpg: not an image" in result.output
    assert sorted(p.name for p in photos.glob("*.protected.*")) == ["park.protected.png", "street.protected.jpg"]
    stranger = tmp_path / "stranger.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(stranger)
    result = agent(env, "recover", stranger)
    assert result.exit_code == 2 and "no record of this image" in result.output and "--user" in result.output
    result = agent(env, "recover", stranger, "--user", "default")  # no record: a guess is never reported ok
    assert result.exit_code == 2 and "--force" in result.output and not (tmp_path / "stranger.recovered.png").exists()
    result = agent(env, "recover", stranger, "--user", "default", "--force")
    assert result.exit_code == 0 and (tmp_path / "stranger.recovered.png").is_file()


def test_the_installed_agent_in_real_processes(tmp_path):
    """init → protect a folder → log verify → recover, each a real `agent` process with the real
    scrypt cost, as a person (or a script) runs them."""
    executable = Path(sys.executable).with_name("agent")
    if not executable.is_file():
        pytest.skip("the `agent` script is not installed in this environment")
    photos = tmp_path / "photos"
    before = make_photos(photos)
    env = {**os.environ, "AGENT_HOME": str(tmp_path / "home"), "AGENT_PASSPHRASE": PW, "COLUMNS": "200"}

    def run(*args):
        done = subprocess.run([str(executable), *map(str, args)], env=env, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    run("init")
    protected = {Path(r["source"]).name: r for r in json.loads(run("protect", photos, "--json").stdout)}
    assert set(protected) == {"park.png", "street.jpg"}
    assert "the chains verify" in run("log", "verify").stdout
    outputs = [protected["park.png"]["output"], protected["street.jpg"]["output"]]
    recovered = json.loads(run("recover", *outputs, "-o", tmp_path / "rec", "--json").stdout)
    assert [r["matched_by"] for r in recovered] == ["sha256", "sha256"]
    for (name, target), r in zip((("park.png", 45), ("street.jpg", 38)), recovered):  # issue 4's targets
        working = working_copy(read_image(photos / name))
        out = read_image(r["output"])
        assert out.shape == working.shape
        # recovery reaches the target and undoes the protection (at least 1 dB above the protected file)
        assert image_psnr(out, working) >= max(target, protected[name]["psnr"] + 1)
    assert {p: sha(p) for p in before} == before


@pytest.mark.parametrize("point", ["read", "temp", "commit", "rename"])
def test_a_kill_at_any_step_of_a_protection_leaves_a_consistent_home_and_a_rerun_finishes(env, tmp_path, point):
    """Issue 18's kill -9 sweep: `agent protect` killed (SIGKILL, from a hook in the code, not by
    timing) after reading, after the temporary file, after the commit and after the rename."""
    photos = tmp_path / "photos"
    make_photos(photos)
    home = Path(env["AGENT_HOME"])
    init_user(home, "default", PW, kdf_n=2**14)
    crashed = subprocess.run([sys.executable, "-c", "from agent.cli import app; app()", "protect", str(photos)],
                             env={**os.environ, **env, CRASH_ENV: point}, capture_output=True, text=True,
                             timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr

    def consistent() -> set[str]:
        with sqlite3.connect(db.database_path(home)) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert verify_log(home).ok
        recorded = {r.protected_sha256 for r in log_records(home).records}
        outputs = sorted(p for p in photos.glob("*.protected.*") if not p.name.startswith("."))
        assert all(sha(output) in recorded for output in outputs), "an output without its record"
        return {output.name for output in outputs}

    assert consistent() == ({"park.protected.png"} if point == "rename" else set())
    # the next protection of any batch settles what the killed one left pending
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    crop(40, 40).save(elsewhere / "other.png")
    assert agent(env, "protect", elsewhere).exit_code == 0
    assert consistent() == ({"park.protected.png"} if point in ("commit", "rename") else set())
    assert not list((home / "pending").iterdir())
    result = agent(env, "protect", photos, "--json")
    assert result.exit_code == 0, result.output
    rerun = {Path(r["source"]).name: r for r in json.loads(result.stdout)}
    assert consistent() == {"park.protected.png", "street.protected.jpg"}
    assert not [p.name for p in photos.iterdir() if p.name.startswith(".")], "a temporary file was left"
    # what the killed run had committed is finished, not protected twice
    assert rerun["park.png"]["skipped"] is (point in ("commit", "rename"))
    assert len(log_records(home).records) == 3
