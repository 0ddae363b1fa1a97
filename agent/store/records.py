"""Records of the provenance log: registering users and models, appending a signed record to a
user's chain (canonical form, hash, signature, the fields sealed with the data key), and reading
records back. The format is specified in records/README.md."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .. import keys as keystore
from ..keys import KeyStoreError, UserKeys
from .engine import begin_write, session_timeout, time_text, translate_errors, utc_now
from .errors import ProvenanceError
from .phash import PHASH_MAX_DISTANCE, perceptual_hash
from .schema import KeyRow, ModelRow, ProtectionRow, UserRow

RECORD_FORMAT = "rgan-agent/provenance-record"
RECORD_VERSION = 1
SOURCES = ("cli", "extension")

_AAD_LABEL = b"rgan-agent/provenance v1"
_HEX64 = frozenset("0123456789abcdef")


# ---------------------------------------------------------------- users, keys and models

def register_user(session: Session, keys: UserKeys) -> UserRow:
    """Adds the user (public key) and the public parts of its RGAN keys, or brings them up to date
    (new keys after a rotation, the active flag). A user already known with another signing key is
    refused: its records would no longer verify. Takes the write lock (see `record_protection`)."""
    with translate_errors("registering a user", session_timeout(session)):
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
    with translate_errors("registering a model", session_timeout(session)):
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

    timeout = session_timeout(session)
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
    """Every field of the record except `record_hash` and `signature` (records/README.md, "A record")."""
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


# ---------------------------------------------------------------- small helpers

def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


def _check_hex(text: Any, digits: int, what: str) -> str:
    if not isinstance(text, str) or len(text) != digits or not set(text) <= _HEX64:
        raise ValueError(f"{what} must be {digits} lowercase hex digits, got {text!r}")
    return text
