"""The provenance database itself: where it lives, opening and migrating it, the connection
settings, transactions and the write lock, SQLite's errors as the store's own, and how times are
stored (records/README.md, "Storage")."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .errors import DatabaseLockedError, ProvenanceError
from .phash import hamming

DEFAULT_TIMEOUT = 30.0
DATABASE_NAME = "provenance.sqlite3"


def _migrations_dir() -> Path:
    """migrations/ beside the package (a source checkout or an editable install), else the copy a
    wheel carries inside it as agent/migrations (see pyproject.toml)."""
    package = Path(__file__).resolve().parent.parent  # agent/
    beside = package.parent / "migrations"
    return beside if (beside / "env.py").is_file() else package / "migrations"


MIGRATIONS_DIR = _migrations_dir()

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_BEGIN_OPTION = "agent_sqlite_begin"
# execution options for a connection whose transactions take the write lock at BEGIN
WRITE_OPTIONS = {_BEGIN_OPTION: "IMMEDIATE"}


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
        dbapi_connection.create_function("hamming", 2, hamming, deterministic=True)

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


def session_timeout(session: Session) -> float | None:
    """The busy timeout the session's factory was opened with (`open_database`), for
    `translate_errors`; None for a session made otherwise."""
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


def time_text(moment: datetime, *, micro: bool = True) -> str:
    """A time as the log stores it: UTC, ISO 8601, with or without microseconds."""
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    text = moment.astimezone(UTC).strftime(_TIME_FORMAT)
    return text if micro else text[:19] + "Z"


def utc_now() -> datetime:
    return datetime.now(UTC)
