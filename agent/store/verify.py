"""Verifying the provenance log: every record's hash and signature and every link of each user's
chain, with what is altered, inserted, removed or forked named (records/README.md, "The chain"),
and the chain heads to keep outside the database as anchors."""

from __future__ import annotations

import base64
import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import keys as keystore
from ..keys import UserKeys
from .records import record_body, record_hash, signed_message
from .schema import ProtectionRow, UserRow


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
    given); names each altered, inserted and removed record (see records/README.md, "The chain", for
    what each means and what cannot be told without `anchors`, earlier `chain_head` results kept
    outside the database).

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


# ---------------------------------------------------------------- one user's chain

def _check_chain(user: UserRow, rows: list[ProtectionRow], public_key: bytes,
                 anchor: ChainHead | None) -> tuple[list[Problem], ChainHead | None]:
    """What is wrong with one user's chain (`rows`, in `seq` order, judged against `public_key`),
    and its newest authentic record."""
    name = user.name
    verifier = _verifier(public_key)
    faults = {row.id: _fault(row, name, verifier) for row in rows}
    authentic = [r for r in rows if faults[r.id] is None]
    slots, problems = _place_authentic(name, authentic)
    end = _signed_end(slots, rows)
    slots, misplaced = _place_faulty(name, rows, faults, slots, end)
    problems += misplaced
    problems += _broken_links(name, slots, faults)
    problems += _missing(user, rows, slots, end, anchor)
    problems += _anchor_mismatch(name, slots, faults, anchor)
    problems.sort(key=lambda p: (p.seq if p.seq is not None else -1, p.kind))
    return problems, _newest(name, authentic)


def _verifier(public_key: bytes) -> Ed25519PublicKey | None:
    """The key that checks signatures, or None if `public_key` is not a valid Ed25519 public key."""
    try:
        return Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        return None


def _fault(row: ProtectionRow, user: str, verifier: Ed25519PublicKey | None) -> str | None:
    """None if the record is authentic (its hash matches its content and `verifier` accepts its
    signature), else what is wrong with it."""
    try:
        body = record_body(row, user)
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
        return f"its signature does not verify with the public key of {user!r}"
    return None


def _place_authentic(user: str, authentic: list[ProtectionRow]) -> tuple[dict[int, ProtectionRow], list[Problem]]:
    """The places (seq -> record) the authentic records hold, the first one at each place winning,
    and a fork for each further authentic record at a place already held."""
    slots: dict[int, ProtectionRow] = {}
    problems: list[Problem] = []
    for row in authentic:
        if not isinstance(row.seq, int):
            continue
        if row.seq in slots:
            problems.append(Problem("fork", user, row.seq, row.id, f"a second authentic record at #{row.seq} "
                                    f"(besides {slots[row.seq].id}): two chains were written under one key"))
        else:
            slots[row.seq] = row
    return slots, problems


def _signed_end(slots: Mapping[int, ProtectionRow], rows: list[ProtectionRow]) -> int:
    """How far the signed chain reaches: the newest authentic record's place; if nothing verifies
    (the wrong key, or every record rewritten), the newest record's, so each record keeps its place."""
    if slots:
        return max(slots)
    return max((r.seq for r in rows if isinstance(r.seq, int)), default=0)


def _place_faulty(user: str, rows: list[ProtectionRow], faults: Mapping[str, str | None],
                  slots: Mapping[int, ProtectionRow], end: int) -> tuple[dict[int, ProtectionRow], list[Problem]]:
    """Each record that fails its check, named altered (it sits in a place of the chain, which it
    takes in the places returned) or inserted (it has none). Records whose stored hash an authentic
    successor links to, or that kept their hash, claim a place before the others."""
    slots = dict(slots)
    problems: list[Problem] = []
    linked_hashes = {r.prev_hash for r in rows if faults[r.id] is None and r.prev_hash}
    invalid = sorted((r for r in rows if faults[r.id] is not None),
                     key=lambda r: (r.record_hash not in linked_hashes, faults[r.id] != "its content does not "
                                    "match its hash", str(r.seq), r.id))
    for row in invalid:
        fault = faults[row.id]
        seq = row.seq if isinstance(row.seq, int) else None
        if seq is None or seq < 1:
            problems.append(Problem("inserted", user, None, row.id, f"{fault}, and its sequence number "
                                    f"{row.seq!r} has no place in a chain"))
        elif seq in slots:
            holder = slots[seq]
            problems.append(Problem("inserted", user, seq, row.id, f"{fault}; #{seq} is held by record "
                                    f"{holder.id}" + ("" if faults[holder.id] is None else " (itself altered)")))
        elif seq <= end or row.record_hash in linked_hashes or fault.startswith("its content"):
            slots[seq] = row
            problems.append(Problem("altered", user, seq, row.id, fault))
        else:
            problems.append(Problem("inserted", user, seq, row.id, f"{fault}, past the end of the signed chain "
                                    "(or the newest record altered with its hash recomputed: at the end of "
                                    "a chain the two look alike)"))
    return slots, problems


def _broken_links(user: str, slots: Mapping[int, ProtectionRow], faults: Mapping[str, str | None]) -> list[Problem]:
    """Forks in the links between authentic neighbours (only the key holder could break one)."""
    problems: list[Problem] = []
    for seq, row in sorted(slots.items()):
        if faults[row.id] is not None:
            continue
        before = slots.get(seq - 1)
        if before is not None and faults[before.id] is None and row.prev_hash != before.record_hash:
            problems.append(Problem("fork", user, seq, row.id, f"links to {str(row.prev_hash)[:16]}…, not to "
                                    f"#{seq - 1} ({before.id}): two chains were written under one key"))
        if seq == 1 and row.prev_hash is not None:
            problems.append(Problem("fork", user, 1, row.id, "the first record links to an earlier one"))
    return problems


def _missing(user: UserRow, rows: list[ProtectionRow], slots: Mapping[int, ProtectionRow], end: int,
             anchor: ChainHead | None) -> list[Problem]:
    """Removed records: places no record holds, up to the newest authentic record (an altered row
    that claims a place further on says nothing about what is missing), the users table's head and
    the anchor."""
    reasons = {}
    if (user.head_seq or 0) > end:
        reasons[user.head_seq] = f"the users table says the chain reached #{user.head_seq}"
    if anchor is not None and anchor.seq > end:
        reasons[anchor.seq] = f"the anchor says the chain reached #{anchor.seq}"
    by_hash = {r.record_hash: r for r in rows}
    problems: list[Problem] = []
    for start, stop in _gaps(slots, max([end, *reasons])):
        successor = slots.get(stop + 1)
        if successor is not None:
            detail = f"missing: record {successor.id} (#{stop + 1}) links to {str(successor.prev_hash)[:16]}…, "
            moved = by_hash.get(successor.prev_hash)
            detail += (f"which record {moved.id} holds, moved to #{moved.seq}" if moved is not None
                       else "which is not in the log")
        else:
            detail = "missing at the end of the chain: " + "; ".join(
                text for reach, text in sorted(reasons.items()) if reach >= start)
        problems.append(Problem("removed", user.name, start, None, detail, seq_end=stop))
    return problems


def _gaps(slots: Mapping[int, ProtectionRow], limit: int) -> Iterator[tuple[int, int]]:
    """Each run `start`..`stop` of places from 1 to `limit` that `slots` does not hold."""
    seq = 1
    while seq <= limit:
        if seq in slots:
            seq += 1
            continue
        start = seq
        while seq <= limit and seq not in slots:
            seq += 1
        yield start, seq - 1


def _anchor_mismatch(user: str, slots: Mapping[int, ProtectionRow], faults: Mapping[str, str | None],
                     anchor: ChainHead | None) -> list[Problem]:
    """A fork if an authentic record holds the anchored place but is not the anchored record."""
    if anchor is None:
        return []
    held = slots.get(anchor.seq)
    if held is not None and faults[held.id] is None and held.record_hash != anchor.record_hash:
        return [Problem("fork", user, anchor.seq, held.id, "is not the record anchored at this place "
                        f"({anchor.record_hash[:16]}…): the log was rebuilt or replaced")]
    return []


def _newest(user: str, authentic: list[ProtectionRow]) -> ChainHead | None:
    """The chain's head: its authentic record with the highest sequence number."""
    head_row = max(authentic, key=lambda r: r.seq if isinstance(r.seq, int) else -1, default=None)
    return ChainHead(user, head_row.seq, head_row.record_hash, head_row.time) if head_row is not None else None
