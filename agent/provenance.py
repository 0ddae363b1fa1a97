"""The provenance log: one signed record per protected image, in SQLite, as a hash chain per user.

Storage
-------
`open_database(path)` returns a session factory (SQLAlchemy 2 `sessionmaker`) on a SQLite file,
after applying the Alembic migrations in `migrations/` (beside the package) up to the newest one,
so every process sees the schema it expects; a database written by a newer agent is refused.
Every connection runs in WAL mode (readers never block the writer and vice versa) with
`foreign_keys=ON` and a busy timeout (`timeout`, 30 s by default): a second agent process waits for
the lock instead of failing, and one that waits longer gets a `DatabaseLockedError` that says so.
Transactions are real SQLite transactions (SQLAlchemy emits BEGIN itself; the sqlite3 module's
legacy mode would run SELECTs outside any transaction): reads begin DEFERRED, appends take the write
lock first (BEGIN IMMEDIATE), so two processes appending at once are serialised, never forked.

Tables: `users` (name, created, Ed25519 public key, the chain head as last written, see below,
and the active model, NULL for the shipped default), `keys` (public parts of the RGAN keys: key id,
user, created, active flag), `models` (name, SHA-256 of the weights, the user or NULL for the
shipped default, encrypted flag, created, the file under `$AGENT_HOME/models`, a JSON report),
`pairing_codes` and `tokens` (the local service's pairing, stored as SHA-256 only),
`protections` (the records) and `jobs` (background fine-tuning jobs, `agent/service/jobs.py`).

A record
--------
`id` (32 hex digits, random), `user`, `seq` (1, 2, 3, ... per user), `time` (UTC,
`2025-01-31T23:59:59.123456Z`), `source` (`cli` or `extension`), `file_name_enc` and `site_enc`
(the original file name and the site's origin, encrypted with the user's data key by
`keys.encrypt_data`, associated data `rgan-agent/provenance v1 NUL <field> NUL <record id> NUL
<user>`, so a ciphertext cannot be moved to another field, record or user; NULL when not given),
`original_sha256` / `protected_sha256` (hex SHA-256 of the files' bytes), `phash` (64-bit DCT
perceptual hash of the protected image, 16 hex digits, see below), `original_width/height`,
`working_width/height`, `model_id` and `model_sha256` (the weights the image was protected with),
`rgan_key_id`, `params` (a JSON object as canonical JSON text: strength, max_side, ..., the
pipeline's `ProtectInfo` under `protect_info`, and for the refine scheme, under `recovery`, the
base64 of `recovery.RecoveryData`'s bytes sealed like the file name, field name `recovery`),
`psnr` and `self_check_asr` (quality measured at
protect time, NULL when not measured), `prev_hash` (the `record_hash` of the user's previous record,
NULL for the first), `record_hash` and `signature`.

Canonical serialization (format `rgan-agent/provenance-record`, version 1)
-------------------------------------------------------------------------
The *body* is a JSON object holding every field above except `record_hash` and `signature`, plus
`"format": "rgan-agent/provenance-record"` and `"version": 1` (domain separation: the user's signing
key can never be tricked into a signature that also reads as something else). Values: strings as
they are; binary (the two ciphertexts) in standard base64 with padding; hashes in lowercase hex;
integers in decimal; `psnr` / `self_check_asr` as JSON numbers written the shortest way that reads
back to the same IEEE double (Python's `repr`; NaN and infinities are refused); absent values as
`null`; `params` as a *string* (its canonical JSON text), so the bytes signed are the bytes stored.
`canonical(obj)` = `json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)`
encoded as ASCII: keys sorted by code point, no whitespace, non-ASCII escaped as `\\uXXXX`.

    record_hash = hex(SHA-256(canonical(body)))
    signature   = Ed25519-sign(user's signing key, canonical(body + {"record_hash": record_hash}))

i.e. the signature covers every field except itself. tests/test_provenance.py pins both with a
known-answer vector (fixed body and key; Ed25519 is deterministic).

The chain: one per user
-----------------------
Each user's records form their own chain (`seq` 1, 2, ...; `prev_hash` links each to the one
before). Per user rather than global because the chain is what a user's signature vouches for:
each link is signed by the same key, a chain verifies with one public key and can be shown to
someone without anyone else's records, and no other user's records (or their removal) can break
it. What a global chain would add (noticing that a whole user vanished) is
covered by the same external anchor that truncation needs anyway (below).

`verify_chain` checks every record's hash and signature (with public keys the caller trusts; the
keys in the `users` table are used only where none is given, and the report says so, since whoever
can edit the database can replace them) and every link, and names:

* **altered**: a record whose content no longer matches its hash, or whose signature fails, while
  it sits in its place in the chain (raw UPDATE of any column, hash recomputed or not);
* **inserted**: a record that is not part of the user's signed chain: not signed by the user's
  key and in a place another (authentic) record already holds, or past the end of the chain, or
  referring to a user that does not exist;
* **removed**: sequence numbers missing from the chain (a record's signed `prev_hash` and `seq`
  point to records that are not there), from the middle or the start of a chain;
* **fork** (only the key holder can cause it): two authentic records claiming the same place;
* **key**: the `users` table holds another public key than the trusted one.

What cannot be detected without an external anchor: removal of the *newest* records of a chain
(truncation), or of a user's whole chain, or the replacement of the database by an older copy of
itself: what is left is a valid, shorter chain. `users.head_seq` / `head_hash`, updated with every
append, catch a careless truncation (reported as removed), but they are not signed and whoever
deletes rows can rewind them too. For a guarantee, keep `chain_head(session)` somewhere else after
appending (the user's key store, a printout, the extension's storage, a timestamping service) and
pass it back as `verify_chain(..., anchors=...)`: then any record at or before the anchor that is
missing or different is reported. At the very end of a chain, a record altered with its hash
recomputed looks exactly like a forged one appended: it is reported as inserted (with a note);
once the user appends after it, the next record links to it and it is reported as altered.
The `users`, `keys` and `models` tables are not signed themselves; what a record says about them
(user name, RGAN key id, model SHA-256) is.

Perceptual hash
---------------
`imagehash.phash` (DCT of a 32x32 grey thumbnail, the 8x8 lowest frequencies against their median:
64 bits) of the protected image after EXIF orientation. A platform's copy is found by Hamming
distance <= `PHASH_MAX_DISTANCE` (8). Measured on 400 photos (imagenet-sample and BSDS500), each
downscaled to 100/75/50/40/25 % and re-encoded as JPEG at quality 60-90: the distance to the
original's hash was at most 4 (99.5 % at most 2), while the closest two *different* photos among the
79,800 pairs were 14 apart (0.1 % of pairs below 18). Crops, rotations, mirroring, borders and heavy
filters change the hash: such copies are not found (the exact SHA-256 still finds untouched files).
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
import uuid
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import (Boolean, CheckConstraint, Float, ForeignKey, Index, Integer, LargeBinary,
                        MetaData, String, Text, UniqueConstraint, create_engine, event, func, select)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from . import keys as keystore
from .keys import KeyStoreError, UserKeys

if TYPE_CHECKING:
    from PIL import Image

RECORD_FORMAT = "rgan-agent/provenance-record"
RECORD_VERSION = 1
SOURCES = ("cli", "extension")
PHASH_MAX_DISTANCE = 8
DEFAULT_TIMEOUT = 30.0
DATABASE_NAME = "provenance.sqlite3"


def _migrations_dir() -> Path:
    """migrations/ beside the package (a source checkout or an editable install), else the copy a
    wheel carries inside it as agent/migrations (see pyproject.toml)."""
    beside = Path(__file__).resolve().parent.parent / "migrations"
    return beside if (beside / "env.py").is_file() else Path(__file__).resolve().parent / "migrations"


MIGRATIONS_DIR = _migrations_dir()

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_AAD_LABEL = b"rgan-agent/provenance v1"
_BEGIN_OPTION = "agent_sqlite_begin"
# execution options for a connection whose transactions take the write lock at BEGIN
WRITE_OPTIONS = {_BEGIN_OPTION: "IMMEDIATE"}
_HEX64 = frozenset("0123456789abcdef")


class ProvenanceError(Exception):
    """A provenance problem the user can act on; the message says what and where."""


class DatabaseLockedError(ProvenanceError):
    """Another process held the database's write lock for longer than the busy timeout."""


# ---------------------------------------------------------------- schema

class Base(DeclarativeBase):
    # named constraints, so that later migrations (batch mode on SQLite) can refer to them
    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)
    created: Mapped[str] = mapped_column(String(32))
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))  # Ed25519, raw 32 bytes
    # the chain head as of the last append: a tripwire for truncation, not a proof (unsigned)
    head_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    head_hash: Mapped[str | None] = mapped_column(String(64))
    # NULL: the shipped default model. users and models refer to each other: use_alter lets the
    # metadata order the two tables
    active_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL", use_alter=True))

    keys: Mapped[list[KeyRow]] = relationship(back_populates="user", cascade="all, delete-orphan")


class KeyRow(Base):
    __tablename__ = "keys"
    __table_args__ = (UniqueConstraint("user_id", "key_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    key_id: Mapped[str] = mapped_column(String(16))
    created: Mapped[str] = mapped_column(String(32))
    active: Mapped[bool] = mapped_column(Boolean)

    user: Mapped[UserRow] = relationship(back_populates="keys")


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64), index=True)  # of the (plaintext) weights file
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    encrypted: Mapped[bool] = mapped_column(Boolean)
    created: Mapped[str] = mapped_column(String(32))
    file: Mapped[str | None] = mapped_column(String(200))  # under $AGENT_HOME/models; NULL: shipped
    report: Mapped[str | None] = mapped_column(Text)  # JSON: how it was made and measured


class PairingCodeRow(Base):
    """A one-time code printed by `agent pair`; only its SHA-256 is stored."""
    __tablename__ = "pairing_codes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[str] = mapped_column(String(32))
    expires: Mapped[str] = mapped_column(String(32))


class TokenRow(Base):
    """A paired extension's bearer token, bound to the extension origin that paired; stored hashed."""
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    origin: Mapped[str | None] = mapped_column(String(200))
    label: Mapped[str | None] = mapped_column(String(200))
    created: Mapped[str] = mapped_column(String(32))
    last_used: Mapped[str | None] = mapped_column(String(32))
    revoked: Mapped[str | None] = mapped_column(String(32))


class ProtectionRow(Base):
    __tablename__ = "protections"
    __table_args__ = (
        UniqueConstraint("user_id", "seq"),
        CheckConstraint("source IN ('cli', 'extension')", name="source"),
        Index(None, "time"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)  # the record format's version
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    seq: Mapped[int] = mapped_column(Integer)
    time: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(16))
    file_name_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    site_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    original_sha256: Mapped[str] = mapped_column(String(64), index=True)
    protected_sha256: Mapped[str] = mapped_column(String(64), index=True)
    phash: Mapped[str] = mapped_column(String(16))
    original_width: Mapped[int] = mapped_column(Integer)
    original_height: Mapped[int] = mapped_column(Integer)
    working_width: Mapped[int] = mapped_column(Integer)
    working_height: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    rgan_key_id: Mapped[str] = mapped_column(String(16))
    params: Mapped[str] = mapped_column(Text)
    psnr: Mapped[float | None] = mapped_column(Float)
    self_check_asr: Mapped[float | None] = mapped_column(Float)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    record_hash: Mapped[str] = mapped_column(String(64), index=True)
    signature: Mapped[bytes] = mapped_column(LargeBinary(64))

    user: Mapped[UserRow] = relationship()


JOB_STATES = ("queued", "running", "done", "failed", "cancelled")


class JobRow(Base):
    """A background job (`agent/service/jobs.py`): a user's fine-tuning run, its progress and its outcome."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("state IN ('queued', 'running', 'done', 'failed', 'cancelled')", name="state"),
        Index(None, "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    created: Mapped[str] = mapped_column(String(32))
    started: Mapped[str | None] = mapped_column(String(32))
    finished: Mapped[str | None] = mapped_column(String(32))
    params: Mapped[str] = mapped_column(Text)  # JSON: what to train on and how
    progress: Mapped[str | None] = mapped_column(Text)  # JSON: epoch, losses, ETA, as last reported
    result: Mapped[str | None] = mapped_column(Text)  # JSON: the model stored and its quality report
    error: Mapped[str | None] = mapped_column(Text)

    user: Mapped[UserRow] = relationship()


# ---------------------------------------------------------------- opening the database

def database_path(home: Path) -> Path:
    """Where the agent keeps its log under `$AGENT_HOME` (see `service.home.agent_home`)."""
    return Path(home) / DATABASE_NAME


def open_database(path: Path, *, timeout: float = DEFAULT_TIMEOUT) -> sessionmaker[Session]:
    """Opens (creating if needed) the log at `path`, migrates it to the newest schema and returns
    a session factory. `timeout`: seconds to wait for another process's lock before giving up
    with a `DatabaseLockedError`. `factory.kw["bind"]` is the engine (`dispose()` it when done)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # private from the start: hashes and times of a user's photos are nobody else's business
        # (SQLite gives the -wal and -shm files the database file's permissions). Never open an
        # existing database outside SQLite: closing any descriptor of the file drops every POSIX
        # lock this process holds on it, so another engine here (the service's) would lose its
        # locks, and another process could checkpoint the WAL under it: a corrupt database.
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    except FileExistsError:
        pass
    except OSError as error:
        raise ProvenanceError(f"cannot open the provenance database {path}: {error.strerror}") from None
    engine = make_engine(path, timeout)
    try:
        migrate(engine, timeout=timeout)
    except BaseException:
        engine.dispose()
        raise
    return sessionmaker(engine, expire_on_commit=False,
                        info={"provenance_path": str(path), "provenance_timeout": timeout})


def migrate(engine: Engine, *, timeout: float | None = None) -> None:
    """Applies every migration in `migrations/` the database lacks (none on a current one), in
    one write transaction, so two processes opening a fresh file cannot both create it."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise ProvenanceError(f"the database migrations are missing ({MIGRATIONS_DIR}): reinstall the agent")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    where = engine.url.database
    with translate_errors(f"migrating {where}", timeout):
        # the usual case, an up-to-date database, needs no write lock (another process may hold it)
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
        if current == ScriptDirectory.from_config(config).get_current_head():
            return
        with engine.connect().execution_options(**WRITE_OPTIONS) as connection:
            with connection.begin():
                config.attributes["connection"] = connection
                try:
                    command.upgrade(config, "head")
                except CommandError as error:
                    if "Can't locate revision" in str(error):
                        raise ProvenanceError(f"{where} was written by a newer agent (its schema revision "
                                              f"{current!r} is unknown here); upgrade the agent") from None
                    raise


def make_engine(path: Path, timeout: float = DEFAULT_TIMEOUT) -> Engine:
    """An engine on the SQLite file with the agent's connection settings (WAL, foreign keys, busy
    timeout, real transactions, the `hamming` SQL function); it does not migrate (`migrate`)."""
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": timeout})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        # SQLAlchemy emits BEGIN itself (see `_begin`): sqlite3's legacy mode would not begin a
        # transaction before a SELECT, so reads would not be repeatable
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()
        dbapi_connection.create_function("hamming", 2, _hamming, deterministic=True)

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        mode = connection.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        connection.info[_BEGIN_OPTION] = mode
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


@contextlib.contextmanager
def translate_errors(doing: str, timeout: float | None) -> Iterator[None]:
    """SQLite's errors inside the block as the log's own: `DatabaseLockedError` for a lock held
    past `timeout`, `ProvenanceError` for the rest, each saying what was being done."""
    try:
        yield
    except DatabaseError as error:  # OperationalError (locks), IntegrityError, "not a database", ...
        message = str(error.orig).lower()
        if isinstance(error, OperationalError) and ("locked" in message or "busy" in message):
            waited = f" (waited {timeout:g} s)" if timeout is not None else ""
            raise DatabaseLockedError(
                f"the provenance database is locked by another process{waited} while {doing}; "
                "wait for the other agent process to finish, or close what holds it, and try again") from None
        hint = "; it is damaged or not the agent's database: restore it from a backup" \
            if "not a database" in message or "malformed" in message else ""
        raise ProvenanceError(f"database error while {doing}: {error.orig}{hint}") from None


def _session_timeout(session: Session) -> float | None:
    return session.info.get("provenance_timeout")


def begin_write(session: Session) -> None:
    """Makes sure this session's transaction holds the write lock before it reads a chain head."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*already.*execution_options.*")
        warnings.filterwarnings("ignore", message=".*execution_options ignored.*")
        connection = session.connection(execution_options=WRITE_OPTIONS)
    if connection.info.get(_BEGIN_OPTION) == "IMMEDIATE":
        return
    # A transaction the caller began DEFERRED: a zero-row UPDATE takes the write lock now (it is
    # already held if the transaction wrote). If another process committed since this transaction
    # first read, SQLite refuses (its snapshot is stale) and the caller must start over.
    try:
        connection.exec_driver_sql("UPDATE users SET head_seq = head_seq WHERE 0")
    except OperationalError as error:
        if "locked" in str(error.orig).lower() or "busy" in str(error.orig).lower():
            raise DatabaseLockedError(
                "the provenance database changed or stayed locked while this transaction was open; "
                "record protections in a fresh session (or one begun by `factory.begin()`), then retry") from None
        raise


# ---------------------------------------------------------------- users, keys and models

def register_user(session: Session, keys: UserKeys) -> UserRow:
    """Adds the user (public key) and the public parts of its RGAN keys, or brings them up to date
    (new keys after a rotation, the active flag). A user already known with another signing key is
    refused: its records would no longer verify. Takes the write lock (see `record_protection`)."""
    with translate_errors("registering a user", _session_timeout(session)):
        begin_write(session)
        return _register_user(session, keys)


def _register_user(session: Session, keys: UserKeys) -> UserRow:
    # populate_existing: a session kept across commits must see what other processes appended since
    user = session.scalar(select(UserRow).where(UserRow.name == keys.user)
                          .execution_options(populate_existing=True))
    if user is None:
        user = UserRow(name=keys.user, created=time_text(min(k.created for k in keys.rgan_keys), micro=False),
                       public_key=keys.public_key_bytes, head_seq=0, head_hash=None)
        session.add(user)
    elif user.public_key != keys.public_key_bytes:
        raise ProvenanceError(
            f"the provenance log knows user {keys.user!r} with another signing key: these keys are not the "
            "ones that signed its records (a user re-created under the same name?); use another user name")
    known = {k.key_id: k for k in user.keys}
    active = keys.active_rgan_key.key_id
    for rgan_key in keys.rgan_keys:
        if rgan_key.key_id not in known:
            user.keys.append(KeyRow(key_id=rgan_key.key_id, created=time_text(rgan_key.created, micro=False),
                                    active=rgan_key.key_id == active))
    for key_row in user.keys:
        key_row.active = key_row.key_id == active
    session.flush()
    return user


def register_model(session: Session, name: str, sha256: str, *, user: UserKeys | None = None,
                   encrypted: bool = False) -> ModelRow:
    """The models row for these weights (by SHA-256, per user; `user=None`: the shipped default),
    added if new. `sha256` is the digest of the plaintext weights file (`file_sha256`)."""
    sha256 = _check_hex(sha256, 64, "model sha256")
    with translate_errors("registering a model", _session_timeout(session)):
        begin_write(session)
        user_id = _register_user(session, user).id if user is not None else None
        owner = ModelRow.user_id.is_(None) if user_id is None else ModelRow.user_id == user_id
        row = session.scalar(select(ModelRow).where(ModelRow.sha256 == sha256, owner))
        if row is None:
            row = ModelRow(name=name, sha256=sha256, user_id=user_id, encrypted=bool(encrypted),
                           created=time_text(utc_now(), micro=False))
            session.add(row)
            session.flush()
    return row


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- records

@dataclass(frozen=True)
class Record:
    """One protection record as read from the log. `file_name` and `site` are filled in only by
    `decrypt_record` (or `list_records(..., keys=...)`) with the user's data key."""

    id: str
    user: str
    seq: int
    time: str
    source: str
    original_sha256: str
    protected_sha256: str
    phash: str
    original_size: tuple[int, int]
    working_size: tuple[int, int]
    model_id: int
    model_sha256: str
    rgan_key_id: str
    params: dict[str, Any]
    psnr: float | None
    self_check_asr: float | None
    prev_hash: str | None
    record_hash: str
    signature: str  # hex
    file_name_enc: bytes | None = field(default=None, repr=False)
    site_enc: bytes | None = field(default=None, repr=False)
    file_name: str | None = None
    site: str | None = None
    decrypted: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the encrypted fields appear as text only once decrypted."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("file_name_enc", "site_enc")}
        out["original_size"], out["working_size"] = list(self.original_size), list(self.working_size)
        if not self.decrypted:
            out["file_name"] = out["site"] = None
        return out


def record_protection(session: Session, keys: UserKeys, *, original: bytes, protected: bytes, info: Any,
                      model: ModelRow, source: str = "cli", file_name: str | None = None,
                      site: str | None = None, params: Mapping[str, Any] | None = None,
                      psnr: float | None = None, self_check_asr: float | None = None,
                      rgan_key_id: str | None = None, phash: str | None = None,
                      now: datetime | None = None) -> Record:
    """Signs and appends the record of one protection to the user's chain; returns it.

    `original` / `protected`: the files' bytes (hashed; the perceptual hash is taken from
    `protected` unless `phash` is given). `info`: the pipeline's `ProtectInfo` (geometry; its dict
    goes into `params` as `protect_info`). `rgan_key_id`: the key used, by default the active one.
    The write lock is taken first, so concurrent appends are serialised; the record is flushed,
    and the caller commits (e.g. `with factory.begin() as session: record_protection(...)`).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if not isinstance(model, ModelRow):
        raise TypeError("model must be a ModelRow (from register_model)")
    key_id = keys.active_rgan_key.key_id if rgan_key_id is None else rgan_key_id
    keys.key_for(key_id)  # a KeyStoreError naming the user's keys if it is not one of them
    params = dict(params or {})
    for taken in ("protect_info", "recovery"):
        if taken in params:
            raise ValueError(f"params must not hold {taken!r}: it is taken from `info`")
    params["protect_info"] = info.to_dict()
    record_id = uuid.uuid4().hex
    recovery = getattr(info, "recovery", None)
    if recovery is not None:
        # what recovery needs beyond the file (the field, the clipped pixels) reveals the original
        # where it clipped, so it is sealed like the file name; the signature covers the sealed form
        sealed = keystore.encrypt_data(keys.data_key, recovery.to_bytes(), _aad("recovery", record_id, keys.user))
        params["recovery"] = base64.b64encode(sealed).decode("ascii")
    params_text = canonical(params).decode("ascii")
    (original_w, original_h), (working_w, working_h) = info.original_size, info.working_size
    moment = time_text(now or datetime.now(UTC))
    phash = _check_hex(phash, 16, "phash") if phash is not None else perceptual_hash(protected)
    for name, value in (("psnr", psnr), ("self_check_asr", self_check_asr)):
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number or None, got {value!r}")

    timeout = _session_timeout(session)
    with translate_errors("recording a protection", timeout):
        begin_write(session)
        user = _register_user(session, keys)
        seq, prev_hash = _next_link(session, user)
        row = ProtectionRow(
            id=record_id, version=RECORD_VERSION, user_id=user.id, seq=seq, time=moment, source=source,
            file_name_enc=_seal(keys, "file_name", record_id, file_name),
            site_enc=_seal(keys, "site", record_id, site),
            original_sha256=hashlib.sha256(original).hexdigest(),
            protected_sha256=hashlib.sha256(protected).hexdigest(),
            phash=phash, original_width=int(original_w), original_height=int(original_h),
            working_width=int(working_w), working_height=int(working_h),
            model_id=model.id, model_sha256=model.sha256, rgan_key_id=key_id, params=params_text,
            psnr=None if psnr is None else float(psnr),
            self_check_asr=None if self_check_asr is None else float(self_check_asr),
            prev_hash=prev_hash,
        )
        body = record_body(row, user.name)
        row.record_hash = record_hash(body)
        row.signature = keys.signing_key.sign(signed_message(body, row.record_hash))
        session.add(row)
        user.head_seq, user.head_hash = seq, row.record_hash
        session.flush()
    return _record(row, user.name)


def _next_link(session: Session, user: UserRow) -> tuple[int, str | None]:
    """(seq, prev_hash) for the next record: after the newest record, or after the head the users
    table remembers if that is further on, so that a truncated tail stays visible as a gap."""
    newest = session.execute(select(ProtectionRow.seq, ProtectionRow.record_hash)
                             .where(ProtectionRow.user_id == user.id)
                             .order_by(ProtectionRow.seq.desc()).limit(1)).first()
    if newest is not None and newest.seq >= (user.head_seq or 0):
        return newest.seq + 1, newest.record_hash
    if user.head_seq:
        return user.head_seq + 1, user.head_hash
    return 1, None


def _aad(field_name: str, record_id: str, user: str) -> bytes:
    return b"\x00".join((_AAD_LABEL, field_name.encode("ascii"), record_id.encode("ascii"), user.encode("ascii")))


def _seal(keys: UserKeys, field_name: str, record_id: str, text: str | None) -> bytes | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"{field_name} must be a string or None")
    return keystore.encrypt_data(keys.data_key, text.encode("utf-8"), _aad(field_name, record_id, keys.user))


def decrypt_record(record: Record, keys: UserKeys) -> Record:
    """The record with `file_name` and `site` decrypted with the user's data key."""
    if record.user != keys.user:
        raise ProvenanceError(f"record {record.id} belongs to user {record.user!r}, not {keys.user!r}")
    opened = {}
    for name in ("file_name", "site"):
        blob = getattr(record, f"{name}_enc")
        if blob is None:
            opened[name] = None
            continue
        try:
            opened[name] = keystore.decrypt_data(keys.data_key, bytes(blob),
                                                 _aad(name, record.id, record.user)).decode("utf-8")
        except (KeyStoreError, UnicodeDecodeError, TypeError) as error:
            raise ProvenanceError(f"record {record.id} (user {record.user!r}, #{record.seq}): the encrypted "
                                  f"{name.replace('_', ' ')} does not decrypt ({error}); "
                                  "run `agent log verify`") from None
    return dataclasses.replace(record, decrypted=True, **opened)


def open_recovery(record: Record, keys: UserKeys) -> bytes | None:
    """The recovery data sealed in a record (`pipeline.ProtectInfo.recovery`'s bytes), or None for
    a record that has none (the rgan scheme's)."""
    sealed = record.params.get("recovery") if isinstance(record.params, dict) else None
    if sealed is None:
        return None
    if record.user != keys.user:
        raise ProvenanceError(f"record {record.id} belongs to user {record.user!r}, not {keys.user!r}")
    try:
        return keystore.decrypt_data(keys.data_key, base64.b64decode(sealed, validate=True),
                                     _aad("recovery", record.id, record.user))
    except (KeyStoreError, ValueError, TypeError) as error:
        raise ProvenanceError(f"record {record.id} (user {record.user!r}, #{record.seq}): its sealed recovery "
                              f"data does not decrypt ({error}); run `agent log verify`") from None


def find_by_sha256(session: Session, digest: str | bytes, *, original: bool = False) -> list[Record]:
    """Records whose protected file (or, with `original=True`, original file) has this SHA-256;
    newest first. The same photo protected twice with the same key gives the same bytes."""
    digest = digest.hex() if isinstance(digest, bytes) else _check_hex(digest.lower(), 64, "sha256")
    column = ProtectionRow.original_sha256 if original else ProtectionRow.protected_sha256
    rows = session.execute(select(ProtectionRow, UserRow.name).join(UserRow)
                           .where(column == digest).order_by(ProtectionRow.time.desc())).all()
    return [_record(row, name) for row, name in rows]


def find_by_phash(session: Session, phash: str | int,
                  max_distance: int = PHASH_MAX_DISTANCE) -> list[tuple[int, Record]]:
    """(Hamming distance, record) for every record whose protected image's perceptual hash is within
    `max_distance` bits of `phash` (see `perceptual_hash`), nearest first, then newest. A scan of
    the table (SQLite has no index for Hamming distance): about a microsecond per record."""
    text = f"{phash:016x}" if isinstance(phash, int) else _check_hex(phash.lower(), 16, "phash")
    distance = func.hamming(ProtectionRow.phash, text)
    rows = session.execute(select(ProtectionRow, UserRow.name, distance).join(UserRow)
                           .where(distance <= int(max_distance))
                           .order_by(distance, ProtectionRow.time.desc())).all()
    return [(int(d), _record(row, name)) for row, name, d in rows]


def list_records(session: Session, user: str | None = None, since: datetime | None = None,
                 keys: UserKeys | Iterable[UserKeys] = ()) -> list[Record]:
    """Records in time order, of one user or all, at or after `since` (timezone-aware); those of
    the users whose `keys` are given come back with file names and sites decrypted."""
    query = select(ProtectionRow, UserRow.name).join(UserRow)
    if user is not None:
        query = query.where(UserRow.name == user)
    if since is not None:
        if since.tzinfo is None:
            raise ValueError("since must be timezone-aware (e.g. datetime(..., tzinfo=UTC))")
        query = query.where(ProtectionRow.time >= time_text(since))
    rows = session.execute(query.order_by(ProtectionRow.time, UserRow.name, ProtectionRow.seq)).all()
    unlocked = {k.user: k for k in ([keys] if isinstance(keys, UserKeys) else keys)}
    records = [_record(row, name) for row, name in rows]
    return [decrypt_record(r, unlocked[r.user]) if r.user in unlocked else r for r in records]


def _record(row: ProtectionRow, user: str) -> Record:
    try:
        params = json.loads(row.params)
    except (TypeError, ValueError):
        params = {"unreadable": str(row.params)}
    return Record(
        id=row.id, user=user, seq=row.seq, time=row.time, source=row.source,
        original_sha256=row.original_sha256, protected_sha256=row.protected_sha256, phash=row.phash,
        original_size=(row.original_width, row.original_height),
        working_size=(row.working_width, row.working_height),
        model_id=row.model_id, model_sha256=row.model_sha256, rgan_key_id=row.rgan_key_id,
        params=params, psnr=row.psnr, self_check_asr=row.self_check_asr, prev_hash=row.prev_hash,
        record_hash=row.record_hash, signature=bytes(row.signature or b"").hex(),
        file_name_enc=row.file_name_enc, site_enc=row.site_enc,
    )


# ---------------------------------------------------------------- canonical form

def canonical(value: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII only (`\\uXXXX` escapes); NaN and infinities refused."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def record_body(row: ProtectionRow, user: str) -> dict[str, Any]:
    """Every field of the record except `record_hash` and `signature` (see the module docstring)."""
    return {
        "format": RECORD_FORMAT,
        "version": row.version,
        "id": row.id,
        "user": user,
        "seq": row.seq,
        "time": row.time,
        "source": row.source,
        "file_name_enc": _b64(row.file_name_enc),
        "site_enc": _b64(row.site_enc),
        "original_sha256": row.original_sha256,
        "protected_sha256": row.protected_sha256,
        "phash": row.phash,
        "original_width": row.original_width,
        "original_height": row.original_height,
        "working_width": row.working_width,
        "working_height": row.working_height,
        "model_id": row.model_id,
        "model_sha256": row.model_sha256,
        "rgan_key_id": row.rgan_key_id,
        "params": row.params,
        "psnr": row.psnr,
        "self_check_asr": row.self_check_asr,
        "prev_hash": row.prev_hash,
    }


def record_hash(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(dict(body))).hexdigest()


def signed_message(body: Mapping[str, Any], hash_hex: str) -> bytes:
    """What the signature covers: the body with its record_hash, i.e. every field but the signature."""
    return canonical({**body, "record_hash": hash_hex})


# ---------------------------------------------------------------- verification

@dataclass(frozen=True)
class ChainHead:
    """The newest record of a user's chain: keep it outside the database to anchor the chain."""

    user: str
    seq: int
    record_hash: str
    time: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Problem:
    """One finding of `verify_chain`. `kind`: altered | inserted | removed | fork | key. For
    removed records `seq`..`seq_end` is the missing range and `record_id` is None (it is gone)."""

    kind: str
    user: str
    seq: int | None
    record_id: str | None
    detail: str
    seq_end: int | None = None

    def __str__(self) -> str:
        where = "" if self.seq is None else (f" #{self.seq}" if self.seq_end in (None, self.seq)
                                             else f" #{self.seq}-#{self.seq_end}")
        record = f" record {self.record_id}" if self.record_id else ""
        return f"{self.kind}: user {self.user!r}{where}{record}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class VerifyReport:
    records: int  # records checked
    heads: dict[str, ChainHead | None]  # per user, the newest authentic record
    problems: tuple[Problem, ...]
    keys_from_database: tuple[str, ...]  # users checked against the key the database itself holds

    @property
    def ok(self) -> bool:
        return not self.problems

    def of_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]

    @property
    def altered(self) -> list[Problem]:
        return self.of_kind("altered")

    @property
    def inserted(self) -> list[Problem]:
        return self.of_kind("inserted")

    @property
    def removed(self) -> list[Problem]:
        return self.of_kind("removed")

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records,
                "heads": {u: h.to_dict() if h else None for u, h in self.heads.items()},
                "problems": [p.to_dict() for p in self.problems],
                "keys_from_database": list(self.keys_from_database)}

    def __str__(self) -> str:
        lines = [f"{self.records} records of {len(self.heads)} users: "
                 + ("the chains verify" if self.ok else f"{len(self.problems)} problems")]
        lines += [f"  {p}" for p in self.problems]
        if self.keys_from_database:
            lines.append("  note: checked against the public keys stored in the database itself for "
                         + ", ".join(self.keys_from_database) + " (give trusted keys to rule out a rewritten log)")
        return "\n".join(lines)


def chain_head(session: Session, user: str | None = None) -> dict[str, ChainHead]:
    """The newest record of each user's chain (or of `user`'s), for anchoring outside the database."""
    query = select(UserRow.name, ProtectionRow.seq, ProtectionRow.record_hash, ProtectionRow.time) \
        .join(UserRow).order_by(UserRow.name, ProtectionRow.seq)
    if user is not None:
        query = query.where(UserRow.name == user)
    heads: dict[str, ChainHead] = {}
    for name, seq, hash_hex, moment in session.execute(query):
        heads[name] = ChainHead(name, seq, hash_hex, moment)  # ascending, so the last one wins
    return heads


def public_keys_from_store(store: Path) -> dict[str, bytes]:
    """The signing public keys in the key files' headers (as trustworthy as those files: a header
    is only authenticated by an unlock; `UserKeys.public_key_bytes` of unlocked keys is better)."""
    out = {}
    for user in keystore.list_users(store):
        out[user] = base64.b64decode(keystore.public_info(store, user)["signing_public_key"])
    return out


def verify_chain(session: Session, public_keys: Mapping[str, bytes] | Iterable[UserKeys] | None = None, *,
                 anchors: Mapping[str, ChainHead] | Iterable[ChainHead] | None = None,
                 user: str | None = None, key_sources: Mapping[str, str] | None = None) -> VerifyReport:
    """Checks every record's hash and signature and every chain link (of `user`'s chain only, if
    given); names each altered, inserted and removed record (see the module docstring for what each
    means and what cannot be told without `anchors`, earlier `chain_head` results kept outside the
    database).

    `public_keys`: user -> raw Ed25519 public key, or unlocked `UserKeys`, that the caller trusts;
    users without one are checked against the key in the `users` table, and the report lists them.
    `key_sources`: user -> where their trusted key came from, for the report (e.g. a key file).
    """
    trusted: dict[str, bytes] = {}
    if public_keys is not None:
        if isinstance(public_keys, Mapping):
            trusted = {name: bytes(key) for name, key in public_keys.items()}
        else:
            trusted = {k.user: k.public_key_bytes for k in public_keys}
    if anchors is None:
        anchor_map: dict[str, ChainHead] = {}
    elif isinstance(anchors, Mapping):
        anchor_map = dict(anchors)
    else:
        anchor_map = {a.user: a for a in anchors}

    users = {u.id: u for u in session.scalars(select(UserRow)) if user is None or u.name == user}
    query = select(ProtectionRow).order_by(ProtectionRow.user_id, ProtectionRow.seq)
    if user is not None:
        query = query.where(ProtectionRow.user_id.in_(list(users)))
        anchor_map = {name: anchor for name, anchor in anchor_map.items() if name == user}
    rows = list(session.scalars(query))
    problems: list[Problem] = []
    by_user: dict[int, list[ProtectionRow]] = defaultdict(list)
    for row in rows:
        if row.user_id in users:
            by_user[row.user_id].append(row)
        else:
            problems.append(Problem("inserted", f"<user id {row.user_id}>", row.seq, row.id,
                                    "refers to a user that does not exist"))
    from_database = []
    heads: dict[str, ChainHead | None] = {}
    for user_id, owner in sorted(users.items(), key=lambda item: item[1].name):
        key = trusted.get(owner.name)
        if key is None:
            key = bytes(owner.public_key)
            from_database.append(owner.name)
        elif bytes(owner.public_key) != key:
            table_signed = any(_signed_by(row, owner.name, bytes(owner.public_key)) for row in by_user.get(user_id, []))
            source = (key_sources or {}).get(owner.name, "the trusted key's source")
            problems.append(Problem("key", owner.name, None, None, (
                f"the trusted public key (from {source}) is not the one the users table holds, and the records "
                f"were signed with the table's: {source} was altered or replaced (or the whole log rewritten "
                "under another key; unlocking the key file authenticates it)") if table_signed else (
                f"the users table holds another public key than the trusted one (from {source}): the table "
                "was edited, or the user re-created")))
        chain_problems, head = _check_chain(owner, by_user.get(user_id, []), key, anchor_map.get(owner.name))
        problems += chain_problems
        heads[owner.name] = head
    for name, anchor in anchor_map.items():
        if name not in heads:
            problems.append(Problem("removed", name, 1, None, f"the user's whole chain is gone (anchored at "
                                    f"#{anchor.seq}, {anchor.record_hash[:16]}…)", seq_end=anchor.seq))
    return VerifyReport(len(rows), heads, tuple(problems), tuple(from_database))


def _signed_by(row: ProtectionRow, user: str, public_key: bytes) -> bool:
    try:
        body = record_body(row, user)
        Ed25519PublicKey.from_public_bytes(public_key).verify(bytes(row.signature), signed_message(body, record_hash(body)))
    except (InvalidSignature, TypeError, ValueError):
        return False
    return True


def logged_public_key(session: Session, user: str) -> bytes | None:
    """The signing public key the users table holds for `user` (None if the log has no such user)."""
    row = session.scalar(select(UserRow).where(UserRow.name == user))
    return None if row is None else bytes(row.public_key)


def record_faults(session: Session, user: str, public_key: bytes) -> dict[str, str]:
    """What is wrong with each of `user`'s records that must not be used (record id -> the
    problem): altered or inserted, judged against `public_key`, which the caller trusts. A record
    in a fork is authentic (signed by the user's key), and usable."""
    report = verify_chain(session, {user: public_key}, user=user)
    return {problem.record_id: str(problem) for problem in report.problems
            if problem.record_id is not None and problem.kind in ("altered", "inserted")}


def _check_chain(user: UserRow, rows: list[ProtectionRow], public_key: bytes,
                 anchor: ChainHead | None) -> tuple[list[Problem], ChainHead | None]:
    name = user.name
    try:
        verifier = Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        verifier = None
    problems: list[Problem] = []

    def check(row: ProtectionRow) -> str | None:
        """None if authentic, else what is wrong."""
        try:
            body = record_body(row, name)
            recomputed = record_hash(body)
        except (TypeError, ValueError) as error:
            return f"its fields are malformed ({error})"
        if recomputed != row.record_hash:
            return "its content does not match its hash"
        if verifier is None:
            return "the user's public key is invalid"
        try:
            verifier.verify(bytes(row.signature), signed_message(body, row.record_hash))
        except (InvalidSignature, TypeError, ValueError):
            return f"its signature does not verify with the public key of {name!r}"
        return None

    faults = {row.id: check(row) for row in rows}
    authentic = [r for r in rows if faults[r.id] is None]
    slots: dict[int, ProtectionRow] = {}
    for row in authentic:
        if not isinstance(row.seq, int):
            continue
        if row.seq in slots:
            problems.append(Problem("fork", name, row.seq, row.id, f"a second authentic record at #{row.seq} "
                                    f"(besides {slots[row.seq].id}): two chains were written under one key"))
        else:
            slots[row.seq] = row
    last_authentic = max(slots, default=0)
    by_hash = {r.record_hash: r for r in rows}
    if not slots:
        # nothing verifies (the wrong key, or every record rewritten): each record keeps its place
        last_authentic = max((r.seq for r in rows if isinstance(r.seq, int)), default=0)
    linked_hashes = {r.prev_hash for r in authentic if r.prev_hash}

    # invalid rows: in a place of the chain (altered) or not (inserted); rows whose stored hash an
    # authentic successor links to, or that kept their hash, claim a place before the others
    invalid = sorted((r for r in rows if faults[r.id] is not None),
                     key=lambda r: (r.record_hash not in linked_hashes, faults[r.id] != "its content does not "
                                    "match its hash", str(r.seq), r.id))
    for row in invalid:
        fault = faults[row.id]
        seq = row.seq if isinstance(row.seq, int) else None
        if seq is None or seq < 1:
            problems.append(Problem("inserted", name, None, row.id, f"{fault}, and its sequence number "
                                    f"{row.seq!r} has no place in a chain"))
        elif seq in slots:
            holder = slots[seq]
            problems.append(Problem("inserted", name, seq, row.id, f"{fault}; #{seq} is held by record "
                                    f"{holder.id}" + ("" if holder.id in {r.id for r in authentic} else
                                                      " (itself altered)")))
        elif seq <= last_authentic or row.record_hash in linked_hashes or fault.startswith("its content"):
            slots[seq] = row
            problems.append(Problem("altered", name, seq, row.id, fault))
        else:
            problems.append(Problem("inserted", name, seq, row.id, f"{fault}, past the end of the signed chain "
                                    "(or the newest record altered with its hash recomputed: at the end of "
                                    "a chain the two look alike)"))

    # links between authentic neighbours (only the key holder could break one)
    for seq, row in sorted(slots.items()):
        before = slots.get(seq - 1)
        if faults[row.id] is None and before is not None and faults[before.id] is None \
                and row.prev_hash != before.record_hash:
            problems.append(Problem("fork", name, seq, row.id, f"links to {str(row.prev_hash)[:16]}…, not to "
                                    f"#{seq - 1} ({before.id}): two chains were written under one key"))
        if faults[row.id] is None and seq == 1 and row.prev_hash is not None:
            problems.append(Problem("fork", name, 1, row.id, "the first record links to an earlier one"))

    # gaps: places no record holds, up to the newest authentic record (an altered row that claims a
    # place further on says nothing about what is missing), the users table's head and the anchor
    end = last_authentic
    reasons = {}
    if (user.head_seq or 0) > end:
        reasons[user.head_seq] = f"the users table says the chain reached #{user.head_seq}"
    if anchor is not None and anchor.seq > end:
        reasons[anchor.seq] = f"the anchor says the chain reached #{anchor.seq}"
    limit = max([end, *reasons])
    seq = 1
    while seq <= limit:
        if seq in slots:
            seq += 1
            continue
        start = seq
        while seq <= limit and seq not in slots:
            seq += 1
        stop = seq - 1
        successor = slots.get(seq)
        if successor is not None:
            detail = f"missing: record {successor.id} (#{seq}) links to {str(successor.prev_hash)[:16]}…, "
            moved = by_hash.get(successor.prev_hash)
            detail += (f"which record {moved.id} holds, moved to #{moved.seq}" if moved is not None
                       else "which is not in the log")
        else:
            detail = "missing at the end of the chain: " + "; ".join(
                text for reach, text in sorted(reasons.items()) if reach >= start)
        problems.append(Problem("removed", name, start, None, detail, seq_end=stop))

    if anchor is not None:
        held = slots.get(anchor.seq)
        if held is not None and faults[held.id] is None and held.record_hash != anchor.record_hash:
            problems.append(Problem("fork", name, anchor.seq, held.id, "is not the record anchored at this place "
                                    f"({anchor.record_hash[:16]}…): the log was rebuilt or replaced"))
    head_row = max(authentic, key=lambda r: r.seq if isinstance(r.seq, int) else -1, default=None)
    head = ChainHead(name, head_row.seq, head_row.record_hash, head_row.time) if head_row is not None else None
    problems.sort(key=lambda p: (p.seq if p.seq is not None else -1, p.kind))
    return problems, head


# ---------------------------------------------------------------- perceptual hash

def perceptual_hash(image: bytes | Path | str | np.ndarray | Image.Image) -> str:
    """The 64-bit perceptual hash (16 hex digits) of an image: an encoded file's bytes or path, a
    PIL image, or an (H, W[, C]) uint8/uint16 array. EXIF orientation is applied first, as a
    platform displays the image."""
    import imagehash
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, (bytes, bytearray, memoryview, str, Path)):
        try:
            with Image.open(io.BytesIO(bytes(image)) if isinstance(image, (bytes, bytearray, memoryview))
                            else image) as opened:
                picture = ImageOps.exif_transpose(opened)
                picture.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise ProvenanceError(f"cannot read the image to hash it: {error}") from None
    elif isinstance(image, np.ndarray):
        picture = Image.fromarray(_to_uint8(image))
    else:
        picture = image
    if picture.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        picture = Image.fromarray(_to_uint8(np.asarray(picture)))
    return str(imagehash.phash(picture))


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype.kind in "iu":
        return (np.clip(pixels, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)  # floats in [0, 1]


def _hamming(a: Any, b: Any) -> int | None:
    """SQL function hamming(a, b): bits differing between two 16-hex-digit hashes; NULL if either
    is not one."""
    try:
        return (int(a, 16) ^ int(b, 16)).bit_count()
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- small helpers

def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


def _check_hex(text: Any, digits: int, what: str) -> str:
    if not isinstance(text, str) or len(text) != digits or not set(text) <= _HEX64:
        raise ValueError(f"{what} must be {digits} lowercase hex digits, got {text!r}")
    return text


def time_text(moment: datetime, *, micro: bool = True) -> str:
    """A time as the log stores it: UTC, ISO 8601, with or without microseconds."""
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    text = moment.astimezone(UTC).strftime(_TIME_FORMAT)
    return text if micro else text[:19] + "Z"


def utc_now() -> datetime:
    return datetime.now(UTC)


__all__ = [
    "Base", "ChainHead", "DatabaseLockedError", "JobRow", "KeyRow", "ModelRow", "PHASH_MAX_DISTANCE", "Problem",
    "ProtectionRow", "ProvenanceError", "Record", "UserRow", "VerifyReport", "WRITE_OPTIONS",
    "canonical", "chain_head", "database_path", "decrypt_record", "file_sha256", "find_by_phash",
    "find_by_sha256", "list_records", "make_engine", "migrate", "open_database", "perceptual_hash",
    "public_keys_from_store", "record_body", "record_hash", "record_protection", "register_model",
    "register_user", "signed_message", "verify_chain",
]
