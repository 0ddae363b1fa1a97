"""Users and their keys: creating, listing, removing, backing up, importing and rotating them, on
the key store (agent/keys.py) and the log's users and keys tables."""

from __future__ import annotations

import base64
from pathlib import Path

from sqlalchemy import func, select

from .. import keys as keystore
from .. import store as db
from . import models
from .home import DEFAULT_USER, database, home_lock, key_store, resolve_user


def init_user(home: Path, user: str = DEFAULT_USER, passphrase: str = "", *, kdf_n: int | None = None) -> dict:
    """Creates `user` (key file under `home/keys`, users and keys rows in the log) and registers the
    shipped default model in the models table. `kdf_n`: scrypt cost, `keys.KDF_N` (2**17) unless
    given (tests use 2**14). Refuses an existing user."""
    home = Path(home)
    store = key_store(home)
    models.default_model_sha256()  # a missing shipped model is reported before any key is made
    with home_lock(home):
        created = keystore.create_user(store, user, passphrase, kdf_n=keystore.KDF_N if kdf_n is None else kdf_n)
        try:
            with database(home, create=True) as factory, factory.begin() as session:
                db.register_user(session, created)
                models.register_default_model(session)
        except BaseException:
            # the key file was made by this call and nothing was protected with it yet
            keystore.remove_user(store, user)
            raise
    return {**keystore.public_info(store, user), "home": str(home),
            "database": str(db.database_path(home))}


def add_user(home: Path, user: str, passphrase: str, *, kdf_n: int | None = None) -> dict:
    """Another user on this machine: its own keys and its own chain in the log."""
    return init_user(home, user, passphrase, kdf_n=kdf_n)


def remove_user(home: Path, user: str, passphrase: str) -> dict:
    """Deletes the user's key file (after checking the passphrase): images protected with its keys
    can no longer be recovered, unless a backup (`export_keys`) is imported again. The user's
    records stay in the log and still verify (against the public key the log holds)."""
    user = resolve_user(home, user)
    store = key_store(home)
    keystore.unlock(store, user, passphrase)
    with home_lock(home):
        info = keystore.public_info(store, user)
        keystore.remove_user(store, user)
    return info


def list_users(home: Path) -> list[dict]:
    """Every user with a key file: key ids, the active one, and how many records the log holds."""
    store = key_store(home)
    counts = record_counts(home)
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
    info = keystore.public_info(key_store(home), user)
    with database(home) as factory, factory() as session:
        logged = db.logged_public_key(session, user)
    warning = None
    if logged is not None and base64.b64decode(info["signing_public_key"]) != logged:
        warning = (f"the signing public key in the key file {info['file']} is not the one the log holds for "
                   f"{user!r}: one of them was altered; `agent log verify` says which signed the records, and "
                   "any command that unlocks the key file authenticates it")
    return {**info, "records": record_counts(home).get(user, 0), "warning": warning}


def export_keys(home: Path, user: str | None, passphrase: str, dst: Path, backup_passphrase: str) -> dict:
    """An encrypted backup of the user's keys in `dst` under `backup_passphrase`; never overwrites."""
    user = resolve_user(home, user)
    keystore.export_backup(key_store(home), user, passphrase, Path(dst), backup_passphrase)
    return {"user": user, "backup": str(dst)}


def import_keys(home: Path, src: Path, backup_passphrase: str, passphrase: str, user: str | None = None,
                *, replace: bool = False) -> dict:
    """Restores a backup as its own user (or as `user`) under `passphrase`, and registers it in the
    log. A user the log knows with another signing key is refused and the store left as it was."""
    home = Path(home)
    store = key_store(home)
    with home_lock(home):
        names_before = set(keystore.list_users(store))
        saved: dict[str, bytes] = {name: (store / f"{name}.key").read_bytes() for name in names_before} \
            if replace else {}
        imported = keystore.import_backup(store, Path(src), backup_passphrase, passphrase, user, replace=replace)
        try:
            with database(home, create=True) as factory, factory.begin() as session:
                db.register_user(session, imported)
                models.register_default_model(session)
        except BaseException:
            path = store / f"{imported.user}.key"
            if imported.user in saved:
                keystore.write_private(path, saved[imported.user], replace=True)
            elif imported.user not in names_before:
                path.unlink(missing_ok=True)
            raise
    return keystore.public_info(store, imported.user)


def rotate_key(home: Path, user: str | None, passphrase: str) -> dict:
    """A fresh active RGAN key; the older ones stay, so older images still recover."""
    home = Path(home)
    user = resolve_user(home, user)
    with home_lock(home):
        rotated = keystore.rotate(key_store(home), user, passphrase)
        with database(home, create=True) as factory, factory.begin() as session:
            db.register_user(session, rotated)
    return keystore.public_info(key_store(home), user)


def change_passphrase(home: Path, user: str | None, old: str, new: str) -> dict:
    home = Path(home)
    user = resolve_user(home, user)
    with home_lock(home):
        keystore.change_passphrase(key_store(home), user, old, new)
    return {"user": user}


def record_counts(home: Path) -> dict[str, int]:
    if not db.database_path(home).exists():
        return {}
    with database(home) as factory, factory() as session:
        rows = session.execute(select(db.UserRow.name, func.count(db.ProtectionRow.id))
                               .join(db.ProtectionRow, isouter=True).group_by(db.UserRow.name))
        return {name: count for name, count in rows}

