"""Pairing a browser extension with the local service (`agent serve`): one-time codes and tokens.

The flow: the user runs `agent pair`, which prints a short code; they type it into the extension,
which sends it to `POST /v1/pair` and gets a bearer token back, bound to the extension's origin
(`chrome-extension://<id>` or `moz-extension://<uuid>`). Every later request carries the token.

What is stored (tables `pairing_codes` and `tokens`, migration 0002) is only the SHA-256 of each
secret: a copy of the database gives neither a usable code nor a usable token. Both are long
enough that the hash needs no salt or stretching: a token is 256 random bits, and a code, which is
short enough to type (8 characters from a 31-letter alphabet, about 40 bits), lives 5 minutes and
dies with every other outstanding code after `MAX_FAILURES` wrong guesses (`FailureGuard`).

A token reads `<id>.<secret>`: the id (16 hex digits) is public, shown by `agent pair --list`,
used by `--revoke` and in the service's logs; it finds the row, and the secret's hash is then
compared in constant time. Codes are compared in constant time against every outstanding one.

Functions take the log's session factory (`store.open_database`) and run their own
transactions; `create_code_for`, `tokens_of` and `revoke` are the same for a home directory, as the
CLI calls them. Errors are `PairingError`s (a `ServiceError`, so the CLI shows them as one line),
whose `reason` is the word the service's API answers with.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from .. import store as db
from ..store import PairingCodeRow, TokenRow, UserRow
from .home import ServiceError, database, resolve_user, unlock

# no 0/O, 1/I/L: what is read off a terminal and typed into a browser must survive both
CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
CODE_LENGTH = 8
CODE_TTL = timedelta(minutes=5)
MAX_FAILURES = 5
TOKEN_ID_HEX = 16
# `last_used` is a hint for `agent pair --list`, not an audit trail: writing it at most once a
# minute keeps a busy extension from turning every request into a database write
LAST_USED_EVERY = timedelta(minutes=1)
MAX_LABEL = 200

# Chrome (and Edge, Brave...) extension ids are 32 letters a-p; Firefox gives each installation a
# random UUID. Anything else, a web page's http(s) origin, `null` or a file, is not an extension.
_EXTENSION_ORIGIN = re.compile(
    r"chrome-extension://[a-p]{32}|moz-extension://[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TOKEN_ID = re.compile(f"[0-9a-f]{{{TOKEN_ID_HEX}}}")


class PairingError(ServiceError):
    """A pairing or token problem. `reason`: unknown_user, bad_origin, bad_label, bad_code,
    codes_invalidated, bad_token, revoked, wrong_origin, unknown_token."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PairingCode:
    code: str  # as printed: ABCD-EFGH
    user: str
    expires: str  # UTC, the log's time format


@dataclass(frozen=True)
class TokenInfo:
    """A token's public facts (never its secret)."""

    id: str
    user: str
    origin: str | None
    label: str | None
    created: str
    last_used: str | None
    revoked: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class IssuedToken:
    token: str  # `<id>.<secret>`: shown once, to the extension that paired, and stored nowhere
    info: TokenInfo


class FailureGuard:
    """Counts wrong codes offered to `redeem_code` in one process (the service holds one guard).

    After `limit` failures every outstanding code is deleted, so a guesser gets `limit` tries per
    code the user prints rather than as many as fit in its five minutes; the user, whose code was
    caught in that, prints a new one. Thread-safe: the service redeems in worker threads."""

    def __init__(self, limit: int = MAX_FAILURES):
        if limit < 1:
            raise ValueError(f"the failure limit must be at least 1, got {limit}")
        self.limit = limit
        self._failures = 0
        self._lock = threading.Lock()

    def fail(self) -> bool:
        """Counts one failure; True when it reached the limit (and the count starts again)."""
        with self._lock:
            self._failures += 1
            if self._failures < self.limit:
                return False
            self._failures = 0
            return True


def is_extension_origin(origin: str | None) -> bool:
    return origin is not None and _EXTENSION_ORIGIN.fullmatch(origin) is not None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _normalise_code(code: str) -> str:
    # what a person types: any case, with or without the dash or spaces
    return re.sub(r"[\s-]", "", code).upper()


def _write(session: Session) -> None:
    """Takes the database's write lock at once (BEGIN IMMEDIATE), as every writer of the log does."""
    session.connection(execution_options=db.WRITE_OPTIONS)


def _now(now: datetime | None) -> datetime:
    moment = datetime.now(UTC) if now is None else now
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return moment


def _info(row: TokenRow, user: str) -> TokenInfo:
    return TokenInfo(row.id, user, row.origin, row.label, row.created, row.last_used, row.revoked)


# ---------------------------------------------------------------- codes

def create_code(factory: sessionmaker[Session], user: str, *, ttl: timedelta = CODE_TTL,
                now: datetime | None = None) -> PairingCode:
    """A fresh one-time code for `user` (who must be in the log), valid for `ttl`. Expired codes
    are cleared out on the way."""
    moment = _now(now)
    code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    with factory.begin() as session:
        _write(session)
        user_id = session.scalar(select(UserRow.id).where(UserRow.name == user))
        if user_id is None:
            raise PairingError(f"user {user!r} is not in the provenance log: run `agent init` first", "unknown_user")
        session.execute(delete(PairingCodeRow).where(PairingCodeRow.expires <= db.time_text(moment)))
        expires = db.time_text(moment + ttl)
        session.add(PairingCodeRow(user_id=user_id, code_hash=_digest(code), created=db.time_text(moment),
                                   expires=expires))
    half = CODE_LENGTH // 2
    return PairingCode(f"{code[:half]}-{code[half:]}", user, expires)


def redeem_code(factory: sessionmaker[Session], code: str, origin: str, *, user: str, guard: FailureGuard,
                label: str | None = None, now: datetime | None = None) -> IssuedToken:
    """Exchanges an outstanding, unexpired code of `user` for a token bound to `origin` (an
    extension's); the code is used up. A wrong, expired or used code counts against `guard`."""
    if not is_extension_origin(origin):
        raise PairingError("pairing is only for a browser extension (origin chrome-extension://<id> or "
                           "moz-extension://<uuid>)", "bad_origin")
    if label is not None and (not isinstance(label, str) or len(label) > MAX_LABEL or not label.isprintable()):
        raise PairingError(f"the label must be printable text of at most {MAX_LABEL} characters", "bad_label")
    moment = _now(now)
    digest = _digest(_normalise_code(code)) if isinstance(code, str) else ""
    with factory.begin() as session:
        _write(session)
        rows = session.execute(select(PairingCodeRow, UserRow.name).join(UserRow, PairingCodeRow.user_id == UserRow.id)
                               .where(PairingCodeRow.expires > db.time_text(moment))).all()
        found = None
        for row, owner in rows:  # every one compared, so the time taken says nothing about which
            if hmac.compare_digest(row.code_hash, digest) and owner == user:
                found = row
        if found is None:
            invalidated = guard.fail()
            if invalidated:
                session.execute(delete(PairingCodeRow))
        else:
            session.delete(found)
            token_id = secrets.token_hex(TOKEN_ID_HEX // 2)
            token = f"{token_id}.{secrets.token_urlsafe(32)}"
            row = TokenRow(id=token_id, user_id=found.user_id, token_hash=_digest(token), origin=origin,
                           label=label, created=db.time_text(moment), last_used=None, revoked=None)
            session.add(row)
            return IssuedToken(token, _info(row, user))
    if invalidated:
        raise PairingError(f"{guard.limit} wrong pairing codes: every outstanding code was cancelled; "
                           "run `agent pair` for a new one", "codes_invalidated")
    raise PairingError("wrong or expired pairing code: check it, or run `agent pair` for a new one", "bad_code")


# ---------------------------------------------------------------- tokens

def verify_token(factory: sessionmaker[Session], token: str, origin: str | None, *,
                 now: datetime | None = None) -> TokenInfo:
    """The token's facts if it is live and, when the request has an `origin`, bound to it; its
    `last_used` is brought up to date (at most once a minute)."""
    token_id, dot, _ = token.partition(".") if isinstance(token, str) else ("", "", "")
    if not dot or not _TOKEN_ID.fullmatch(token_id):
        raise PairingError("not a token of this agent: pair the extension again", "bad_token")
    moment = _now(now)
    with factory() as session:
        found = session.execute(select(TokenRow, UserRow.name).join(UserRow, TokenRow.user_id == UserRow.id)
                                .where(TokenRow.id == token_id)).first()
    if found is None or not hmac.compare_digest(found[0].token_hash, _digest(token)):
        raise PairingError("unknown token: pair the extension again", "bad_token")
    row, user = found
    if row.revoked is not None:
        raise PairingError(f"token {row.id} was revoked on {row.revoked}: pair the extension again", "revoked")
    if origin is not None and origin != row.origin:
        raise PairingError(f"token {row.id} was paired with another extension; this one must pair itself",
                           "wrong_origin")
    if row.last_used is None or row.last_used <= db.time_text(moment - LAST_USED_EVERY):
        row.last_used = db.time_text(moment)
        with factory.begin() as session:  # a write transaction of its own, begun with the write lock
            _write(session)
            session.execute(update(TokenRow).where(TokenRow.id == row.id).values(last_used=row.last_used))
    return _info(row, user)


def list_tokens(factory: sessionmaker[Session], user: str | None = None) -> list[TokenInfo]:
    """Every token (revoked ones too), oldest first; of one user if given."""
    with factory() as session:
        query = select(TokenRow, UserRow.name).join(UserRow, TokenRow.user_id == UserRow.id)
        if user is not None:
            query = query.where(UserRow.name == user)
        return [_info(row, name) for row, name in session.execute(query.order_by(TokenRow.created, TokenRow.id))]


def paired_origins(factory: sessionmaker[Session], user: str) -> set[str]:
    """The extension origins holding a live token of `user`."""
    with factory() as session:
        return set(session.scalars(select(TokenRow.origin).join(UserRow, TokenRow.user_id == UserRow.id)
                                   .where(UserRow.name == user, TokenRow.revoked.is_(None),
                                          TokenRow.origin.is_not(None))))


def revoke_token(factory: sessionmaker[Session], token_id: str, *, now: datetime | None = None) -> TokenInfo:
    """Revokes a token by its id; at once for a running service, which checks every request. A
    token already revoked stays as it was."""
    moment = _now(now)
    with factory.begin() as session:
        _write(session)
        found = session.execute(select(TokenRow, UserRow.name).join(UserRow, TokenRow.user_id == UserRow.id)
                                .where(TokenRow.id == token_id)).first()
        if found is None:
            raise PairingError(f"no token {token_id!r}: `agent pair --list` shows the ids", "unknown_token")
        row, user = found
        if row.revoked is None:
            row.revoked = db.time_text(moment)
        return _info(row, user)


# ---------------------------------------------------------------- the same, for a home directory

def create_code_for(home: Path, user: str | None, passphrase: str) -> PairingCode:
    """A code for `user` (resolved as the CLI does). The passphrase is checked first: a token lets
    an extension use the user's unlocked key and read their decrypted log, so handing one out asks
    for what unlocking asks for."""
    user = resolve_user(home, user)
    unlock(home, user, passphrase)
    with database(home) as factory:
        return create_code(factory, user)


def tokens_of(home: Path, user: str | None = None) -> list[TokenInfo]:
    with database(home) as factory:
        return list_tokens(factory, user)


def revoke(home: Path, token_id: str) -> TokenInfo:
    with database(home) as factory:
        return revoke_token(factory, token_id)


__all__ = [
    "CODE_TTL", "MAX_FAILURES", "FailureGuard", "IssuedToken", "PairingCode", "PairingError", "TokenInfo",
    "create_code", "create_code_for", "is_extension_origin", "list_tokens", "paired_origins", "redeem_code",
    "revoke", "revoke_token", "tokens_of", "verify_token",
]
