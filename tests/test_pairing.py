"""Pairing (agent/service/pairing.py): one-time codes, tokens bound to an extension origin, revocation,
the brute-force guard; and the `agent pair` command."""

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from agent import store as db
from agent.cli import app
from agent.service import pairing
from agent.service.home import resolve_user
from agent.service.pairing import FailureGuard, PairingError
from agent.service.users import add_user, init_user, list_users

PW = "correct horse"
KDF = 2**14  # the store's minimum: fast unlocks in tests
CHROME = "chrome-extension://" + "abcdefghijklmnopabcdefghijklmnop"
FIREFOX = "moz-extension://0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    init_user(home, "alice", PW, kdf_n=KDF)
    return home


@pytest.fixture
def factory(home):
    factory = db.open_database(db.database_path(home))
    yield factory
    factory.kw["bind"].dispose()


def paired(factory, origin=CHROME, user="alice", now=None):
    code = pairing.create_code(factory, user, now=now)
    return pairing.redeem_code(factory, code.code, origin, user=user, guard=FailureGuard(), now=now)


def test_a_code_is_short_typeable_stored_hashed_and_pairs_once(factory):
    code = pairing.create_code(factory, "alice", now=T0)
    assert len(code.code) == 9 and code.code[4] == "-"
    assert set(code.code.replace("-", "")) <= set(pairing.CODE_ALPHABET)
    assert not set("01OIL") & set(pairing.CODE_ALPHABET)
    assert code.expires == "2026-01-01T12:05:00.000000Z"
    with factory() as session:
        rows = session.scalars(select(db.PairingCodeRow)).all()
    assert [r.code_hash for r in rows] == [hashlib.sha256(code.code.replace("-", "").encode()).hexdigest()]

    # typed as a person would: lower case, without the dash
    typed = code.code.replace("-", " ").lower()
    issued = pairing.redeem_code(factory, typed, CHROME, user="alice", guard=FailureGuard(), label="Chrome",
                                 now=T0 + timedelta(minutes=4))
    assert issued.info.user == "alice" and issued.info.origin == CHROME and issued.info.label == "Chrome"
    token_id, secret = issued.token.split(".")
    assert token_id == issued.info.id and len(token_id) == 16 and len(secret) >= 43
    with factory() as session:
        row = session.get(db.TokenRow, token_id)
        assert row.token_hash == hashlib.sha256(issued.token.encode()).hexdigest()
        assert issued.token not in repr(row.__dict__)
        assert session.scalars(select(db.PairingCodeRow)).all() == []  # used up
    with pytest.raises(PairingError, match="wrong or expired") as caught:
        pairing.redeem_code(factory, code.code, CHROME, user="alice", guard=FailureGuard())
    assert caught.value.reason == "bad_code"


def test_an_expired_code_does_not_pair_and_is_cleared_by_the_next(factory):
    code = pairing.create_code(factory, "alice", now=T0)
    with pytest.raises(PairingError) as caught:
        pairing.redeem_code(factory, code.code, CHROME, user="alice", guard=FailureGuard(),
                            now=T0 + pairing.CODE_TTL)
    assert caught.value.reason == "bad_code"
    pairing.create_code(factory, "alice", now=T0 + timedelta(minutes=6))
    with factory() as session:
        assert len(session.scalars(select(db.PairingCodeRow)).all()) == 1


def test_codes_need_a_user_of_the_log_and_belong_to_that_user(home, factory):
    with pytest.raises(PairingError, match="'carol' is not in the provenance log") as caught:
        pairing.create_code(factory, "carol")
    assert caught.value.reason == "unknown_user"
    add_user(home, "bob", "bob's words", kdf_n=KDF)
    code = pairing.create_code(factory, "bob")
    with pytest.raises(PairingError):  # alice's service does not redeem bob's code
        pairing.redeem_code(factory, code.code, CHROME, user="alice", guard=FailureGuard())
    assert pairing.redeem_code(factory, code.code, CHROME, user="bob", guard=FailureGuard()).info.user == "bob"


@pytest.mark.parametrize("origin", ["https://example.com", "http://127.0.0.1:47830", "null", "file://",
                                    "chrome-extension://short", "chrome-extension://" + "q" * 32,
                                    CHROME + "/", "moz-extension://not-a-uuid", ""])
def test_only_an_extension_origin_can_pair(factory, origin):
    code = pairing.create_code(factory, "alice")
    with pytest.raises(PairingError, match="only for a browser extension") as caught:
        pairing.redeem_code(factory, code.code, origin, user="alice", guard=FailureGuard())
    assert caught.value.reason == "bad_origin"
    assert not pairing.is_extension_origin(origin)
    assert pairing.is_extension_origin(CHROME) and pairing.is_extension_origin(FIREFOX)


def test_a_label_must_be_short_printable_text(factory):
    code = pairing.create_code(factory, "alice")
    for label in ("x" * 201, "line\nbreak", 42):
        with pytest.raises(PairingError) as caught:
            pairing.redeem_code(factory, code.code, CHROME, user="alice", guard=FailureGuard(), label=label)
        assert caught.value.reason == "bad_label"


def test_wrong_codes_past_the_limit_cancel_every_outstanding_code(factory):
    guard = FailureGuard(limit=3)
    good = pairing.create_code(factory, "alice")
    other = pairing.create_code(factory, "alice")
    for _ in range(2):
        with pytest.raises(PairingError) as caught:
            pairing.redeem_code(factory, "AAAA-AAAA", CHROME, user="alice", guard=guard)
        assert caught.value.reason == "bad_code"
    with pytest.raises(PairingError, match="every outstanding code was cancelled") as caught:
        pairing.redeem_code(factory, "AAAA-AAAA", CHROME, user="alice", guard=guard)
    assert caught.value.reason == "codes_invalidated"
    for code in (good, other):  # the right codes are gone too
        with pytest.raises(PairingError):
            pairing.redeem_code(factory, code.code, CHROME, user="alice", guard=FailureGuard())
    # the count starts again, and a fresh code pairs
    fresh = pairing.create_code(factory, "alice")
    assert pairing.redeem_code(factory, fresh.code, CHROME, user="alice", guard=guard).info.origin == CHROME
    with pytest.raises(ValueError):
        FailureGuard(limit=0)


def test_verify_checks_the_secret_the_origin_and_revocation(factory):
    issued = paired(factory, now=T0)
    info = pairing.verify_token(factory, issued.token, CHROME, now=T0)
    assert (info.id, info.user, info.origin, info.last_used) == (issued.info.id, "alice", CHROME,
                                                                "2026-01-01T12:00:00.000000Z")
    assert pairing.verify_token(factory, issued.token, None).id == info.id  # no Origin: not a web page
    token_id, secret = issued.token.split(".")
    for bad in (f"{token_id}.{secret[:-1]}x", f"{'0' * 16}.{secret}", secret, "", f"{token_id}.", "é.x"):
        with pytest.raises(PairingError) as caught:
            pairing.verify_token(factory, bad, CHROME)
        assert caught.value.reason == "bad_token"
    with pytest.raises(PairingError, match="paired with another extension") as caught:
        pairing.verify_token(factory, issued.token, FIREFOX)
    assert caught.value.reason == "wrong_origin"
    revoked = pairing.revoke_token(factory, token_id, now=T0 + timedelta(hours=1))
    assert revoked.revoked == "2026-01-01T13:00:00.000000Z"
    assert pairing.revoke_token(factory, token_id).revoked == revoked.revoked  # again: unchanged
    with pytest.raises(PairingError, match="was revoked") as caught:
        pairing.verify_token(factory, issued.token, CHROME)
    assert caught.value.reason == "revoked"
    with pytest.raises(PairingError, match="no token") as caught:
        pairing.revoke_token(factory, "ffffffffffffffff")
    assert caught.value.reason == "unknown_token"


def test_last_used_is_written_at_most_once_a_minute(factory):
    issued = paired(factory, now=T0)
    pairing.verify_token(factory, issued.token, CHROME, now=T0)
    assert pairing.verify_token(factory, issued.token, CHROME, now=T0 + timedelta(seconds=30)).last_used == \
        "2026-01-01T12:00:00.000000Z"
    later = T0 + timedelta(seconds=61)
    pairing.verify_token(factory, issued.token, CHROME, now=later)
    assert pairing.list_tokens(factory)[0].last_used == "2026-01-01T12:01:01.000000Z"


def test_list_and_paired_origins(home, factory):
    add_user(home, "bob", "bob's words", kdf_n=KDF)
    first = paired(factory, CHROME, now=T0)
    second = paired(factory, FIREFOX, now=T0 + timedelta(seconds=1))
    paired(factory, CHROME, user="bob", now=T0 + timedelta(seconds=2))
    assert [t.id for t in pairing.list_tokens(factory, "alice")] == [first.info.id, second.info.id]
    assert len(pairing.list_tokens(factory)) == 3
    assert pairing.paired_origins(factory, "alice") == {CHROME, FIREFOX}
    pairing.revoke_token(factory, second.info.id)
    assert pairing.paired_origins(factory, "alice") == {CHROME}
    assert "token" not in pairing.list_tokens(factory)[0].to_dict()


# ---------------------------------------------------------------- the command

@pytest.fixture
def cli(home, monkeypatch):
    monkeypatch.setenv("AGENT_HOME", str(home))
    monkeypatch.setenv("AGENT_PASSPHRASE", PW)
    return CliRunner()


def test_agent_pair_prints_a_code_that_pairs(cli, factory):
    done = cli.invoke(app, ["pair", "--json"])
    assert done.exit_code == 0, done.output
    printed = json.loads(done.stdout)
    assert printed["user"] == "alice" and printed["expires"].endswith("Z")
    issued = pairing.redeem_code(factory, printed["code"], CHROME, user="alice", guard=FailureGuard())
    assert issued.info.user == "alice"
    done = cli.invoke(app, ["pair"])
    assert done.exit_code == 0 and "pairing code for user alice" in done.stdout


def test_agent_pair_needs_the_right_passphrase(cli, monkeypatch):
    monkeypatch.setenv("AGENT_PASSPHRASE", "wrong words")
    done = cli.invoke(app, ["pair"])
    assert done.exit_code == 2 and "wrong passphrase" in done.stderr
    done = cli.invoke(app, ["pair", "--user", "carol"])
    assert done.exit_code == 2 and "unknown user 'carol'" in done.stderr


def test_agent_pair_list_and_revoke(cli, factory):
    done = cli.invoke(app, ["pair", "--list"])
    assert done.exit_code == 0 and "no extension is paired" in done.stdout
    issued = paired(factory, CHROME)
    listed = json.loads(cli.invoke(app, ["pair", "--list", "--json"]).stdout)
    assert [(t["id"], t["origin"], t["revoked"]) for t in listed] == [(issued.info.id, CHROME, None)]
    assert issued.token.split(".")[1] not in cli.invoke(app, ["pair", "--list"]).stdout
    done = cli.invoke(app, ["pair", "--revoke", issued.info.id])
    assert done.exit_code == 0 and f"revoked token {issued.info.id}" in done.stdout
    with pytest.raises(PairingError):
        pairing.verify_token(factory, issued.token, CHROME)
    assert json.loads(cli.invoke(app, ["pair", "--list", "--json"]).stdout)[0]["revoked"] is not None
    done = cli.invoke(app, ["pair", "--revoke", "nope"])
    assert done.exit_code == 2 and "no token 'nope'" in done.stderr
    done = cli.invoke(app, ["pair", "--list", "--revoke", issued.info.id])
    assert done.exit_code == 2 and "one of them" in done.stderr


def test_agent_serve_on_a_fresh_machine_creates_the_first_user_then_serves(tmp_path, monkeypatch):
    """The README's one set-up command ends in `agent serve`: with no keys yet it creates the
    first user (as `agent init`), then serves with those keys unlocked."""
    from agent import keys as keystore
    from agent import server

    served = {}

    def serve(home, user, passphrase, **options):
        name = resolve_user(home, user)
        served.update(home=home, user=name, unlocks=keystore.unlock(keystore.key_store(home), name, passphrase).user)

    monkeypatch.setattr(server, "serve", serve)
    monkeypatch.setattr(keystore, "KDF_N", KDF)
    home = tmp_path / "fresh"
    done = CliRunner().invoke(app, ["serve"], env={"AGENT_HOME": str(home), "AGENT_PASSPHRASE": PW})
    assert done.exit_code == 0, done.output
    assert "creating user 'default'" in done.output
    assert served == {"home": home, "user": "default", "unlocks": "default"}
    assert [u["user"] for u in list_users(home)] == ["default"]
    # a second start serves the user that exists, creating nobody
    done = CliRunner().invoke(app, ["serve"], env={"AGENT_HOME": str(home), "AGENT_PASSPHRASE": PW})
    assert done.exit_code == 0 and "creating" not in done.output
