"""Unlocking from the OS keyring (`keyring`), with an in-memory backend in place of the machine's:
`agent keys remember | forget`, the order of the passphrase's sources, and a stored passphrase that
follows the key file (new passphrase, removed user)."""

import sys

import keyring
import pytest
from keyring.backend import KeyringBackend
from keyring.backends import fail
from keyring.errors import KeyringError, PasswordDeleteError
from typer.testing import CliRunner

from agent import keys as keystore

from agent.cli import app
from agent.keys import KeyStoreError
from agent.service.users import change_passphrase, init_user, remove_user, rotate_key

PW = "correct horse"
KDF = 2**14
runner = CliRunner()


class MemoryKeyring(KeyringBackend):
    """A keyring that keeps its secrets in a dict, as an OS keyring would keep them on disk."""

    priority = 1

    def __init__(self):
        super().__init__()
        self.secrets: dict[tuple[str, str], str] = {}

    def get_password(self, service_name, username):
        return self.secrets.get((service_name, username))

    def set_password(self, service_name, username, password):
        self.secrets[(service_name, username)] = password

    def delete_password(self, service_name, username):
        if self.secrets.pop((service_name, username), None) is None:
            raise PasswordDeleteError("not stored")


class BrokenKeyring(MemoryKeyring):
    def get_password(self, service_name, username):
        raise KeyringError("the keychain is locked")


@pytest.fixture
def memory():
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    init_user(home, "alice", PW, kdf_n=KDF)
    return home


def store(home):
    return home / "keys"


def test_no_usable_keyring_means_no_keyring(monkeypatch, home):
    assert isinstance(keyring.get_keyring(), fail.Keyring)  # conftest: never the machine's own
    assert keystore.keyring_backend() is None
    assert keystore.recall_passphrase(store(home), "alice") is None
    with pytest.raises(KeyStoreError, match="no OS keyring is available|there is none here"):
        keystore.remember_passphrase(store(home), "alice", PW)
    monkeypatch.setitem(sys.modules, "keyring", None)  # the optional extra not installed
    assert keystore.keyring_backend() is None


def test_remember_recall_forget(memory, home, tmp_path):
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        keystore.remember_passphrase(store(home), "alice", "not it")
    assert memory.secrets == {}
    keystore.remember_passphrase(store(home), "alice", PW)
    assert keystore.recall_passphrase(store(home), "alice") == PW
    [(service_name, username)] = memory.secrets
    assert service_name == "rgan-agent" and username == f"alice@{store(home).resolve()}"
    other = tmp_path / "other"  # another home's user of the same name is another entry
    init_user(other, "alice", "other words", kdf_n=KDF)
    assert keystore.recall_passphrase(store(other), "alice") is None
    assert keystore.forget_passphrase(store(home), "alice") is True
    assert keystore.forget_passphrase(store(home), "alice") is False
    assert memory.secrets == {}


def test_a_stored_passphrase_follows_the_key_file(memory, home):
    keystore.remember_passphrase(store(home), "alice", PW)
    rotate_key(home, "alice", PW)
    assert keystore.recall_passphrase(store(home), "alice") == PW
    change_passphrase(home, "alice", PW, "new words")
    assert keystore.recall_passphrase(store(home), "alice") == "new words"
    remove_user(home, "alice", "new words")
    assert memory.secrets == {}


def test_keyring_errors_are_clear(home):
    previous = keyring.get_keyring()
    keyring.set_keyring(BrokenKeyring())
    try:
        with pytest.raises(KeyStoreError, match="cannot read the OS keyring: the keychain is locked"):
            keystore.recall_passphrase(store(home), "alice")
        with pytest.raises(KeyStoreError, match="was written, but cannot read the OS keyring.*keys forget"):
            rotate_key(home, "alice", PW)
    finally:
        keyring.set_keyring(previous)


def test_cli_unlocks_from_the_keyring_after_env_and_file(memory, home, tmp_path):
    env = {"AGENT_HOME": str(home), "AGENT_PASSPHRASE": None}
    out = tmp_path / "model.safetensors"

    def agent(*args, **overrides):
        return runner.invoke(app, [str(a) for a in args], env={**env, **overrides})

    result = agent("models", "export", "default", out)
    assert result.exit_code == 2 and "agent keys remember" in result.output  # no terminal to ask in
    (tmp_path / "pw").write_text(PW + "\n")
    result = agent("keys", "remember", "--passphrase-file", tmp_path / "pw")
    assert result.exit_code == 0 and "now holds the passphrase of user alice" in result.output, result.output

    result = agent("models", "export", "default", out)  # neither AGENT_PASSPHRASE nor a file: the keyring
    assert result.exit_code == 0 and out.is_file(), result.output
    # the environment and a passphrase file come first
    result = agent("models", "export", "default", out, "--overwrite", AGENT_PASSPHRASE="not it")
    assert result.exit_code == 2 and "wrong passphrase" in result.output
    (tmp_path / "wrong").write_text("not it")
    result = agent("models", "export", "default", out, "--overwrite", "--passphrase-file", tmp_path / "wrong")
    assert result.exit_code == 2 and "wrong passphrase" in result.output
    # a new passphrase is never taken from the keyring
    assert "no new passphrase for user 'bob'" in agent("users", "add", "bob").output

    assert "removed the passphrase of user alice" in agent("keys", "forget").output
    assert "held no passphrase of user alice" in agent("keys", "forget", "--user", "alice").output
    result = agent("models", "export", "default", out, "--overwrite")
    assert result.exit_code == 2 and "no passphrase" in result.output
    result = agent("keys", "remember", "--passphrase-file", tmp_path / "wrong")
    assert result.exit_code == 2 and "wrong passphrase" in result.output and memory.secrets == {}
    result = agent("keys", "forget", "--user", "Not A Name")
    assert result.exit_code == 2 and "invalid user name" in result.output
