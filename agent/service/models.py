"""Models per user: the shipped default, or a user's own (fine-tuned) model, encrypted at rest.

A user's model lives in `$AGENT_HOME/models/<user>/<sha256>.enc`, the plaintext model file (a
safetensors file in the `rgan-agent/model` format, `agent/rgan/model.py`) encrypted with the user's
data key by `keys.encrypt_data`, with associated data `rgan-agent/model v1 NUL <user> NUL <sha256>`
(the SHA-256 of the plaintext file, in hex). A stored file therefore cannot be passed off as
another user's model, nor moved to another row of the `models` table: either fails authentication
at load, as does any modification of the file. The directory is private (0700), the files 0600.

The `models` table (`store.ModelRow`) lists the shipped default (`user_id` NULL) and each
user's models (name, SHA-256, file, the report its metadata carries); `users.active_model_id` is the
model a user protects with (NULL: the shipped default). A protection record names the model by
SHA-256, so recovery uses the model that protected the image (`model_with_sha256`), whichever is
active now.

Only safetensors model files are ever read, from bytes in memory: the decrypted weights never touch
the disk, and a pickle (a PyTorch `.pt`/`.pth` file, which can run code when loaded) is refused
before anything is parsed.

Like the rest of the service, every function takes `home` explicitly, and every error a user can
act on is one of `home.USER_ERRORS`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from sqlalchemy import select

from .. import keys as keystore
from .. import pipeline
from .. import store as db
from ..keys import KeyStoreError, UserKeys
from ..pipeline import DEFAULT_MODEL_PATH
from ..rgan.model import RGAN, ModelFileError
from ..rgan.model import model_from_bytes as rgan_model_from_bytes
from .home import DB_TIMEOUT, ServiceError, database, home_lock, logged_user, resolve_user, unlock, write_output

DEFAULT = "default"
DEFAULT_MODEL_NAME = DEFAULT_MODEL_PATH.name
MODELS_DIR = "models"
# A photo model is under a megabyte; this only stops a wrong file from being read into memory whole.
MAX_MODEL_BYTES = 256 * 2**20
MAX_NAME = 64
# an unambiguous SHA-256 prefix needs a few digits; fewer would match by accident
MIN_SHA_PREFIX = 4
_AAD_LABEL = b"rgan-agent/model v1"
_HEX_PREFIX = re.compile(rf"[0-9a-f]{{{MIN_SHA_PREFIX},64}}")


def default_model_sha256() -> str:
    """The SHA-256 of the shipped photo model's file, as records name it."""
    if not DEFAULT_MODEL_PATH.is_file():
        raise ServiceError(f"the default photo model {DEFAULT_MODEL_PATH} is not installed; reinstall the agent")
    return db.file_sha256(DEFAULT_MODEL_PATH)


def register_default_model(session) -> db.ModelRow:
    """The shipped model's row in the models table, added if this agent ships a new one."""
    return db.register_model(session, DEFAULT_MODEL_NAME, default_model_sha256())


def models_dir(home: Path) -> Path:
    return Path(home) / MODELS_DIR


# ---------------------------------------------------------------- the commands

def list_models(home: Path, user: str | None = None) -> list[dict[str, Any]]:
    """The shipped default and the user's own models, oldest first, with which one is active."""
    home = Path(home)
    user = resolve_user(home, user)
    default_sha = default_model_sha256()
    with database(home) as factory, factory() as session:
        user_row = logged_user(session, user)
        default_row = _shipped_row(session, default_sha)
        rows = _models_of(session, user_row)
    active_id = user_row.active_model_id
    default = {
        "name": DEFAULT, "sha256": default_sha, "owner": None, "active": active_id is None,
        "encrypted": False, "created": None if default_row is None else default_row.created,
        "size": DEFAULT_MODEL_PATH.stat().st_size, "file": str(DEFAULT_MODEL_PATH),
        **_report(model_from_bytes(DEFAULT_MODEL_PATH.read_bytes(), "the shipped model")[1]),
    }
    return [default] + [_describe(home, user, row, row.id == active_id) for row in rows]


def import_model(home: Path, user: str | None, passphrase: str, src: Path, name: str | None = None) -> dict[str, Any]:
    """Checks that `src` is a keyed model file this agent can load, then stores it encrypted with
    the user's data key and records it. The same weights imported again by the same user give the
    existing model back (`imported` False); another model under a name the user already has is
    refused. `name` defaults to the file's stem."""
    home, src = Path(home), Path(src)
    user = resolve_user(home, user)
    name = _check_name(src.stem if name is None else name)
    data = _read_model_file(src)
    _, extra = model_from_bytes(data, str(src))
    sha = hashlib.sha256(data).hexdigest()
    keys = unlock(home, user, passphrase)
    written: Path | None = None
    with home_lock(home), database(home, create=True) as factory:
        try:
            with db.translate_errors("importing a model", DB_TIMEOUT), factory.begin() as session:
                user_row = db.register_user(session, keys)
                owned = _models_of(session, user_row)
                existing = next((row for row in owned if row.sha256 == sha), None)
                if existing is not None:
                    return {**_describe(home, user, existing, existing.id == user_row.active_model_id),
                            "imported": False}
                clash = next((row for row in owned if row.name == name), None)
                if clash is not None:
                    raise ServiceError(f"user {user!r} already has another model named {name!r} (SHA-256 "
                                               f"{clash.sha256[:16]}…); choose another name with --name")
                row = db.register_model(session, name, sha, user=keys, encrypted=True)
                row.file = _file_name(user, sha)
                row.report = json.dumps(extra, sort_keys=True) if extra else None
                written = models_dir(home) / row.file
                _write_private(written, keystore.encrypt_data(keys.data_key, data, _aad(user, sha)))
        except BaseException:
            if written is not None:  # the row was not committed: nothing will ever point to the file
                written.unlink(missing_ok=True)
            raise
    return {**_describe(home, user, row, False), "imported": True}


def use_model(home: Path, user: str | None, which: str) -> dict[str, Any]:
    """Makes `which` (a model's name, the start of its SHA-256, or `default`) the model the user
    protects with. Images protected before keep recovering with the model that protected them."""
    home = Path(home)
    user = resolve_user(home, user)
    with home_lock(home), database(home) as factory:
        with db.translate_errors("choosing a model", DB_TIMEOUT), factory.begin() as session:
            user_row = logged_user(session, user)
            row = _resolve(session, user_row, which)
            user_row.active_model_id = None if row is None else row.id
    chosen = {"name": DEFAULT, "sha256": default_model_sha256()} if row is None else \
        {"name": row.name, "sha256": row.sha256}
    return {"user": user, **chosen}


def export_model(home: Path, user: str | None, passphrase: str, which: str, dst: Path, *,
                 overwrite: bool = False) -> dict[str, Any]:
    """Writes the plaintext model file `which` (see `use_model`) to `dst`, atomically; an existing
    `dst` is refused unless `overwrite`. The file is what was imported, byte for byte."""
    home, dst = Path(home), Path(dst)
    user = resolve_user(home, user)
    keys = unlock(home, user, passphrase)
    with database(home) as factory, factory() as session:
        row = _resolve(session, logged_user(session, user), which)
    if row is None:
        data, name, sha = DEFAULT_MODEL_PATH.read_bytes(), DEFAULT, default_model_sha256()
    else:
        data, name, sha = _decrypt(home, keys, row), row.name, row.sha256
    write_output(dst, data, overwrite)
    return {"user": user, "name": name, "sha256": sha, "file": str(dst)}


# ---------------------------------------------------------------- for protect and recover

def active_model(session, home: Path, keys: UserKeys) -> tuple[db.ModelRow, RGAN]:
    """The model `keys.user` protects with and its row (for the record). Call it in a transaction
    (`factory.begin()`): the shipped default's row is added if this agent ships a new one."""
    user_row = logged_user(session, keys.user)
    if user_row.active_model_id is None:
        # registered by `agent init`; only a newer shipped model needs its row written here
        row = _shipped_row(session, default_model_sha256()) or register_default_model(session)
        return row, pipeline.default_model()
    row = session.get(db.ModelRow, user_row.active_model_id)
    if row is None or row.user_id != user_row.id:
        raise ServiceError(f"the models table was modified: user {keys.user!r}'s active model is not "
                                   "theirs; run `agent models use default` or pick one of `agent models list`")
    return row, load_model(home, keys, row)


def active_model_info(session, user: str) -> dict[str, str]:
    """Name and SHA-256 of the model `user` protects with, without loading it (for a status)."""
    user_row = logged_user(session, user)
    row = None if user_row.active_model_id is None else session.get(db.ModelRow, user_row.active_model_id)
    if row is None:
        return {"name": DEFAULT, "sha256": default_model_sha256()}
    return {"name": row.name, "sha256": row.sha256}


def model_with_sha256(session, home: Path, keys: UserKeys, sha256: str) -> RGAN:
    """The model whose plaintext file has this SHA-256, as a protection record names it: the shipped
    default or one of `keys.user`'s own."""
    if sha256 == default_model_sha256():
        return pipeline.default_model()
    row = session.scalar(select(db.ModelRow).where(db.ModelRow.user_id == logged_user(session, keys.user).id,
                                                     db.ModelRow.sha256 == sha256))
    if row is None:
        raise ServiceError(f"the image was protected with a model user {keys.user!r} does not have here "
                                   f"(SHA-256 {sha256[:16]}…): import that model file with `agent models import "
                                   f"FILE --user {keys.user}`, or install the agent version that shipped it")
    return load_model(home, keys, row)


def load_model(home: Path, keys: UserKeys, row: db.ModelRow) -> RGAN:
    """Decrypts one of `keys.user`'s models, checks its SHA-256 and loads it from memory (once per
    process for the same plaintext: the service protects photo after photo with one model)."""
    return _loaded(_decrypt(home, keys, row), f"model {row.name!r}")


@functools.lru_cache(maxsize=4)
def _loaded(data: bytes, what: str) -> RGAN:
    return model_from_bytes(data, what)[0]


def model_from_bytes(data: bytes, what: str) -> tuple[RGAN, dict[str, Any]]:
    """A keyed photo model from the bytes of a model file (`rgan.model.model_from_bytes`, which
    checks everything), as a ServiceError that names `what` when it is not one."""
    try:
        model, extra = rgan_model_from_bytes(data)
    except ModelFileError as error:
        raise ServiceError(f"{what} {error}") from None
    if not model.config.keyed:
        raise ServiceError(f"{what} is an unkeyed model (like the CIFAR-10 reproduction): photos are "
                                   "protected with a user's key, so only keyed models can be used")
    return model, extra


# ---------------------------------------------------------------- helpers

def _report(report: Any) -> dict[str, Any]:
    """The report and a one-line summary of it for listings: what the model was trained on, for how
    long, and the figures measured (what a fine-tuning run records)."""
    facts = report if isinstance(report, dict) else {}
    config = facts.get("config") if isinstance(facts.get("config"), dict) else {}
    parts = [f"trained on {config['data']}"] if isinstance(config.get("data"), str) else []
    if type(facts.get("epochs")) is int:
        parts.append(f"{facts['epochs']} epochs")
    parts += [f"{name} {value:g}" for name, value in sorted(facts.items()) if type(value) is float]
    return {"report": facts or None, "summary": ", ".join(parts)}


def _read_model_file(src: Path) -> bytes:
    try:
        size = src.stat().st_size
        if src.is_dir():
            raise ServiceError(f"{src} is a folder, not a model file")
        if size > MAX_MODEL_BYTES:
            raise ServiceError(f"{src} is {size / 2**20:.0f} MiB: not a photo model (at most "
                                       f"{MAX_MODEL_BYTES // 2**20} MiB are read)")
        return src.read_bytes()
    except FileNotFoundError:
        raise ServiceError(f"{src}: no such file") from None
    except OSError as error:
        raise ServiceError(f"cannot read {src}: {error.strerror}") from None


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise ServiceError(f"invalid model name {name!r}: 1 to {MAX_NAME} printable characters")
    if name == DEFAULT:
        raise ServiceError(f"{DEFAULT!r} names the shipped model; choose another name with --name")
    return name


def _shipped_row(session, sha256: str) -> db.ModelRow | None:
    return session.scalar(select(db.ModelRow).where(db.ModelRow.user_id.is_(None), db.ModelRow.sha256 == sha256))


def _models_of(session, user_row: db.UserRow) -> list[db.ModelRow]:
    return list(session.scalars(select(db.ModelRow).where(db.ModelRow.user_id == user_row.id)
                                .order_by(db.ModelRow.id)))


def _resolve(session, user_row: db.UserRow, which: str) -> db.ModelRow | None:
    """The user's model called `which`, else the one whose SHA-256 starts with it; None: the
    shipped default (`default`, its file name, or its SHA-256)."""
    if which in (DEFAULT, DEFAULT_MODEL_NAME):
        return None
    owned = _models_of(session, user_row)
    named = [row for row in owned if row.name == which]
    if len(named) == 1:
        return named[0]
    prefix = which.lower()
    candidates: list[db.ModelRow | None] = []
    if _HEX_PREFIX.fullmatch(prefix):
        if default_model_sha256().startswith(prefix):
            candidates.append(None)
        candidates += [row for row in owned if row.sha256.startswith(prefix)]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        listed = ", ".join(f"{DEFAULT} ({default_model_sha256()[:12]})" if row is None
                           else f"{row.name} ({row.sha256[:12]})" for row in candidates)
        raise ServiceError(f"{which!r} matches several models: {listed}; use its name or more of the SHA-256")
    known = ", ".join([DEFAULT] + [row.name for row in owned])
    raise ServiceError(f"user {user_row.name!r} has no model named {which!r} or whose SHA-256 starts "
                               f"with it (models: {known}; see `agent models list`)")


def _describe(home: Path, user: str, row: db.ModelRow, active: bool) -> dict[str, Any]:
    path = models_dir(home) / row.file if row.file else None
    return {"name": row.name, "sha256": row.sha256, "owner": user, "active": active, "encrypted": row.encrypted,
            "created": row.created, "size": path.stat().st_size if path is not None and path.is_file() else None,
            "file": None if path is None else str(path), **_report(_row_report(row))}


def _row_report(row: db.ModelRow) -> Any:
    try:
        return json.loads(row.report) if row.report else None
    except ValueError:
        raise ServiceError(f"the models table was modified: the report of model {row.name!r} is not "
                                   "JSON; import the model again") from None


def _file_name(user: str, sha256: str) -> str:
    return f"{user}/{sha256}.enc"


def _aad(user: str, sha256: str) -> bytes:
    return b"\0".join((_AAD_LABEL, user.encode("ascii"), sha256.encode("ascii")))


def _decrypt(home: Path, keys: UserKeys, row: db.ModelRow) -> bytes:
    # the file name is derived, never taken from the table as given: an edited row must not be
    # able to point outside the models folder
    if row.file != _file_name(keys.user, row.sha256):
        raise ServiceError(f"model {row.name!r} is not user {keys.user!r}'s, or the models table was "
                                   "modified; see `agent models list`")
    path = models_dir(home) / row.file
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ServiceError(f"the file of model {row.name!r} ({path}) is missing: import the model again, "
                                   "or `agent models use default`") from None
    except OSError as error:
        raise ServiceError(f"cannot read {path}: {error.strerror}") from None
    try:
        data = keystore.decrypt_data(keys.data_key, blob, _aad(keys.user, row.sha256))
    except KeyStoreError:
        raise ServiceError(f"{path}: model {row.name!r} does not decrypt with user {keys.user!r}'s data "
                                   "key: the file was modified or belongs to another user; import the model "
                                   "again") from None
    if hashlib.sha256(data).hexdigest() != row.sha256:
        raise ServiceError(f"{path}: model {row.name!r} does not match its SHA-256; import the model again")
    return data


def _write_private(path: Path, data: bytes) -> None:
    """Atomically, 0600 in a 0700 folder: a user's models are theirs alone, like their keys."""
    try:
        for folder in (path.parent.parent, path.parent):
            folder.mkdir(mode=0o700, exist_ok=True)
            os.chmod(folder, 0o700)
        keystore.write_private(path, data, replace=True)
    except OSError as error:
        raise ServiceError(f"cannot write {path}: {error.strerror or error}") from None
