"""The per-user key store: one passphrase-encrypted key file per user.

A user's secrets are an ordered list of 256-bit RGAN keys (the newest is active; rotation keeps the
older ones so that images protected before it still recover), an Ed25519 signing key (provenance
records) and a 256-bit data key (what the agent keeps encrypted at rest: file names, sites, models).

`<store>/<user>.key` is a JSON document, format `rgan-agent/keyfile` version 1, specified in
keys/README.md: a header in clear (user, scrypt parameters, public parts) and the secrets, as JSON,
encrypted with AES-256-GCM under a key that scrypt derives from the passphrase, with the whole header
as associated data, so that any edit anywhere in the file is detected at unlock. The header can be
read without the passphrase (to list users and key ids) but is only authenticated by an unlock.

This is a library; the CLI is a thin shell over it. Every error a user can act on is a
`KeyStoreError` whose message names the file or the user and says what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .atomic import atomic_path

FORMAT = "rgan-agent/keyfile"
VERSION = 1
# scrypt cost. 2**17 (128 MiB, about 0.35 s) is the default for every file the agent creates. Files
# down to 2**14 (16 MiB, scrypt's original interactive setting) are accepted because tests create
# them through `kdf_n`; lower is refused on read as well as on write, so that a weak file (a buggy
# or foreign tool's) is never used silently. The upper bound (1 GiB) stops a corrupt or hostile
# header from making an unlock allocate without limit.
KDF_N = 2**17
KDF_N_MIN = 2**14
KDF_N_MAX = 2**20
KDF_R = 8
KDF_P = 1
SALT_BYTES = 16
CHECK_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
# an RGAN key: 256 bits (what `rgan.keying` expands into the key pattern)
KEY_BYTES = 32
SIGNING_KEY_BYTES = 32
DATA_KEY_BYTES = 32
DATA_VERSION = 1
PASSPHRASE_ENV = "AGENT_PASSPHRASE"
KEYRING_SERVICE = "rgan-agent"

_KEY_ID_LABEL = b"rgan-agent key id v1"
_KEY_ID_BYTES = 8
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_USER = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# names Windows reserves for devices whatever the extension: `con.key` cannot be created there
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_FIELDS = {"format", "version", "user", "kdf", "cipher", "public", "secrets"}


class KeyStoreError(Exception):
    """A key store problem the user can act on; the message says which file or user and what."""


def check_user(user: str) -> str:
    if not isinstance(user, str) or not _USER.fullmatch(user) or user in _WINDOWS_DEVICES:
        raise KeyStoreError(f"invalid user name {user!r}: 1 to 32 lowercase letters, digits, '-' or '_', "
                            "starting with a letter or digit (and not a Windows device name such as 'con')")
    return user


def rgan_key_id(key: bytes) -> str:
    """The public name of an RGAN key: HMAC-SHA256(key, label), first 8 bytes, in hex.

    The id is stored in clear and recorded with every protected image, so it must say nothing about
    the key. A keyed PRF output is independent of every other value derived from the key (the
    pattern's HKDF uses another label), whereas a plain hash of the key would be one more unkeyed
    function of the same secret for no benefit. 64 bits make a collision among one user's keys
    negligible; the id only selects a key, it proves nothing (recovery needs the key itself).
    """
    return hmac.new(check_key(key), _KEY_ID_LABEL, hashlib.sha256).digest()[:_KEY_ID_BYTES].hex()


@dataclass(frozen=True)
class RganKey:
    """One RGAN key; its id is derived from it, so a key and its id can never disagree."""

    key_id: str = field(init=False)
    created: datetime
    key: bytes = field(repr=False)

    def __post_init__(self):
        if self.created.tzinfo is None:
            raise ValueError("an RGAN key's creation time must be timezone-aware")
        object.__setattr__(self, "key", check_key(self.key))
        object.__setattr__(self, "key_id", rgan_key_id(self.key))


@dataclass(frozen=True)
class UserKeys:
    """A user's unlocked secrets. The repr shows only the user and the key ids and times."""

    user: str
    rgan_keys: tuple[RganKey, ...]  # oldest first; the last one is active
    signing_key_bytes: bytes = field(repr=False)  # Ed25519 raw private key (RFC 8032 secret)
    data_key: bytes = field(repr=False)

    def __post_init__(self):
        check_user(self.user)
        object.__setattr__(self, "rgan_keys", tuple(self.rgan_keys))
        if not self.rgan_keys or not all(isinstance(k, RganKey) for k in self.rgan_keys):
            raise ValueError("a user needs at least one RGAN key (RganKey)")
        if len({k.key_id for k in self.rgan_keys}) != len(self.rgan_keys):
            raise ValueError("the RGAN keys must be distinct")
        for name, size in (("signing_key_bytes", SIGNING_KEY_BYTES), ("data_key", DATA_KEY_BYTES)):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise ValueError(f"{name} must be {size} bytes")

    @property
    def active_rgan_key(self) -> RganKey:
        return self.rgan_keys[-1]

    def key_for(self, key_id: str) -> bytes:
        for rgan_key in self.rgan_keys:
            if rgan_key.key_id == key_id:
                return rgan_key.key
        raise KeyStoreError(f"user {self.user!r} has no RGAN key with id {key_id!r} "
                            f"(known: {', '.join(k.key_id for k in self.rgan_keys)})")

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.signing_key_bytes)

    @property
    def public_key_bytes(self) -> bytes:
        return self.signing_key.public_key().public_bytes_raw()


# ---------------------------------------------------------------- the store


def check_key(key: bytes) -> bytes:
    """`key` as bytes if it is an RGAN key (`KEY_BYTES` long); a ValueError otherwise."""
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ValueError(f"an RGAN key is {KEY_BYTES} bytes (256 bits)")
    return bytes(key)


def key_store(home: Path) -> Path:
    return Path(home) / "keys"


def create_user(store: Path, user: str, passphrase: str, *, kdf_n: int = KDF_N) -> UserKeys:
    """Generates a user's secrets and writes `<store>/<user>.key`; refuses an existing user."""
    path = _user_file(store, user)
    if path.exists():
        raise KeyStoreError(f"user {user!r} already has a key file ({path}); "
                            "remove it first if you really mean to replace those keys")
    now = _now()
    keys = UserKeys(user, (RganKey(created=now, key=os.urandom(KEY_BYTES)),),
                    Ed25519PrivateKey.generate().private_bytes_raw(), os.urandom(DATA_KEY_BYTES))
    _save(store, keys, passphrase, kdf_n, replace=False)
    return keys


def unlock(store: Path, user: str, passphrase: str) -> UserKeys:
    return _open(_read_user(store, user), passphrase)


def rotate(store: Path, user: str, passphrase: str) -> UserKeys:
    """Adds a fresh RGAN key as the active one; the older keys stay for recovering older images."""
    keyfile = _read_user(store, user)
    keys = _open(keyfile, passphrase)
    fresh = RganKey(created=_now(), key=os.urandom(KEY_BYTES))
    rotated = dataclasses.replace(keys, rgan_keys=keys.rgan_keys + (fresh,))
    _save(store, rotated, passphrase, keyfile.n, replace=True)
    return rotated


def change_passphrase(store: Path, user: str, old: str, new: str) -> None:
    """Re-encrypts the same secrets under `new` (fresh salt and nonce, same scrypt cost)."""
    keyfile = _read_user(store, user)
    _save(store, _open(keyfile, old), new, keyfile.n, replace=True)


def export_backup(store: Path, user: str, passphrase: str, dst: Path, backup_passphrase: str) -> None:
    """Writes the user's secrets to `dst` in the key file format under `backup_passphrase`.
    Never overwrites: a backup that replaced an older one by mistake could lose keys."""
    dst = Path(dst)
    if dst.exists():
        raise KeyStoreError(f"{dst} already exists; a backup never overwrites a file")
    keyfile = _read_user(store, user)
    write_private(dst, _seal_fresh(_open(keyfile, passphrase), backup_passphrase, keyfile.n), replace=False)


def import_backup(store: Path, src: Path, backup_passphrase: str, passphrase: str, user: str | None = None,
                  *, replace: bool = False) -> UserKeys:
    """Restores a backup into the store under `passphrase`, as its own user or as `user`.
    An existing user is only overwritten with `replace=True`: its keys would be lost."""
    src = Path(src)
    keyfile = _read(src, f"no backup file {src}")
    keys = _open(keyfile, backup_passphrase)
    if user is not None:
        keys = dataclasses.replace(keys, user=check_user(user))
    path = _user_file(store, keys.user)
    if path.exists() and not replace:
        raise KeyStoreError(f"user {keys.user!r} already has a key file ({path}); importing would replace "
                            "its keys: choose another user name or pass replace=True")
    _save(store, keys, passphrase, keyfile.n, replace=replace)
    return keys


def list_users(store: Path) -> list[str]:
    store = Path(store)
    if not store.is_dir():
        return []
    return sorted(p.stem for p in store.glob("*.key") if _USER.fullmatch(p.stem) and p.is_file())


def remove_user(store: Path, user: str) -> None:
    """Deletes the key file, and its passphrase from the OS keyring: images protected with its keys
    become unrecoverable (no backup kept)."""
    path = _user_file(store, user)
    try:
        path.unlink()
    except FileNotFoundError:
        raise KeyStoreError(f"no key file for user {user!r} in {store}") from None
    _sync_keyring(store, user, None)  # a passphrase for keys that are gone is only a liability


def public_info(store: Path, user: str) -> dict:
    """What the header says in clear, without the passphrase. Checked for form only: it is
    authenticated (with the rest of the file) by an unlock, not before."""
    keyfile = _read_user(store, user)
    return {
        "user": keyfile.user,
        "file": str(keyfile.path),
        "signing_public_key": _b64(keyfile.public_key),
        "rgan_keys": [{"id": key_id, "created": _time_text(created)} for key_id, created in keyfile.rgan_keys],
        "active_key_id": keyfile.rgan_keys[-1][0],
        "kdf": {"name": "scrypt", "n": keyfile.n, "r": KDF_R, "p": KDF_P},
    }


def passphrase_from_env_or_file(passphrase_file: Path | None) -> str | None:
    """The passphrase for a non-interactive unlock: the file if one is given (an explicit choice
    wins over the environment), else $AGENT_PASSPHRASE; None if neither (then the CLI asks).
    One trailing newline is stripped, as editors and `echo` add it."""
    if passphrase_file is not None:
        try:
            text = Path(passphrase_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise KeyStoreError(f"cannot read the passphrase file {passphrase_file}: {error}") from None
        return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
    # empty counts as unset, so `AGENT_PASSPHRASE= agent …` never unlocks with an empty passphrase
    return os.environ.get(PASSPHRASE_ENV) or None


# ---------------------------------------------------------------- the OS keyring


def keyring_backend():
    """The OS keyring (Keychain, Secret Service, Windows Credential Locker) through the optional
    `keyring` package, or None without one: the package is not installed, or it found no real store
    and fell back to a backend that refuses (`fail`) or drops (`null`) everything; both have a
    priority of at most 0, every real one above."""
    try:
        import keyring
    except ImportError:
        return None
    backend = keyring.get_keyring()
    return backend if backend.priority > 0 else None


def remember_passphrase(store: Path, user: str, passphrase: str) -> None:
    """Stores the user's passphrase in the OS keyring, after checking that it unlocks their key file
    (a wrong one kept there would make every later command fail)."""
    unlock(store, user, passphrase)
    _set_keyring(store, user, passphrase, "store the passphrase in")


def recall_passphrase(store: Path, user: str) -> str | None:
    """The passphrase `remember_passphrase` stored for this user's key file; None when there is no
    OS keyring or nothing stored."""
    if keyring_backend() is None:
        return None
    return _keyring("read", lambda backend: backend.get_password(KEYRING_SERVICE, _keyring_name(store, user))) or None


def forget_passphrase(store: Path, user: str) -> bool:
    """Removes the user's passphrase from the OS keyring; False if none was stored. Works for a user
    whose key file is already gone."""
    name = _keyring_name(store, user)
    if _keyring("read", lambda backend: backend.get_password(KEYRING_SERVICE, name)) is None:
        return False
    _keyring("remove the passphrase from", lambda backend: backend.delete_password(KEYRING_SERVICE, name))
    return True


def _keyring(doing: str, action):
    backend = keyring_backend()
    if backend is None:
        raise KeyStoreError(f"cannot {doing} the OS keyring: there is none here (install the agent with the "
                            "`keyring` extra; on Linux it also needs a Secret Service such as GNOME Keyring "
                            "or KWallet); use AGENT_PASSPHRASE or --passphrase-file instead")
    from keyring.errors import KeyringError

    try:
        return action(backend)
    except KeyringError as error:
        raise KeyStoreError(f"cannot {doing} the OS keyring: {error or type(error).__name__}") from None


def _keyring_name(store: Path, user: str) -> str:
    # the key file's store is part of the name: two homes may each have a user `default`
    return f"{check_user(user)}@{Path(store).resolve()}"


def _set_keyring(store: Path, user: str, passphrase: str, doing: str) -> None:
    _keyring(doing, lambda backend: backend.set_password(KEYRING_SERVICE, _keyring_name(store, user), passphrase))


def _sync_keyring(store: Path, user: str, passphrase: str | None) -> None:
    """Keeps the OS keyring in step with the key file just written under `passphrase` (a new
    passphrase, a replacing import, a user re-created under the same name) or removed (None), so
    that a stored passphrase never goes stale and fails every later command."""
    try:
        stored = recall_passphrase(store, user)
        if stored is not None and passphrase is None:
            forget_passphrase(store, user)
        elif stored is not None and stored != passphrase:
            _set_keyring(store, user, passphrase, "update the passphrase in")
    except KeyStoreError as error:
        done = "removed" if passphrase is None else "written"
        raise KeyStoreError(f"the key file of user {user!r} was {done}, but {error}; run "
                            f"`agent keys forget --user {user}`") from None


# ---------------------------------------------------------------- data at rest


def encrypt_data(data_key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """version byte ‖ 12-byte random nonce ‖ AES-256-GCM(ciphertext ‖ tag).

    `aad` names what the data is (e.g. b"site-name"), so that one blob cannot be passed off as
    another; the version byte is authenticated with it. Random 96-bit nonces are safe for far more
    messages under one key (2**32) than a user will ever store."""
    return _encrypt_data(data_key, plaintext, aad, os.urandom(NONCE_BYTES))


def decrypt_data(data_key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < 1 + NONCE_BYTES + TAG_BYTES:
        raise KeyStoreError("encrypted data is truncated")
    if blob[0] != DATA_VERSION:
        raise KeyStoreError(f"encrypted data version {blob[0]} is not supported (this agent reads {DATA_VERSION})")
    nonce, sealed = blob[1:1 + NONCE_BYTES], blob[1 + NONCE_BYTES:]
    try:
        return AESGCM(_check_data_key(data_key)).decrypt(nonce, sealed, blob[:1] + aad)
    except InvalidTag:
        raise KeyStoreError("encrypted data failed authentication: wrong key or associated data, "
                            "or the data was modified") from None


def _encrypt_data(data_key: bytes, plaintext: bytes, aad: bytes, nonce: bytes) -> bytes:
    version = bytes([DATA_VERSION])
    return version + nonce + AESGCM(_check_data_key(data_key)).encrypt(nonce, plaintext, version + aad)


def _check_data_key(data_key: bytes) -> bytes:
    if not isinstance(data_key, bytes) or len(data_key) != DATA_KEY_BYTES:
        raise ValueError(f"a data key is {DATA_KEY_BYTES} bytes")
    return data_key


# ---------------------------------------------------------------- the file format


@dataclass(frozen=True)
class _KeyFile:
    """A key file parsed and checked for form; `header` is the document less `secrets`, the AAD."""

    path: Path
    header: dict
    user: str
    n: int
    salt: bytes
    check: bytes
    nonce: bytes
    public_key: bytes
    rgan_keys: tuple[tuple[str, datetime], ...]
    secrets: bytes


def _derive(passphrase: str, salt: bytes, n: int) -> tuple[bytes, bytes]:
    """(cipher key, passphrase check): the halves of one 64-byte scrypt output.

    The check, stored in the header, tells a wrong passphrase from a modified file, so each gets
    its own message. It costs an attacker nothing he lacked: testing a guess against the check
    takes the same scrypt run as testing it against the GCM tag, and the halves come from
    independent PBKDF2 blocks, so the check says nothing about the cipher key."""
    # NFC: the same passphrase can arrive composed or decomposed depending on the keyboard,
    # terminal and files it went through; both must derive the same key (as RFC 8265 does)
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    out = Scrypt(salt=salt, length=32 + CHECK_BYTES, n=n, r=KDF_R, p=KDF_P).derive(secret)
    return out[:32], out[32:]


def _seal(keys: UserKeys, passphrase: str, n: int, salt: bytes, nonce: bytes) -> bytes:
    """The key file's bytes; salt and nonce are parameters so that tests can pin them."""
    cipher_key, check = _derive(passphrase, salt, n)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "user": keys.user,
        "kdf": {"name": "scrypt", "n": n, "r": KDF_R, "p": KDF_P, "salt": _b64(salt), "check": _b64(check)},
        "cipher": {"name": "aes-256-gcm", "nonce": _b64(nonce)},
        "public": {
            "signing_key": _b64(keys.public_key_bytes),
            "rgan_keys": [{"id": k.key_id, "created": _time_text(k.created)} for k in keys.rgan_keys],
        },
    }
    # only the secret bytes: ids, times and the public key are in the (authenticated) header
    plaintext = _canonical({
        "rgan_keys": [_b64(k.key) for k in keys.rgan_keys],
        "signing_key": _b64(keys.signing_key_bytes),
        "data_key": _b64(keys.data_key),
    })
    secrets = AESGCM(cipher_key).encrypt(nonce, plaintext, _canonical(header))
    return (json.dumps({**header, "secrets": _b64(secrets)}, indent=2) + "\n").encode("ascii")


def _open(keyfile: _KeyFile, passphrase: str) -> UserKeys:
    cipher_key, check = _derive(passphrase, keyfile.salt, keyfile.n)
    if not hmac.compare_digest(check, keyfile.check):
        # also what an edit of the kdf fields looks like: they change the derived key
        raise KeyStoreError(f"wrong passphrase for user {keyfile.user!r} ({keyfile.path})")
    try:
        plaintext = AESGCM(cipher_key).decrypt(keyfile.nonce, keyfile.secrets, _canonical(keyfile.header))
    except InvalidTag:
        raise KeyStoreError(f"{keyfile.path}: the file was modified: its header or encrypted secrets "
                            "do not match (the passphrase is right); restore it from a backup") from None
    # authentic from here on, so a mismatch below is a faulty writer, not an attacker
    try:
        secrets = json.loads(plaintext)
        if set(secrets) != {"rgan_keys", "signing_key", "data_key"} or \
                len(secrets["rgan_keys"]) != len(keyfile.rgan_keys):
            raise ValueError("unexpected fields or key count")
        rgan_keys = tuple(RganKey(created=created, key=_unb64(text)) for (_, created), text
                          in zip(keyfile.rgan_keys, secrets["rgan_keys"]))
        keys = UserKeys(keyfile.user, rgan_keys, _unb64(secrets["signing_key"]), _unb64(secrets["data_key"]))
        if [k.key_id for k in rgan_keys] != [key_id for key_id, _ in keyfile.rgan_keys]:
            raise ValueError("key ids do not match the keys")
        if keys.public_key_bytes != keyfile.public_key:
            raise ValueError("the public key does not match the signing key")
    except (ValueError, TypeError, binascii.Error) as error:
        raise KeyStoreError(f"{keyfile.path}: the secrets are inconsistent with the header ({error})") from None
    return keys


def _parse(data: bytes, path: Path) -> _KeyFile:
    """Checks the form of every field (nothing is trusted before `_open` authenticates it)."""

    def bad(problem: str) -> KeyStoreError:
        return KeyStoreError(f"{path}: {problem}")

    def fields(value, names: set[str], where: str) -> dict:
        if not isinstance(value, dict):
            raise bad(f"{where} must be a JSON object")
        if set(value) != names:
            raise bad(f"{where} has fields {sorted(value)}, expected {sorted(names)}")
        return value

    def binary(value, size: int | None, where: str) -> bytes:
        try:
            raw = _unb64(value)
        except (TypeError, ValueError, binascii.Error):
            raise bad(f"{where} is not base64") from None
        if size is not None and len(raw) != size:
            raise bad(f"{where} must be {size} bytes, got {len(raw)}")
        return raw

    def literal(value, expected, where: str):
        if type(value) is not type(expected) or value != expected:
            raise bad(f"{where} must be {expected!r}, got {value!r}")

    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as error:
        raise bad(f"not a readable key file (truncated or corrupt: {error})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"not a key file (format is not {FORMAT!r})")
    if doc.get("version") != VERSION or type(doc.get("version")) is not int:
        raise bad(f"key file version {doc.get('version')!r} is not supported (this agent reads version {VERSION}); "
                  "a newer agent wrote it")
    fields(doc, _FIELDS, "the key file")
    user = doc["user"]
    if not isinstance(user, str) or not _USER.fullmatch(user):
        raise bad(f"invalid user name {user!r}")
    kdf = fields(doc["kdf"], {"name", "n", "r", "p", "salt", "check"}, "kdf")
    literal(kdf["name"], "scrypt", "kdf.name")
    literal(kdf["r"], KDF_R, "kdf.r")
    literal(kdf["p"], KDF_P, "kdf.p")
    n = kdf["n"]
    if not _valid_n(n):
        raise bad(f"kdf.n must be a power of two from 2**14 to 2**20, got {n!r}")
    cipher = fields(doc["cipher"], {"name", "nonce"}, "cipher")
    literal(cipher["name"], "aes-256-gcm", "cipher.name")
    public = fields(doc["public"], {"signing_key", "rgan_keys"}, "public")
    if not isinstance(public["rgan_keys"], list) or not public["rgan_keys"]:
        raise bad("public.rgan_keys must be a non-empty list")
    rgan_keys = []
    for i, entry in enumerate(public["rgan_keys"]):
        entry = fields(entry, {"id", "created"}, f"public.rgan_keys[{i}]")
        if not isinstance(entry["id"], str) or not re.fullmatch(f"[0-9a-f]{{{2 * _KEY_ID_BYTES}}}", entry["id"]):
            raise bad(f"public.rgan_keys[{i}].id must be {2 * _KEY_ID_BYTES} lowercase hex digits")
        try:
            created = datetime.strptime(entry["created"], _TIME_FORMAT).replace(tzinfo=UTC)
        except (TypeError, ValueError):
            created = None
        if created is None or _time_text(created) != entry["created"]:
            raise bad(f"public.rgan_keys[{i}].created must be a UTC time like 2025-01-31T23:59:59Z")
        rgan_keys.append((entry["id"], created))
    if len({key_id for key_id, _ in rgan_keys}) != len(rgan_keys):
        raise bad("public.rgan_keys has duplicate ids")
    header = {name: value for name, value in doc.items() if name != "secrets"}
    return _KeyFile(
        path=path, header=header, user=user, n=n,
        salt=binary(kdf["salt"], SALT_BYTES, "kdf.salt"),
        check=binary(kdf["check"], CHECK_BYTES, "kdf.check"),
        nonce=binary(cipher["nonce"], NONCE_BYTES, "cipher.nonce"),
        public_key=binary(public["signing_key"], SIGNING_KEY_BYTES, "public.signing_key"),
        rgan_keys=tuple(rgan_keys),
        secrets=binary(doc["secrets"], None, "secrets"),
    )


def _canonical(value) -> bytes:
    """The one byte string a JSON value authenticates as: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # JSON readers disagree on which of two equal names wins; refuse rather than guess
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate field in {names}")
    return dict(pairs)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError("base64 text expected")
    return base64.b64decode(text, validate=True)


def _time_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)  # the file keeps whole seconds


# ---------------------------------------------------------------- files


def _user_file(store: Path, user: str) -> Path:
    return Path(store) / f"{check_user(user)}.key"


def _read(path: Path, missing: str) -> _KeyFile:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyStoreError(missing) from None
    except OSError as error:
        raise KeyStoreError(f"cannot read {path}: {error.strerror}") from None
    return _parse(data, path)


def _read_user(store: Path, user: str) -> _KeyFile:
    path = _user_file(store, user)
    keyfile = _read(path, f"no key file for user {user!r} in {store}: run `agent init` to create one")
    if keyfile.user != user:
        raise KeyStoreError(f"{path}: the file holds the keys of user {keyfile.user!r}, not {user!r}")
    return keyfile


def _valid_n(n) -> bool:
    return type(n) is int and n & (n - 1) == 0 and KDF_N_MIN <= n <= KDF_N_MAX


def _seal_fresh(keys: UserKeys, passphrase: str, n: int) -> bytes:
    """`_seal` with a fresh salt and nonce, as on every write, after checking the caller's choices."""
    if not isinstance(passphrase, str) or not passphrase:
        raise KeyStoreError("the passphrase must be a non-empty string")
    if not _valid_n(n):
        raise ValueError(f"kdf_n must be a power of two from 2**14 to 2**20, got {n!r}")
    return _seal(keys, passphrase, n, os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES))


def _save(store: Path, keys: UserKeys, passphrase: str, n: int, *, replace: bool) -> None:
    data = _seal_fresh(keys, passphrase, n)
    store = Path(store)
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(store, 0o700)  # also when it existed: the store holds nothing for other users
    write_private(_user_file(store, keys.user), data, replace=replace)
    _sync_keyring(store, keys.user, passphrase)


def write_private(target: Path, data: bytes, *, replace: bool) -> None:
    """Writes atomically with mode 0o600; without `replace`, refuses an existing `target`."""
    # atomic_path creates its temporary file as 0o666 minus the umask and restores that mode just
    # before the rename, so a chmod inside the block would be undone: narrow the umask while it
    # runs instead. The umask is process-wide, but it is only ever made stricter, for milliseconds.
    old_umask = os.umask(0o077)
    try:
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
            # checked again just before the rename, leaving a window of microseconds (a hard link
            # would close it, but not every file system a backup goes to has them)
            if not replace and target.exists():
                raise KeyStoreError(f"{target} already exists; not overwriting it")
    finally:
        os.umask(old_umask)
