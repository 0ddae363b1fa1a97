"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import time
from pathlib import Path
from typing import Iterator

# `atomic_path`'s temporary name for a target NAME: .NAME.<12 hex digits>.tmp
_TOKEN = re.compile(r"[0-9a-f]{12}")


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yields a temporary path beside `target`; on success it replaces `target` in one rename.

    The temporary file is created with mode 0666 minus the umask, like a plain `open(..., "w")`,
    so the result has the permissions the user expects.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = tmp.stat().st_mode
    try:
        yield tmp
        # some writers (safetensors) replace the file with a private one; restore the mode
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def stale_temporaries(target: Path, older_than: float = 0.0) -> list[Path]:
    """The temporary files `atomic_path` left beside `target` (a process killed before its rename)
    that nothing has touched for `older_than` seconds. With 0, the caller must know that no other
    process is writing `target` (it holds a lock for it)."""
    target = Path(target)
    prefix = f".{target.name}."
    found = []
    for path in sorted(target.parent.glob(glob.escape(prefix) + "*.tmp")):
        token = path.name[len(prefix):-len(".tmp")]
        try:
            if _TOKEN.fullmatch(token) and time.time() - path.stat().st_mtime >= older_than:
                found.append(path)
        except FileNotFoundError:  # its writer finished or cleaned up meanwhile
            continue
    return found


def remove_stale(target: Path, older_than: float = 0.0) -> list[Path]:
    """Removes `stale_temporaries(target, older_than)`; returns them."""
    removed = stale_temporaries(target, older_than)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
