"""The key store: known answers for key file format version 1 and its primitives, then behaviour.

scrypt runs at 2**14 here (kdf_n) for speed, except in the one test of the default cost."""

import base64
import hashlib
import hmac
import json
import os
import stat
import sys
import unicodedata
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent import keys as K
from agent.keys import KeyStoreError, RganKey, UserKeys

FAST = 2**14
PASS = "correct horse battery staple"
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")

# RFC 8032 §7.1 test 1: Ed25519 secret key, its public key and its signature of the empty message
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIGNATURE = bytes.fromhex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bac"
                                  "c61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")


def fixed_keys() -> UserKeys:
    return UserKeys(
        "alice",
        (RganKey(created=datetime(2025, 1, 1, tzinfo=UTC), key=bytes(range(32))),
         RganKey(created=datetime(2025, 6, 1, 12, 30, tzinfo=UTC), key=bytes(range(32, 64)))),
        RFC8032_SECRET,
        bytes(range(64, 96)),
    )


# ---------------------------------------------------------------- known answers

# Version 1 of the key file: if this changes, existing key files stop opening.
KAT_SALT, KAT_NONCE = bytes(range(16)), bytes(range(100, 112))
KAT_SECRETS_SEALED = (
    "T8DgVmQmsmH73ENsyvd3FRPYTnoITQCol8hP+3Y5CumUO9hh8zAdKDOIRJVfFPbkayvyrqvhi9VOBJaqO65alZ76Wv6WW3E+"
    "rUmuGl8Kr3E8dc3K6vMr8ngcgweKcfEHtzHw51sJYVg3OCziLL3gtHSuJZmTRgP0ePuGdFVSBN/KumLhfgM8lEi2tv1DgnKv"
    "QCjUGq3SxXS2Ylmcmg/2aJffPcgBGbbiFY94rQITyOtj1HsBD/e4JjLFwJIvp9cuWBf9rvTewEO05TJTiT7n1I0GoK/Xp+ze"
    "tiJjdOeNwB4NJQi6uKssYuOj9w/VW8WyDEYP3A=="
)
KAT_FILE = """{
  "format": "rgan-agent/keyfile",
  "version": 1,
  "user": "alice",
  "kdf": {
    "name": "scrypt",
    "n": 16384,
    "r": 8,
    "p": 1,
    "salt": "AAECAwQFBgcICQoLDA0ODw==",
    "check": "LW9zbyuFrapiYjNesRLlbwFPQXo310vg3vdmmyxRwp4="
  },
  "cipher": {
    "name": "aes-256-gcm",
    "nonce": "ZGVmZ2hpamtsbW5v"
  },
  "public": {
    "signing_key": "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
    "rgan_keys": [
      {
        "id": "f18f41bf8d81ced6",
        "created": "2025-01-01T00:00:00Z"
      },
      {
        "id": "ed65fc0f1884fc1b",
        "created": "2025-06-01T12:30:00Z"
      }
    ]
  },
""" + f'  "secrets": "{KAT_SECRETS_SEALED}"\n}}\n'
KAT_SECRETS = (b'{"data_key":"QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8=",'
               b'"rgan_keys":["AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",'
               b'"ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="],'
               b'"signing_key":"nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="}')


def test_key_file_known_answer():
    assert K.FORMAT == "rgan-agent/keyfile" and K.VERSION == 1
    data = K._seal(fixed_keys(), PASS, FAST, KAT_SALT, KAT_NONCE)
    assert data.decode("ascii") == KAT_FILE
    assert K._open(K._parse(data, Path("kat.key")), PASS) == fixed_keys()


def test_key_file_known_answer_checked_independently():
    # scrypt from hashlib (OpenSSL), AES-GCM straight from cryptography, the AAD rebuilt by hand
    doc = json.loads(KAT_FILE)
    derived = hashlib.scrypt(PASS.encode(), salt=KAT_SALT, n=FAST, r=8, p=1, dklen=64)
    assert base64.b64decode(doc["kdf"]["check"]) == derived[32:]
    header = {name: value for name, value in doc.items() if name != "secrets"}
    aad = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    plaintext = AESGCM(derived[:32]).decrypt(KAT_NONCE, base64.b64decode(doc["secrets"]), aad)
    assert plaintext == KAT_SECRETS
    assert base64.b64decode(doc["public"]["signing_key"]) == RFC8032_PUBLIC
    for entry, key in zip(doc["public"]["rgan_keys"], (bytes(range(32)), bytes(range(32, 64)))):
        assert entry["id"] == hmac.new(key, b"rgan-agent key id v1", hashlib.sha256).digest()[:8].hex()


def test_scrypt_matches_rfc7914_vector_3():
    key, check = K._derive("pleaseletmein", b"SodiumChloride", 2**14)  # N=16384, r=8, p=1, 64 bytes
    assert (key + check).hex() == ("7023bdcb3afd7348461c06cd81fd38ebfda8fbba904f8e3ea9b543f6545da1f2"
                                   "d5432955613f0fcf62d49705242a9af9e61e85dc0d651e40dfcf017b45575887")


def test_aes_256_gcm_matches_mcgrew_viega_test_case_14():
    sealed = AESGCM(bytes(32)).encrypt(bytes(12), bytes(16), None)
    assert sealed.hex() == "cea7403d4d606b6e074ec5d3baf39d18" + "d0d1c8a799996bf0265b98b5d48ab919"


def test_signing_key_matches_rfc8032_test_1():
    keys = fixed_keys()
    assert keys.public_key_bytes == RFC8032_PUBLIC
    assert keys.signing_key.sign(b"") == RFC8032_SIGNATURE


def test_key_ids_known_answers():
    assert K.rgan_key_id(bytes(range(32))) == "f18f41bf8d81ced6"
    assert [k.key_id for k in fixed_keys().rgan_keys] == ["f18f41bf8d81ced6", "ed65fc0f1884fc1b"]


def test_encrypt_data_known_answer():
    blob = K._encrypt_data(bytes(range(32)), b"example.com", b"site", bytes(12))
    assert blob.hex() == "01" + "00" * 12 + "6bc4d4b3c540e6936bc7c455781d79696ab146171f21b356281d41"
    # independently: the version byte is prefixed to the caller's associated data
    assert blob[13:] == AESGCM(bytes(range(32))).encrypt(bytes(12), b"example.com", b"\x01site")


# ---------------------------------------------------------------- the store


@pytest.fixture
def store(tmp_path):
    return tmp_path / "keys"


@pytest.fixture
def alice(store):
    return K.create_user(store, "alice", PASS, kdf_n=FAST)


def edit(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=2))


def test_create_and_unlock(store, alice):
    assert (store / "alice.key").is_file()
    assert len(alice.rgan_keys) == 1 and alice.active_rgan_key is alice.rgan_keys[0]
    assert len(alice.active_rgan_key.key) == 32 and len(alice.data_key) == 32
    assert len(alice.public_key_bytes) == 32
    unlocked = K.unlock(store, "alice", PASS)
    assert unlocked == alice
    assert unlocked.key_for(alice.active_rgan_key.key_id) == alice.active_rgan_key.key
    signature = unlocked.signing_key.sign(b"record")
    alice.signing_key.public_key().verify(signature, b"record")
    info = K.public_info(store, "alice")
    assert info["user"] == "alice" and info["active_key_id"] == alice.active_rgan_key.key_id
    assert base64.b64decode(info["signing_public_key"]) == alice.public_key_bytes
    assert info["kdf"]["n"] == FAST


def test_default_cost(store):
    keys = K.create_user(store, "bob", PASS)
    assert json.loads((store / "bob.key").read_text())["kdf"]["n"] == K.KDF_N == 2**17
    assert K.unlock(store, "bob", PASS) == keys


def test_fresh_secrets_every_time(store):
    a = K.create_user(store, "a", PASS, kdf_n=FAST)
    b = K.create_user(store, "b", PASS, kdf_n=FAST)
    assert a.active_rgan_key.key != b.active_rgan_key.key and a.data_key != b.data_key
    assert a.signing_key_bytes != b.signing_key_bytes
    salts = {json.loads((store / f"{u}.key").read_text())["kdf"]["salt"] for u in ("a", "b")}
    assert len(salts) == 2


def test_create_refuses_existing_user(store, alice):
    before = (store / "alice.key").read_bytes()
    with pytest.raises(KeyStoreError, match="already has a key file"):
        K.create_user(store, "alice", "other", kdf_n=FAST)
    assert (store / "alice.key").read_bytes() == before


@pytest.mark.parametrize("kdf_n", [2**13, 2**21, 3 * 2**14, 2.0**14])
def test_create_refuses_kdf_cost_out_of_range(store, kdf_n):
    with pytest.raises(ValueError, match="kdf_n"):
        K.create_user(store, "alice", PASS, kdf_n=kdf_n)
    assert not (store / "alice.key").exists()


def test_create_refuses_empty_passphrase(store):
    with pytest.raises(KeyStoreError, match="non-empty"):
        K.create_user(store, "alice", "", kdf_n=FAST)


def test_wrong_passphrase(store, alice):
    with pytest.raises(KeyStoreError, match="wrong passphrase for user 'alice'"):
        K.unlock(store, "alice", PASS + "!")


def test_missing_user_says_to_run_init(store):
    with pytest.raises(KeyStoreError, match="no key file for user 'nobody'.*agent init"):
        K.unlock(store, "nobody", PASS)


def test_passphrase_is_unicode_normalised(store):
    composed = "café ☕"
    K.create_user(store, "alice", composed, kdf_n=FAST)
    K.unlock(store, "alice", unicodedata.normalize("NFD", composed))


def test_file_for_another_user_is_refused(store, alice):
    (store / "bob.key").write_bytes((store / "alice.key").read_bytes())
    with pytest.raises(KeyStoreError, match="holds the keys of user 'alice', not 'bob'"):
        K.unlock(store, "bob", PASS)


# every leaf of the header, each changed to a well-formed other value where one exists (so the
# associated data, not the form check, has to catch it), with what the user is told
HEADER_EDITS = {
    ("format",): ("rgan-agent/other", "not a key file"),
    ("version",): (2, "version 2 is not supported"),
    ("kdf", "name"): ("argon2id", "kdf.name must be 'scrypt'"),
    ("kdf", "n"): (2**15, "wrong passphrase"),  # the KDF fields change the derived key
    ("kdf", "r"): (16, "kdf.r must be 8"),
    ("kdf", "p"): (2, "kdf.p must be 1"),
    ("kdf", "salt"): (base64.b64encode(bytes(16)).decode(), "wrong passphrase"),
    ("kdf", "check"): (base64.b64encode(bytes(32)).decode(), "wrong passphrase"),
    ("cipher", "name"): ("chacha20-poly1305", "cipher.name must be 'aes-256-gcm'"),
    ("cipher", "nonce"): (base64.b64encode(bytes(12)).decode(), "the file was modified"),
    ("public", "signing_key"): (base64.b64encode(RFC8032_PUBLIC).decode(), "the file was modified"),
    ("public", "rgan_keys", 0, "id"): ("0123456789abcdef", "the file was modified"),
    ("public", "rgan_keys", 0, "created"): ("2001-02-03T04:05:06Z", "the file was modified"),
}


def leaves(value, prefix=()):
    if isinstance(value, dict):
        return [leaf for name, item in value.items() for leaf in leaves(item, prefix + (name,))]
    if isinstance(value, list):
        return [leaf for i, item in enumerate(value) for leaf in leaves(item, prefix + (i,))]
    return [prefix]


def test_header_edits_cover_every_header_field(store, alice):
    doc = json.loads((store / "alice.key").read_text())
    header_leaves = {leaf for leaf in leaves(doc) if leaf[0] not in ("user", "secrets")}
    assert header_leaves == set(HEADER_EDITS)  # "user" is covered by its own test below


@pytest.mark.parametrize("where", list(HEADER_EDITS), ids=lambda where: ".".join(map(str, where)))
def test_every_header_field_edit_is_detected(store, alice, where):
    value, message = HEADER_EDITS[where]

    def change(doc):
        node = doc
        for step in where[:-1]:
            node = node[step]
        assert node[where[-1]] != value
        node[where[-1]] = value

    edit(store / "alice.key", change)
    with pytest.raises(KeyStoreError, match=message) as error:
        K.unlock(store, "alice", PASS)
    assert str(store / "alice.key") in str(error.value)


def test_user_field_edit_is_detected(store, alice):
    # alice's file presented as bob's: the name matches the file, the associated data does not
    (store / "alice.key").rename(store / "bob.key")
    edit(store / "bob.key", lambda doc: doc.update(user="bob"))
    with pytest.raises(KeyStoreError, match="the file was modified"):
        K.unlock(store, "bob", PASS)


@pytest.mark.parametrize("change, message", [
    (lambda doc: doc.update(comment="hi"), "has fields"),
    (lambda doc: doc.pop("public"), "has fields"),
    (lambda doc: doc["kdf"].update(n=2**13), "kdf.n must be a power of two from 2\\*\\*14"),
    (lambda doc: doc["kdf"].update(n=2**40), "kdf.n must be a power of two"),
    (lambda doc: doc["kdf"].update(n=float(2**14)), "kdf.n must be"),
    (lambda doc: doc.update(version=True), "version True is not supported"),
    (lambda doc: doc["kdf"].update(salt="not base64!"), "kdf.salt is not base64"),
    (lambda doc: doc["cipher"].update(nonce="AAAA"), "cipher.nonce must be 12 bytes"),
    (lambda doc: doc["public"]["rgan_keys"].append({"id": "0123456789abcdef", "created": "2030-01-01T00:00:00Z"}),
     "the file was modified"),
    (lambda doc: doc["public"].update(rgan_keys=[]), "non-empty"),
    (lambda doc: doc["public"]["rgan_keys"][0].update(id="ABCDEF0123456789"), "lowercase hex"),
    (lambda doc: doc["public"]["rgan_keys"][0].update(created="2025-1-01T00:00:00Z"), "UTC time"),
    (lambda doc: doc.update(secrets=doc["secrets"][:-8] + "AAAAAA=="), "the file was modified"),
])
def test_malformed_or_extended_headers_are_refused(store, alice, change, message):
    edit(store / "alice.key", change)
    with pytest.raises(KeyStoreError, match=message):
        K.unlock(store, "alice", PASS)


def test_duplicate_json_fields_are_refused(store, alice):
    path = store / "alice.key"
    path.write_text(path.read_text().replace('"user": "alice",', '"user": "alice", "user": "alice",'))
    with pytest.raises(KeyStoreError, match="duplicate field"):
        K.unlock(store, "alice", PASS)


@pytest.mark.parametrize("bit", [0, 100, -1])  # first byte, inside, the tag's last byte
def test_ciphertext_bit_flip_is_detected(store, alice, bit):
    def flip(doc):
        sealed = bytearray(base64.b64decode(doc["secrets"]))
        sealed[bit] ^= 0x01
        doc["secrets"] = base64.b64encode(bytes(sealed)).decode()

    edit(store / "alice.key", flip)
    with pytest.raises(KeyStoreError, match="the file was modified"):
        K.unlock(store, "alice", PASS)


def test_truncated_file_is_refused(store, alice):
    path = store / "alice.key"
    data = path.read_bytes()
    for size in (0, 1, len(data) // 2, len(data) - 3):
        path.write_bytes(data[:size])
        with pytest.raises(KeyStoreError, match="truncated or corrupt") as error:
            K.unlock(store, "alice", PASS)
        assert str(path) in str(error.value)
    with pytest.raises(KeyStoreError, match="truncated or corrupt"):
        K.public_info(store, "alice")


def test_rotation_keeps_old_keys(store, alice):
    first = alice.active_rgan_key
    once = K.rotate(store, "alice", PASS)
    twice = K.rotate(store, "alice", PASS)
    assert [k.key_id for k in twice.rgan_keys[:2]] == [k.key_id for k in once.rgan_keys]
    assert twice.rgan_keys[0] == first and len({k.key_id for k in twice.rgan_keys}) == 3
    assert twice.active_rgan_key == twice.rgan_keys[-1] != first
    assert twice.data_key == alice.data_key and twice.signing_key_bytes == alice.signing_key_bytes
    unlocked = K.unlock(store, "alice", PASS)
    assert unlocked == twice
    for rgan_key in twice.rgan_keys:
        assert unlocked.key_for(rgan_key.key_id) == rgan_key.key
    with pytest.raises(KeyStoreError, match="no RGAN key with id 'ffffffffffffffff'"):
        unlocked.key_for("ffffffffffffffff")
    info = K.public_info(store, "alice")
    assert [entry["id"] for entry in info["rgan_keys"]] == [k.key_id for k in twice.rgan_keys]
    assert info["active_key_id"] == twice.active_rgan_key.key_id and info["kdf"]["n"] == FAST


def test_rotate_needs_the_passphrase(store, alice):
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        K.rotate(store, "alice", "guess")
    assert K.unlock(store, "alice", PASS) == alice


def test_change_passphrase(store, alice):
    salt = json.loads((store / "alice.key").read_text())["kdf"]["salt"]
    K.change_passphrase(store, "alice", PASS, "new passphrase")
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        K.unlock(store, "alice", PASS)
    assert K.unlock(store, "alice", "new passphrase") == alice
    assert json.loads((store / "alice.key").read_text())["kdf"]["salt"] != salt
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        K.change_passphrase(store, "alice", PASS, "third")


def test_backup_round_trip(tmp_path, store, alice):
    backup = tmp_path / "usb" / "alice.backup"
    K.export_backup(store, "alice", PASS, backup, "backup passphrase")
    assert json.loads(backup.read_text())["format"] == K.FORMAT
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        K.import_backup(tmp_path / "other", backup, PASS, PASS)
    restored = K.import_backup(tmp_path / "other", backup, "backup passphrase", "new home passphrase")
    assert restored == alice
    assert K.unlock(tmp_path / "other", "alice", "new home passphrase") == alice
    renamed = K.import_backup(store, backup, "backup passphrase", "pw", user="alice2")
    assert renamed.user == "alice2" and renamed.rgan_keys == alice.rgan_keys
    assert K.unlock(store, "alice2", "pw").data_key == alice.data_key


def test_export_never_overwrites(tmp_path, store, alice):
    dst = tmp_path / "alice.backup"
    dst.write_text("precious")
    with pytest.raises(KeyStoreError, match="already exists"):
        K.export_backup(store, "alice", PASS, dst, "backup passphrase")
    assert dst.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_import_refuses_to_overwrite_unless_asked(tmp_path, store, alice):
    backup = tmp_path / "alice.backup"
    K.export_backup(store, "alice", PASS, backup, "backup passphrase")
    K.rotate(store, "alice", PASS)
    with pytest.raises(KeyStoreError, match="already has a key file.*replace=True"):
        K.import_backup(store, backup, "backup passphrase", PASS)
    assert len(K.unlock(store, "alice", PASS).rgan_keys) == 2
    K.import_backup(store, backup, "backup passphrase", PASS, replace=True)
    assert K.unlock(store, "alice", PASS) == alice


def test_import_of_a_missing_backup(tmp_path, store):
    with pytest.raises(KeyStoreError, match="no backup file"):
        K.import_backup(store, tmp_path / "nothing", "x", "y")


def test_list_and_remove_users(store):
    assert K.list_users(store) == []
    for user in ("carol", "bob"):
        K.create_user(store, user, PASS, kdf_n=FAST)
    (store / "notes.txt").write_text("not a key")
    (store / "Bad Name.key").write_text("{}")
    assert K.list_users(store) == ["bob", "carol"]
    K.remove_user(store, "bob")
    assert K.list_users(store) == ["carol"]
    with pytest.raises(KeyStoreError, match="no key file for user 'bob'"):
        K.remove_user(store, "bob")


@pytest.mark.parametrize("user", ["", "Alice", "a" * 33, "-a", "_a", "a b", "a/b", "../x", "a.b", "é", "a\n",
                                  "con", "nul", "com1", 7, None])
def test_invalid_user_names_are_refused(store, user):
    with pytest.raises(KeyStoreError, match="invalid user name"):
        K.create_user(store, user, PASS, kdf_n=FAST)
    with pytest.raises(KeyStoreError, match="invalid user name"):
        K.unlock(store, user, PASS)
    assert not store.exists()


@pytest.mark.parametrize("user", ["a", "7", "a" * 32, "bob_2-x"])
def test_valid_user_names(user):
    assert K.check_user(user) == user


@posix_only
def test_files_are_private_whatever_the_umask(tmp_path, store):
    old = os.umask(0)
    try:
        K.create_user(store, "alice", PASS, kdf_n=FAST)
        K.rotate(store, "alice", PASS)
        K.export_backup(store, "alice", PASS, tmp_path / "alice.backup", "backup passphrase")
    finally:
        os.umask(old)
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert stat.S_IMODE((store / "alice.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "alice.backup").stat().st_mode) == 0o600
    assert os.umask(old) == old  # the umask was restored


def test_repr_hides_secrets():
    keys = fixed_keys()
    text = repr(keys) + str(keys) + repr(keys.rgan_keys) + repr(keys.active_rgan_key)
    assert "alice" in text and "f18f41bf8d81ced6" in text
    secrets = [k.key for k in keys.rgan_keys] + [keys.signing_key_bytes, keys.data_key]
    for secret in secrets:
        for form in (repr(secret), secret.hex(), base64.b64encode(secret).decode(), secret[:8].hex()):
            assert form not in text


def test_user_keys_are_validated():
    keys = fixed_keys()
    with pytest.raises(ValueError, match="at least one"):
        UserKeys("alice", (), keys.signing_key_bytes, keys.data_key)
    with pytest.raises(ValueError, match="distinct"):
        UserKeys("alice", keys.rgan_keys[:1] * 2, keys.signing_key_bytes, keys.data_key)
    with pytest.raises(ValueError, match="data_key must be 32 bytes"):
        UserKeys("alice", keys.rgan_keys, keys.signing_key_bytes, bytes(16))
    with pytest.raises(ValueError, match="256 bits"):
        RganKey(created=datetime.now(UTC), key=bytes(16))
    with pytest.raises(ValueError, match="timezone-aware"):
        RganKey(created=datetime(2025, 1, 1), key=bytes(32))


# ---------------------------------------------------------------- data at rest


def test_encrypt_data_round_trip():
    key = os.urandom(32)
    blob = K.encrypt_data(key, b"holiday.jpg", b"file-name")
    assert blob[0] == K.DATA_VERSION and len(blob) == 1 + 12 + len(b"holiday.jpg") + 16
    assert K.decrypt_data(key, blob, b"file-name") == b"holiday.jpg"
    assert K.encrypt_data(key, b"holiday.jpg", b"file-name") != blob  # fresh nonce
    assert K.decrypt_data(key, K.encrypt_data(key, b"", b""), b"") == b""


def test_decrypt_data_detects_tampering():
    key = os.urandom(32)
    blob = K.encrypt_data(key, b"example.com", b"site")
    for i in range(1, len(blob)):  # every byte after the version: nonce, ciphertext, tag
        tampered = bytearray(blob)
        tampered[i] ^= 0x80
        with pytest.raises(KeyStoreError, match="failed authentication"):
            K.decrypt_data(key, bytes(tampered), b"site")
    with pytest.raises(KeyStoreError, match="failed authentication"):
        K.decrypt_data(key, blob, b"model")
    with pytest.raises(KeyStoreError, match="failed authentication"):
        K.decrypt_data(os.urandom(32), blob, b"site")
    with pytest.raises(KeyStoreError, match="version 2 is not supported"):
        K.decrypt_data(key, b"\x02" + blob[1:], b"site")
    with pytest.raises(KeyStoreError, match="truncated"):
        K.decrypt_data(key, blob[:28], b"site")
    with pytest.raises(ValueError, match="32 bytes"):
        K.encrypt_data(bytes(16), b"x", b"")


# ---------------------------------------------------------------- locations and passphrases


def test_passphrase_from_env_or_file(monkeypatch, tmp_path):
    monkeypatch.delenv("AGENT_PASSPHRASE", raising=False)
    assert K.passphrase_from_env_or_file(None) is None
    monkeypatch.setenv("AGENT_PASSPHRASE", "")
    assert K.passphrase_from_env_or_file(None) is None
    monkeypatch.setenv("AGENT_PASSPHRASE", "from env")
    assert K.passphrase_from_env_or_file(None) == "from env"
    file = tmp_path / "pass"
    for content, expected in [("from file\n", "from file"), ("crlf\r\n", "crlf"), ("two\n\n", "two\n"),
                              ("none", "none"), (" spaces \n", " spaces ")]:
        file.write_bytes(content.encode())
        assert K.passphrase_from_env_or_file(file) == expected  # the file wins over the environment
    with pytest.raises(KeyStoreError, match="cannot read the passphrase file"):
        K.passphrase_from_env_or_file(tmp_path / "missing")
