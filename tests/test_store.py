"""The provenance store (agent/store/): schema and migrations, records and look-ups, encryption at
rest, the signed hash chain and what `verify_chain` names, the canonical form's known answer
(records/README.md), locking."""

import base64
import dataclasses
import hashlib
import io
import json
import os
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image
from sqlalchemy import inspect, text

from agent import store as db
from agent.keys import create_user
from agent.pipeline import ProtectInfo

NAME = "holiday-secret-7f3a9c.png"
SITE = "https://private-album.example.org"


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    store = tmp_path_factory.mktemp("keys")
    return {name: create_user(store, name, "correct horse", kdf_n=2**14) for name in ("alice", "bob")}


@pytest.fixture
def factory(tmp_path):
    made = db.open_database(tmp_path / "log.sqlite3", timeout=2.0)
    yield made
    made.kw["bind"].dispose()


@pytest.fixture(scope="module")
def photo():
    """(original bytes, 'protected' bytes, ProtectInfo): the sample photo and a copy with a small
    perturbation, as the pipeline would write it."""
    original = SAMPLE.read_bytes()
    pixels = np.asarray(Image.open(SAMPLE).convert("RGB")).astype(np.int16)
    noise = np.random.default_rng(0).integers(-3, 4, pixels.shape)
    protected = _png(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    size = Image.open(SAMPLE).size
    return original, protected, ProtectInfo(original_size=size, working_size=size, mode="RGB", bit_depth=8)


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _record(session, keys, photo, *, n=0, **extra):
    original, protected, info = photo
    model = db.register_model(session, "photo-rgan", "ab" * 32)
    return db.record_protection(
        session, keys, original=original + bytes([n]) if n else original, protected=protected, info=info,
        model=model, file_name=NAME, site=SITE, params={"strength": "medium", "max_side": 2048},
        psnr=38.25, self_check_asr=0.875, **extra)


def _chain(factory, keys, photo, count):
    ids = []
    for n in range(count):
        with factory.begin() as session:
            ids.append(_record(session, keys, photo, n=n).id)
    return ids


def _raw(factory, sql, **params):
    with factory.kw["bind"].begin() as connection:
        connection.execute(text(sql), params)


def _verify(factory, users):
    with factory() as session:
        return db.verify_chain(session, {u.user: u.public_key_bytes for u in users.values()})


# ---------------------------------------------------------------- schema


def test_reopening_an_open_database_never_touches_its_file_outside_sqlite(tmp_path, monkeypatch):
    """Closing any descriptor of a SQLite file drops all of this process's POSIX locks on it; the
    service keeps one engine open while each request opens the log again, so a stray open/close
    let another process checkpoint the WAL under it (a corrupt database, seen in the browser tests)."""
    path = tmp_path / "log.db"
    first = db.open_database(path)
    opened = []
    real_open = os.open

    def recording_open(file, *args, **kwargs):
        fd = real_open(file, *args, **kwargs)
        opened.append(Path(file))
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    with first() as session:
        session.execute(text("SELECT 1 FROM users"))
        second = db.open_database(path)
        second.kw["bind"].dispose()
    first.kw["bind"].dispose()
    assert path not in opened


def test_migrations_create_the_schema_once_and_wal_is_on(tmp_path, users, photo):
    path = tmp_path / "fresh.sqlite3"
    first = db.open_database(path)
    engine = first.kw["bind"]
    names = set(inspect(engine).get_table_names())
    assert {"users", "keys", "models", "protections", "pairing_codes", "tokens", "alembic_version"} <= names
    with first.begin() as session:
        _record(session, users["alice"], photo)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        version = connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    engine.dispose()
    assert (path.stat().st_mode & 0o777) == 0o600

    again = db.open_database(path)  # already at head: a no-op that keeps the data
    with again() as session:
        assert session.scalar(text("SELECT version_num FROM alembic_version")) == version == "0003"
        assert len(db.list_records(session)) == 1
    again.kw["bind"].dispose()


def test_the_migrations_match_the_models(factory):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with factory.kw["bind"].connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, db.Base.metadata) == []


def test_a_database_from_a_newer_agent_is_refused(tmp_path):
    path = tmp_path / "newer.sqlite3"
    db.open_database(path).kw["bind"].dispose()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999_future'")
    with pytest.raises(db.ProvenanceError, match="newer agent"):
        db.open_database(path)


def test_a_file_that_is_not_a_database_is_refused_clearly(tmp_path):
    path = tmp_path / "photo.jpg.sqlite3"
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 16)
    with pytest.raises(db.ProvenanceError, match="not a database.*restore it from a backup"):
        db.open_database(path)


# ---------------------------------------------------------------- records and look-ups


def test_record_and_find_by_hash_and_by_perceptual_hash(factory, users, photo):
    original, protected, info = photo
    alice = users["alice"]
    with factory.begin() as session:
        record = _record(session, alice, photo)
    assert (record.user, record.seq, record.prev_hash, record.source) == ("alice", 1, None, "cli")
    assert record.rgan_key_id == alice.active_rgan_key.key_id
    assert record.original_size == record.working_size == info.original_size
    assert ProtectInfo.from_dict(record.params["protect_info"]) == info
    assert record.params["strength"] == "medium" and (record.psnr, record.self_check_asr) == (38.25, 0.875)

    with factory() as session:
        by_protected = db.find_by_sha256(session, hashlib.sha256(protected).hexdigest())
        by_original = db.find_by_sha256(session, hashlib.sha256(original).digest(), original=True)
        assert [r.id for r in by_protected] == [r.id for r in by_original] == [record.id]
        assert db.find_by_sha256(session, hashlib.sha256(original).hexdigest()) == []  # not a protected file

        # what a platform serves: downscaled and recompressed as JPEG
        copy = Image.open(io.BytesIO(protected)).convert("RGB")
        copy = copy.resize((copy.width // 2, copy.height // 2), Image.BILINEAR)
        served = io.BytesIO()
        copy.save(served, "JPEG", quality=70)
        assert hashlib.sha256(served.getvalue()).hexdigest() != record.protected_sha256
        found = db.find_by_phash(session, db.perceptual_hash(served.getvalue()))
        assert [r.id for _, r in found] == [record.id]
        assert found[0][0] <= 4

        # another picture (the photo upside down) is far away
        other = db.perceptual_hash(np.ascontiguousarray(np.asarray(copy)[::-1]))
        assert db.find_by_phash(session, other) == []
        assert bin(int(other, 16) ^ int(record.phash, 16)).count("1") > 2 * db.PHASH_MAX_DISTANCE


def test_recording_inside_a_transaction_that_already_read(factory, users, photo):
    with factory() as session:  # a DEFERRED transaction that has read: the write lock is taken on top
        assert db.list_records(session) == []
        assert _record(session, users["alice"], photo).seq == 1
        session.commit()
    with factory() as session:
        db.list_records(session)  # its snapshot predates the next commit...
        with factory.begin() as other:
            _record(other, users["bob"], photo)
        with pytest.raises(db.DatabaseLockedError, match="fresh session"):  # ...so it must start over
            _record(session, users["alice"], photo, n=1)
    assert _verify(factory, users).ok


def test_perceptual_hash_inputs_agree(photo):
    pixels = np.asarray(Image.open(io.BytesIO(photo[1])).convert("RGB"))
    expected = db.perceptual_hash(photo[1])
    assert db.perceptual_hash(pixels) == db.perceptual_hash(pixels.astype(np.uint16) * 257) == expected
    assert db.perceptual_hash(Image.fromarray(pixels)) == expected
    with pytest.raises(db.ProvenanceError, match="cannot read the image"):
        db.perceptual_hash(b"not an image")


def test_list_records_filters_by_user_and_time_and_decrypts_with_the_data_key(factory, users, photo):
    alice, bob = users["alice"], users["bob"]
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    with factory.begin() as session:
        _record(session, alice, photo, now=start)
        _record(session, bob, photo, n=1, now=start + timedelta(hours=1))
        _record(session, alice, photo, n=2, now=start + timedelta(hours=2))
    with factory() as session:
        everything = db.list_records(session)
        assert [(r.user, r.seq) for r in everything] == [("alice", 1), ("bob", 1), ("alice", 2)]
        assert all(r.file_name is None and not r.decrypted for r in everything)
        assert [r.seq for r in db.list_records(session, user="alice")] == [1, 2]
        later = db.list_records(session, since=start + timedelta(minutes=30), keys=[alice])
        assert [(r.user, r.decrypted, r.file_name, r.site) for r in later] == [
            ("bob", False, None, None), ("alice", True, NAME, SITE)]
        json.dumps([r.to_dict() for r in later])  # --json ready
        with pytest.raises(ValueError, match="timezone"):
            db.list_records(session, since=datetime(2025, 1, 1))


def test_names_and_sites_are_encrypted_at_rest(factory, users, photo, tmp_path):
    alice = users["alice"]
    with factory.begin() as session:
        first = _record(session, alice, photo)
        second = _record(session, alice, photo, n=1)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("log.sqlite3*"))  # the file, its WAL and index
    assert first.protected_sha256.encode() in raw  # the records are there...
    for secret in (NAME, SITE, "holiday", "private-album"):  # ...but not the names
        assert secret.encode() not in raw and secret.encode("utf-16-le") not in raw

    assert db.decrypt_record(first, alice).file_name == NAME
    wrong_data_key = dataclasses.replace(alice, data_key=os.urandom(32))
    with pytest.raises(db.ProvenanceError, match="does not decrypt"):
        db.decrypt_record(first, wrong_data_key)
    with pytest.raises(db.ProvenanceError, match="belongs to user 'alice'"):
        db.decrypt_record(first, users["bob"])

    # a ciphertext moved to another record does not decrypt there (the record id is bound in)
    _raw(factory, "UPDATE protections SET file_name_enc = (SELECT file_name_enc FROM protections "
                  "WHERE id = :a) WHERE id = :b", a=first.id, b=second.id)
    with factory() as session:
        moved = db.find_by_sha256(session, second.original_sha256, original=True)[0]
        with pytest.raises(db.ProvenanceError, match="does not decrypt"):
            db.decrypt_record(moved, alice)
    assert [p.record_id for p in _verify(factory, users).altered] == [second.id]


# ---------------------------------------------------------------- the chain


def test_an_untouched_log_verifies(factory, users, photo):
    alice_ids = _chain(factory, users["alice"], photo, 3)
    _chain(factory, users["bob"], photo, 2)
    report = _verify(factory, users)
    assert report.ok, str(report)
    assert report.records == 5 and report.keys_from_database == ()
    with factory() as session:
        heads = db.chain_head(session)
        last = db.find_by_sha256(session, hashlib.sha256(photo[0] + b"\x02").hexdigest(), original=True)[0]
        assert [r.prev_hash for r in db.list_records(session, user="alice")][1:] == [
            r.record_hash for r in db.list_records(session, user="alice")][:2]
    assert heads["alice"].seq == 3
    assert heads["alice"].record_hash == last.record_hash == report.heads["alice"].record_hash
    assert last.id == alice_ids[-1] and heads["bob"].seq == 2
    json.dumps(report.to_dict())

    with factory() as session:  # without trusted keys: the database's own, and the report says so
        assert db.verify_chain(session).keys_from_database == ("alice", "bob")


@pytest.mark.parametrize("recompute_hash", [False, True])
def test_an_altered_record_is_named(factory, users, photo, recompute_hash):
    ids = _chain(factory, users["alice"], photo, 4)
    _raw(factory, "UPDATE protections SET psnr = 45.0 WHERE id = :id", id=ids[1])
    if recompute_hash:  # the attacker also fixes the (unkeyed) hash; the signature still fails
        with factory() as session:
            row = session.get(db.ProtectionRow, ids[1])
            fixed = db.record_hash(db.record_body(row, "alice"))
        _raw(factory, "UPDATE protections SET record_hash = :h WHERE id = :id", h=fixed, id=ids[1])
    report = _verify(factory, users)
    assert [(p.kind, p.seq, p.record_id) for p in report.problems] == [("altered", 2, ids[1])], str(report)
    assert ("signature does not verify" if recompute_hash else "does not match its hash") in report.problems[0].detail


def _forge(factory, users, after_id, seq, signer):
    """A forged record that claims to follow `after_id`, hashed and signed with the attacker's key."""
    with factory() as session:
        row = session.get(db.ProtectionRow, after_id)
        forged = db.ProtectionRow(**{c.key: getattr(row, c.key) for c in db.ProtectionRow.__table__.columns})
        forged.id, forged.seq, forged.prev_hash = "f" * 32, seq, row.record_hash
        forged.protected_sha256 = hashlib.sha256(b"someone else's photo").hexdigest()
        body = db.record_body(forged, "alice")
        forged.record_hash = db.record_hash(body)
        forged.signature = signer.signing_key.sign(db.signed_message(body, forged.record_hash))
        values = {c.key: getattr(forged, c.key) for c in db.ProtectionRow.__table__.columns}
    columns = ", ".join(values)
    _raw(factory, f"INSERT INTO protections ({columns}) VALUES ({', '.join(':' + c for c in values)})", **values)
    return forged.id


def test_a_record_inserted_in_the_middle_is_named(factory, users, photo):
    ids = _chain(factory, users["alice"], photo, 4)
    # the attacker rebuilds the table without the uniqueness of (user, seq) to squeeze a record in
    with sqlite3.connect(factory.kw["bind"].url.database) as connection:
        connection.executescript("CREATE TABLE copy AS SELECT * FROM protections; DROP TABLE protections; "
                                 "ALTER TABLE copy RENAME TO protections;")
    forged = _forge(factory, users, ids[0], 2, users["bob"])
    report = _verify(factory, users)
    assert [(p.kind, p.seq, p.record_id) for p in report.problems] == [("inserted", 2, forged)], str(report)


def test_a_record_appended_by_someone_else_is_named(factory, users, photo):
    ids = _chain(factory, users["alice"], photo, 3)
    forged = _forge(factory, users, ids[-1], 4, users["bob"])
    report = _verify(factory, users)
    assert [(p.kind, p.seq, p.record_id) for p in report.problems] == [("inserted", 4, forged)], str(report)
    assert report.heads["alice"].record_hash != forged  # the head is the last authentic record
    assert report.heads["alice"].seq == 3


def test_a_record_deleted_from_the_middle_is_named(factory, users, photo):
    ids = _chain(factory, users["alice"], photo, 4)
    _chain(factory, users["bob"], photo, 2)
    with factory() as session:
        deleted_hash = session.get(db.ProtectionRow, ids[1]).record_hash
    _raw(factory, "DELETE FROM protections WHERE id = :id", id=ids[1])
    report = _verify(factory, users)
    assert [(p.kind, p.user, p.seq, p.seq_end) for p in report.problems] == [("removed", "alice", 2, 2)], str(report)
    assert ids[2] in report.problems[0].detail and deleted_hash[:16] in report.problems[0].detail

    # the next append continues the chain; the gap stays visible
    _chain(factory, users["alice"], photo, 1)
    assert [(p.kind, p.seq) for p in _verify(factory, users).problems] == [("removed", 2)]


def test_truncation_is_caught_by_the_head_tripwire_and_by_an_anchor(factory, users, photo):
    ids = _chain(factory, users["alice"], photo, 4)
    with factory() as session:
        anchor = db.chain_head(session)
    _raw(factory, "DELETE FROM protections WHERE id = :id", id=ids[-1])
    report = _verify(factory, users)  # careless: the users table still says #4
    assert [(p.kind, p.seq, p.seq_end) for p in report.problems] == [("removed", 4, 4)], str(report)

    # careful: the head is rewound too; only the anchor kept outside the database tells
    with factory() as session:
        previous = session.get(db.ProtectionRow, ids[2]).record_hash
    _raw(factory, "UPDATE users SET head_seq = 3, head_hash = :h WHERE name = 'alice'", h=previous)
    assert _verify(factory, users).ok
    with factory() as session:
        anchored = db.verify_chain(session, [users["alice"], users["bob"]], anchors=anchor)
    assert [(p.kind, p.seq) for p in anchored.problems] == [("removed", 4)], str(anchored)


def test_the_wrong_public_key_fails_every_record(factory, users, photo):
    _chain(factory, users["alice"], photo, 2)
    _chain(factory, users["bob"], photo, 1)
    with factory() as session:
        report = db.verify_chain(session, {"alice": users["bob"].public_key_bytes})
    assert [p.kind for p in report.problems] == ["key", "altered", "altered"]
    assert report.keys_from_database == ("bob",)


def test_concurrent_appends_are_serialised(factory, users, photo):
    errors = []

    def append(n0):
        try:
            for n in range(n0, n0 + 4):
                with factory.begin() as session:
                    _record(session, users["alice"], photo, n=n)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=append, args=(n0,)) for n0 in (10, 20, 30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    report = _verify(factory, users)
    assert report.ok and report.heads["alice"].seq == 12, str(report)


def test_a_locked_database_waits_then_fails_clearly(tmp_path, users, photo):
    path = tmp_path / "locked.sqlite3"
    db.open_database(path).kw["bind"].dispose()
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    factory = db.open_database(path, timeout=0.3)  # reading the schema version is not blocked
    try:
        started = time.monotonic()
        with pytest.raises(db.DatabaseLockedError, match="locked by another process"):
            with factory.begin() as session:
                _record(session, users["alice"], photo)
        assert 0.25 < time.monotonic() - started < 5

        # a holder that lets go within the timeout is waited for
        patient = db.open_database(path, timeout=10)
        threading.Timer(0.3, holder.rollback).start()
        with patient.begin() as session:
            assert _record(session, users["alice"], photo).seq == 1
        patient.kw["bind"].dispose()
    finally:
        holder.close()
        factory.kw["bind"].dispose()


# ---------------------------------------------------------------- the canonical form


KAT_BODY = {
    "format": "rgan-agent/provenance-record", "version": 1,
    "id": "00112233445566778899aabbccddeeff", "user": "alice", "seq": 2,
    "time": "2025-01-31T23:59:59.123456Z", "source": "extension",
    "file_name_enc": "AQID", "site_enc": None,
    "original_sha256": "11" * 32, "protected_sha256": "22" * 32, "phash": "c3c3a5a55a5a3c3c",
    "original_width": 4032, "original_height": 3024, "working_width": 2048, "working_height": 1536,
    "model_id": 1, "model_sha256": "33" * 32, "rgan_key_id": "0123456789abcdef",
    "params": '{"strength":"medium","caf\\u00e9":0.5}', "psnr": 38.125, "self_check_asr": 0.1,
    "prev_hash": "44" * 32,
}
KAT_CANONICAL = (
    '{"file_name_enc":"AQID","format":"rgan-agent/provenance-record","id":"00112233445566778899aabbccddeeff",'
    '"model_id":1,"model_sha256":"' + "33" * 32 + '","original_height":3024,"original_sha256":"' + "11" * 32
    + '","original_width":4032,"params":"{\\"strength\\":\\"medium\\",\\"caf\\\\u00e9\\":0.5}",'
    '"phash":"c3c3a5a55a5a3c3c","prev_hash":"' + "44" * 32 + '","protected_sha256":"' + "22" * 32
    + '","psnr":38.125,"rgan_key_id":"0123456789abcdef","self_check_asr":0.1,"seq":2,"site_enc":null,'
    '"source":"extension","time":"2025-01-31T23:59:59.123456Z","user":"alice","version":1,'
    '"working_height":1536,"working_width":2048}'
)
KAT_HASH = "cdcb8d2bab966770ffef7e16fe829857546dab5ed7676d4b3f144d84c9490375"
KAT_SIGNATURE = ("444fa8d90c9c7b04ed0b8ac44eafe4b4f24a28af41e004a30b86a573bf1aae26"
                 "a05c31c5ee37df441f83ad2e0c05756a11995c9203f2cbf6a69eaa341d2b8c03")


def test_canonical_serialization_known_answer():
    assert db.canonical(KAT_BODY) == KAT_CANONICAL.encode("ascii")
    assert db.record_hash(KAT_BODY) == hashlib.sha256(KAT_CANONICAL.encode("ascii")).hexdigest() == KAT_HASH
    signer = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # RFC 8032 signatures are deterministic
    message = db.signed_message(KAT_BODY, KAT_HASH)  # every field but the signature, record_hash in order
    assert message == KAT_CANONICAL.replace(',"rgan_key_id"', f',"record_hash":"{KAT_HASH}","rgan_key_id"').encode()
    assert signer.sign(message).hex() == KAT_SIGNATURE


def test_the_signed_body_has_exactly_the_documented_fields(factory, users, photo):
    with factory.begin() as session:
        record = _record(session, users["alice"], photo)
        row = session.get(db.ProtectionRow, record.id)
        body = db.record_body(row, "alice")
    assert set(body) == set(KAT_BODY)
    assert body["file_name_enc"] == base64.b64encode(row.file_name_enc).decode()
    assert db.record_hash(body) == record.record_hash
    users["alice"].signing_key.public_key().verify(bytes.fromhex(record.signature),
                                                   db.signed_message(body, record.record_hash))
