"""The agent's home: the folder that holds its state, the lock a writing process holds on it, its
provenance log, its users and their keys, the outputs written beside the user's photos, and the
errors the service reports. Every service function takes the home explicitly (the CLI passes
`agent_home()`). It holds:

    keys/<user>.key         the key store (agent/keys.py, keys/README.md)
    provenance.sqlite3      the signed provenance log (agent/store/, records/README.md)
    models/<user>/          each user's own models, encrypted (service/models.py)
    agent.lock              the lock a writing agent process holds (see `home_lock`)
    pending/                protections committed but perhaps not yet in place (service/protect.py)

Errors a person can act on are `ServiceError`, `keys.KeyStoreError`, `store.ProvenanceError`
or `images.ImageError` (all in `USER_ERRORS`), each with a one-line message that names the file or
user and says what to do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select

from .. import keys as keystore
from .. import store as db
from ..atomic import atomic_path, remove_stale
from ..images import ImageError
from ..keys import KeyStoreError, UserKeys
from ..store import ProvenanceError

HOME_ENV = "AGENT_HOME"
DEFAULT_USER = "default"
LOCK_NAME = "agent.lock"
# how long a writing process tries to take the home's lock before saying another one holds it
LOCK_WAIT = 1.0
# how long a write waits for SQLite's own lock (held by something other than an agent process,
# e.g. a `sqlite3` shell) before giving up with a DatabaseLockedError
DB_TIMEOUT = 10.0
# a temporary output file untouched this long was left by a killed run (a write takes seconds)
STALE_AFTER = 300.0
# tests kill the agent at a named point of a protection with this set (`crash_point`)
CRASH_ENV = "AGENT_TEST_CRASH_AT"


class ServiceError(Exception):
    """A problem the user can act on; the message is one line that says what and what to do."""


class AgentBusyError(ServiceError):
    """Another agent process is writing to the same home."""


USER_ERRORS = (ServiceError, KeyStoreError, ProvenanceError, ImageError)


def agent_home() -> Path:
    """$AGENT_HOME, else the platform's per-user data directory + `rgan-agent`."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        xdg = os.environ.get("XDG_DATA_HOME", "")
        # the XDG spec says a relative value is invalid and must be ignored
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "rgan-agent"


@contextlib.contextmanager
def home_lock(home: Path, wait: float | None = None) -> Iterator[None]:
    """Held by every process that writes to `home` (keys, log, users), for as long as it writes.

    A second process gets an `AgentBusyError` after a short wait (`LOCK_WAIT`) rather than queueing
    behind a batch that may take minutes. POSIX only (`fcntl.flock`, released by the kernel when the
    process ends, even killed). Elsewhere (Windows) there is no such lock: SQLite's own locking
    still serialises appends to the log (a writer waits up to `DB_TIMEOUT`, then gets a
    `DatabaseLockedError`), and every key file and output is replaced atomically, so what is lost
    is only the early, clear message, not data.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    home = Path(home)
    path = home / LOCK_NAME
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        raise ServiceError(f"cannot open the lock file {path}: {error.strerror}") from None
    try:
        deadline = time.monotonic() + (LOCK_WAIT if wait is None else wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                    who = f" (process {holder})" if holder.isdigit() else ""
                    raise AgentBusyError(f"another agent process{who} is writing to {home}; wait for it to "
                                         f"finish and try again (lock file {path})") from None
                time.sleep(0.05)
            except OSError as error:  # e.g. ENOLCK on a network file system without locks
                raise ServiceError(f"cannot lock {path}: {error.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def database(home: Path, *, create: bool = False) -> Iterator[Any]:
    """The log's session factory, disposed of afterwards. Reading functions refuse a home without
    a log (`create=False`) instead of creating an empty one."""
    path = db.database_path(home)
    if not create and not path.exists():
        raise ServiceError(f"no provenance log in {home}: run `agent init` first")
    factory = db.open_database(path, timeout=DB_TIMEOUT)
    try:
        yield factory
    finally:
        factory.kw["bind"].dispose()


def key_store(home: Path) -> Path:
    return keystore.key_store(Path(home))


def resolve_user(home: Path, user: str | None = None) -> str:
    """`user` if it has a key file here; without one: `default` if it exists, else the only user."""
    users = keystore.list_users(key_store(home))
    if user is not None:
        keystore.check_user(user)
        if user not in users:
            known = f"users here: {', '.join(users)}" if users else "there are no users yet"
            raise ServiceError(f"unknown user {user!r} ({known}); create it with `agent users add {user}`")
        return user
    if not users:
        raise ServiceError(f"no user in {home}: run `agent init` first")
    if DEFAULT_USER in users:
        return DEFAULT_USER
    if len(users) == 1:
        return users[0]
    raise ServiceError(f"there are several users ({', '.join(users)}): say which with --user")



def logged_user(session, user: str) -> db.UserRow:
    """`user`'s row in the log, which a user with a key file here always has."""
    row = session.scalar(select(db.UserRow).where(db.UserRow.name == user))
    if row is None:
        raise ServiceError(f"the provenance log does not know user {user!r}, whose key file is here: the "
                           "log was replaced or reset; restore it from a backup")
    return row


def unlock(home: Path, user: str, passphrase: str) -> UserKeys:
    if not isinstance(passphrase, str) or not passphrase:
        raise ServiceError("no passphrase given")
    return keystore.unlock(key_store(home), user, passphrase)


# ---------------------------------------------------------------- outputs

def crash_point(name: str) -> None:
    """The kill -9 sweep of issue 18's tests kills the agent here when `CRASH_ENV` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def output(dst: Path, data: bytes, overwrite: bool) -> Iterator[None]:
    """Writes `data` to a temporary file beside `dst`, runs the body (which commits what must be
    committed first), then renames it to `dst`; without `overwrite`, refuses a file that appeared
    meanwhile. A failure before the rename leaves nothing."""
    try:
        with atomic_path(dst) as tmp:
            tmp.write_bytes(data)
            if not overwrite and dst.exists():
                raise ServiceError(f"{dst} already exists; pass --overwrite to replace it")
            yield
    except OSError as error:
        hint = " (is the folder read-only?)" if isinstance(error, PermissionError) else ""
        raise ServiceError(f"cannot write {dst}: {error.strerror or error}{hint}") from None


def write_output(dst: Path, data: bytes, overwrite: bool) -> None:
    """Atomically, as `output`; the temporary files a killed run left for the same output and
    nothing has touched for `STALE_AFTER` go first (no lock keeps other writers away here)."""
    remove_stale(dst, STALE_AFTER)
    with output(dst, data, overwrite):
        pass


def check_output(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.exists():
        if os.path.samefile(src, dst):
            raise ServiceError(f"{src}: the output would be the input itself; an original is never overwritten")
        if not overwrite:
            raise ServiceError(f"{dst} already exists; pass --overwrite to replace it")
    parent = dst.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ServiceError(f"cannot write {dst}: {parent} is not a folder")
