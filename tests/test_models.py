"""Models per user (agent/service/models.py): import, list, use, export; encryption at rest with the
user's data key; loading for protection and recovery; refusal of anything but a keyed model file;
and the `agent models` commands through typer's runner."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE
from PIL import Image
from sqlalchemy import select
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from agent import keys as keystore
from agent import images, pipeline
from agent import store as db
from agent.cli import app
from agent.images import image_psnr
from agent.pipeline import DEFAULT_MODEL_PATH
from agent.service import models
from agent.service.home import ServiceError, database, logged_user
from agent.service.models import DEFAULT_MODEL_NAME
from agent.service.protect import protect_paths
from agent.service.recover import recover_paths
from agent.service.users import add_user, init_user


CIFAR_MODEL = DEFAULT_MODEL_PATH.parent / "cifar10-rgan.safetensors"
PW = "correct horse"
KDF = 2**14


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_variant(path: Path, transform=None, metadata: dict | None = None) -> Path:
    """The shipped model's tensors (one of them changed by `transform`) under its own metadata
    (or `metadata`): another valid model file, with another SHA-256."""
    with safe_open(str(DEFAULT_MODEL_PATH), framework="pt") as handle:
        shipped_metadata = handle.metadata()
    tensors = load_file(str(DEFAULT_MODEL_PATH))
    if transform is not None:
        transform(tensors)
    save_file(tensors, str(path), metadata=shipped_metadata if metadata is None else metadata)
    return path


def nudge(tensors: dict, factor: float = 1.001) -> None:
    name = next(n for n, t in tensors.items() if t.is_floating_point() and t.numel() > 100)
    tensors[name] = tensors[name] * factor


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    init_user(home, "alice", PW, kdf_n=KDF)
    add_user(home, "bob", "bob's words", kdf_n=KDF)
    return home


@pytest.fixture
def mine(tmp_path) -> Path:
    return write_variant(tmp_path / "mine.safetensors", nudge)


def alice(home: Path) -> keystore.UserKeys:
    return keystore.unlock(home / "keys", "alice", PW)


def model_row(home: Path, user: str, sha256: str):
    with database(home) as factory, factory() as session:
        owner = logged_user(session, user)
        return session.scalar(select(db.ModelRow).where(db.ModelRow.user_id == owner.id, db.ModelRow.sha256 == sha256))


def table(home: Path, user: str = "alice") -> list[tuple[str, bool]]:
    return [(m["name"], m["active"]) for m in models.list_models(home, user)]


# ---------------------------------------------------------------- import, list, use

def test_import_list_use_and_the_active_model_protects(home, mine):
    assert table(home) == [("default", True)]
    info = models.import_model(home, "alice", PW, mine)
    assert info["imported"] and info["name"] == "mine" and info["sha256"] == sha(mine.read_bytes())
    assert info["owner"] == "alice" and info["encrypted"] and not info["active"]
    assert info["summary"] == "trained on photos, 26 epochs"  # from the file's own metadata
    assert table(home) == [("default", True), ("mine", False)]
    assert table(home, "bob") == [("default", True)]  # models are per user

    assert models.use_model(home, "alice", "mine")["sha256"] == info["sha256"]
    assert table(home) == [("default", False), ("mine", True)]
    assert table(home, "bob") == [("default", True)]
    with database(home) as factory, factory.begin() as session:
        row, model = models.active_model(session, home, alice(home))
    assert row.sha256 == info["sha256"] and row.encrypted
    weights = load_file(str(mine))
    assert all(torch.equal(model.state_dict()[name], weights[name]) for name in weights)

    # what it protects, it recovers, and recovery finds it by the record's SHA-256
    with Image.open(SAMPLE) as image:
        pixels = np.asarray(image.convert("RGB").crop((0, 0, 96, 64)))
    key = alice(home).active_rgan_key.key
    protected, protect_info = pipeline.protect(pixels, key, model=model)
    with database(home) as factory, factory() as session:
        same = models.model_with_sha256(session, home, alice(home), info["sha256"])
    recovered = pipeline.recover(protected, key, protect_info, model=same)
    assert image_psnr(recovered, pixels) > image_psnr(protected, pixels) + 5

    by_prefix = models.use_model(home, "alice", "default")
    assert by_prefix["name"] == "default" and table(home) == [("default", True), ("mine", False)]
    with database(home) as factory, factory.begin() as session:
        row, model = models.active_model(session, home, alice(home))
    assert row.user_id is None and model is pipeline.default_model()
    models.use_model(home, "alice", info["sha256"][:8])
    assert table(home) == [("default", False), ("mine", True)]


def test_the_same_weights_twice_give_the_existing_model_and_names_do_not_clash(home, mine, tmp_path):
    first = models.import_model(home, "alice", PW, mine, "tuned")
    again = models.import_model(home, "alice", PW, shutil.copy(mine, tmp_path / "copy.safetensors"))
    assert not again["imported"] and again["name"] == "tuned" and again["sha256"] == first["sha256"]
    other = write_variant(tmp_path / "other.safetensors", lambda t: nudge(t, 1.002))
    with pytest.raises(ServiceError, match="already has another model named 'tuned'.*--name"):
        models.import_model(home, "alice", PW, other, "tuned")
    with pytest.raises(ServiceError, match="'default' names the shipped model"):
        models.import_model(home, "alice", PW, other, "default")
    with pytest.raises(ServiceError, match="invalid model name"):
        models.import_model(home, "alice", PW, other, "bad\nname")
    assert [m["name"] for m in models.list_models(home, "alice")] == ["default", "tuned"]
    assert len(list((home / "models" / "alice").iterdir())) == 1
    # the shipped file itself is a valid model of one's own (same SHA-256 as the default)
    models.import_model(home, "alice", PW, DEFAULT_MODEL_PATH, "shipped")
    with pytest.raises(ServiceError, match=r"'af8317' matches several models: default \(af8317.*shipped \(af8317"):
        models.use_model(home, "alice", models.list_models(home, "alice")[0]["sha256"][:6])
    with pytest.raises(ServiceError, match="no model named 'nope'.*default, tuned, shipped"):
        models.use_model(home, "alice", "nope")


def test_the_stored_file_is_encrypted_private_and_bound_to_its_user_and_row(home, mine, tmp_path):
    info = models.import_model(home, "alice", PW, mine)
    stored = Path(info["file"])
    assert stored.parent == home / "models" / "alice"
    assert stat_mode(stored) == 0o600 and stat_mode(stored.parent) == 0o700 and stat_mode(home / "models") == 0o700
    blob, plain = stored.read_bytes(), mine.read_bytes()
    assert plain[-4096:] not in blob and b"rgan-agent/model" not in blob  # neither weights nor metadata in clear
    row = model_row(home, "alice", info["sha256"])
    assert models.load_model(home, alice(home), row) is not None

    bob = keystore.unlock(home / "keys", "bob", "bob's words")
    with pytest.raises(ServiceError, match="not user 'bob'"):
        models.load_model(home, bob, row)
    (home / "models" / "bob").mkdir()
    shutil.copy(stored, home / "models" / "bob" / stored.name)  # even moved into bob's folder
    row.file = f"bob/{stored.name}"
    with pytest.raises(ServiceError, match="does not decrypt with user 'bob'"):
        models.load_model(home, bob, row)

    # another of alice's files swapped in for this one: bound to its own SHA-256
    other = models.import_model(home, "alice", PW, write_variant(tmp_path / "o.safetensors", lambda t: nudge(t, 1.002)))
    shutil.copy(other["file"], stored)
    row = model_row(home, "alice", info["sha256"])
    with pytest.raises(ServiceError, match="does not decrypt with user 'alice'"):
        models.load_model(home, alice(home), row)

    tampered = bytearray(blob)
    tampered[len(tampered) // 2] ^= 1
    stored.write_bytes(bytes(tampered))
    with pytest.raises(ServiceError, match="modified"):
        models.load_model(home, alice(home), row)
    models.use_model(home, "alice", "mine")
    with database(home) as factory, factory.begin() as session, pytest.raises(ServiceError, match="modified"):
        models.active_model(session, home, alice(home))
    stored.unlink()
    with pytest.raises(ServiceError, match="is missing.*import the model again"):
        models.load_model(home, alice(home), row)
    assert [m["size"] for m in models.list_models(home, "alice")][1] is None  # listed, as missing


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_only_keyed_model_files_are_accepted(home, tmp_path):
    weights = load_file(str(DEFAULT_MODEL_PATH))
    torch.save(weights, tmp_path / "model.pt")  # a zip of pickles
    torch.save(weights, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # a bare pickle
    save_file(weights, str(tmp_path / "bare.safetensors"))  # no metadata
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(4096))
    with safe_open(str(DEFAULT_MODEL_PATH), framework="pt") as handle:
        metadata = handle.metadata()
    cases = {
        "model.pt": "is a PyTorch pickle.*never loads pickles",
        "legacy.pth": "is a PyTorch pickle",
        "bare.safetensors": "not an rgan-agent model",
        "empty.safetensors": "empty or truncated",
        "garbage.safetensors": "not safetensors",
        "truncated.safetensors": "damaged safetensors file",
        "unkeyed.safetensors": "unkeyed model",
        "newer.safetensors": "version '9'.*newer agent",
        "mismatched.safetensors": "does not match its own configuration",
        "nan.safetensors": "NaN or infinite",
        "bad-config.safetensors": "unusable model configuration",
    }
    (tmp_path / "truncated.safetensors").write_bytes(DEFAULT_MODEL_PATH.read_bytes()[:-1000])
    shutil.copy(CIFAR_MODEL, tmp_path / "unkeyed.safetensors")
    write_variant(tmp_path / "newer.safetensors", metadata={**metadata, "version": "9"})
    write_variant(tmp_path / "mismatched.safetensors", lambda t: t.pop(next(iter(t))))
    write_variant(tmp_path / "nan.safetensors", lambda t: next(v for v in t.values() if v.is_floating_point()).fill_(
        float("nan")))
    write_variant(tmp_path / "bad-config.safetensors", metadata={**metadata, "config": '{"width": -1}'})
    for name, problem in cases.items():
        with pytest.raises(ServiceError, match=problem):
            models.import_model(home, "alice", PW, tmp_path / name)
    with pytest.raises(ServiceError, match="no such file"):
        models.import_model(home, "alice", PW, tmp_path / "absent.safetensors")
    with pytest.raises(ServiceError, match="is a folder"):
        models.import_model(home, "alice", PW, tmp_path)
    with pytest.raises(keystore.KeyStoreError, match="wrong passphrase"):
        models.import_model(home, "alice", "not it", DEFAULT_MODEL_PATH)
    assert table(home) == [("default", True)] and not (home / "models").exists()


def test_export_round_trips_byte_exact_and_never_overwrites_by_accident(home, mine, tmp_path):
    models.import_model(home, "alice", PW, mine)
    out = tmp_path / "out" / "exported.safetensors"
    info = models.export_model(home, "alice", PW, "mine", out)
    assert out.read_bytes() == mine.read_bytes() and info["sha256"] == sha(out.read_bytes())
    with pytest.raises(ServiceError, match="already exists; pass --overwrite"):
        models.export_model(home, "alice", PW, "mine", out)
    models.export_model(home, "alice", PW, "default", out, overwrite=True)
    assert out.read_bytes() == DEFAULT_MODEL_PATH.read_bytes()
    with pytest.raises(keystore.KeyStoreError, match="wrong passphrase"):
        models.export_model(home, "alice", "not it", "mine", tmp_path / "x.safetensors")
    with pytest.raises(ServiceError, match="user 'bob' has no model named 'mine'"):
        models.export_model(home, "bob", "bob's words", "mine", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_recovery_finds_the_model_by_sha256_whichever_is_active(home, mine):
    info = models.import_model(home, "alice", PW, mine)
    keys = alice(home)
    with database(home) as factory, factory() as session:
        assert models.model_with_sha256(session, home, keys, sha(DEFAULT_MODEL_PATH.read_bytes())) \
            is pipeline.default_model()
        assert models.model_with_sha256(session, home, keys, info["sha256"]) is not None
        bob = keystore.unlock(home / "keys", "bob", "bob's words")
        with pytest.raises(ServiceError, match="model user 'bob' does not have.*agent models import"):
            models.model_with_sha256(session, home, bob, info["sha256"])


def test_a_new_shipped_model_gets_its_row_when_it_first_protects(home, monkeypatch):
    monkeypatch.setattr(models, "default_model_sha256", lambda: "ab" * 32)  # an upgraded agent's
    with database(home) as factory, factory.begin() as session:
        row, model = models.active_model(session, home, alice(home))
    assert (row.sha256, row.user_id, row.name) == ("ab" * 32, None, DEFAULT_MODEL_NAME)
    assert model is pipeline.default_model()


# ---------------------------------------------------------------- the commands

def test_models_commands_with_the_runner(home, mine, tmp_path):
    runner = CliRunner()
    env = {"AGENT_HOME": str(home), "AGENT_PASSPHRASE": PW}

    def agent(*args):
        return runner.invoke(app, ["models", *map(str, args)], env=env)

    result = agent("import", mine, "--name", "tuned", "--user", "alice")
    assert result.exit_code == 0, result.output
    assert "imported model tuned" in result.output
    assert "already imported as model tuned" in agent("import", mine, "-u", "alice").output
    assert agent("use", "tuned", "-u", "alice").exit_code == 0
    listing = json.loads(agent("list", "--json", "-u", "alice").stdout)
    assert [(m["name"], m["active"]) for m in listing] == [("default", False), ("tuned", True)]
    table_output = agent("list", "-u", "alice").output
    assert "tuned" in table_output and "active" in table_output
    result = agent("export", "tuned", tmp_path / "back.safetensors", "-u", "alice")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "back.safetensors").read_bytes() == mine.read_bytes()

    (tmp_path / "evil.pt").write_bytes(b"\x80\x04" + os.urandom(64))
    for args, problem in (
        (("import", tmp_path / "evil.pt", "-u", "alice"), "never loads pickles"),
        (("use", "nope", "-u", "alice"), "no model named 'nope'"),
        (("export", "tuned", tmp_path / "back.safetensors", "-u", "alice"), "--overwrite"),
        (("list",), "several users"),
    ):
        result = agent(*args)
        assert result.exit_code == 2 and problem in result.output, result.output


# ---------------------------------------------------------------- protect and recover with them

def halve_generator_output(tensors: dict) -> None:
    last = [name for name in tensors if name.startswith("generator.") and name.endswith(".weight")][-1]
    tensors[last] = tensors[last] * 0.5


def test_protection_uses_the_active_model_and_recovery_the_one_that_protected(home, tmp_path):
    """A user's own model proposes where protection starts once it is active; a record names it by
    SHA-256, and recovery uses that model even after the user has switched back to the shipped one."""
    variant = write_variant(tmp_path / "variant.safetensors", halve_generator_output)
    variant_model, _ = models.model_from_bytes(variant.read_bytes(), "variant")
    models.import_model(home, "alice", PW, variant, name="variant")
    models.use_model(home, "alice", "variant")
    photo = tmp_path / "photo.png"
    Image.open(SAMPLE).convert("RGB").crop((0, 0, 160, 120)).save(photo)
    [done] = protect_paths(home, "alice", PW, [photo], tmp_path / "out")
    assert done.ok
    with database(home) as factory, factory() as session:
        [record] = db.list_records(session)
    assert record.model_sha256 == sha(variant.read_bytes())
    assert record.params["model"] == "variant"

    models.use_model(home, "alice", "default")
    [back] = recover_paths(home, [done.output], tmp_path / "rec", PW)
    assert back.ok
    recovered = images.read_image(back.output)
    protected = images.read_image(done.output)
    key = alice(home).active_rgan_key.key
    info = pipeline.ProtectInfo.from_dict(record.params["protect_info"])
    assert np.array_equal(recovered, pipeline.recover(protected, key, info, variant_model))
    assert not np.array_equal(recovered, pipeline.recover(protected, key, info, pipeline.default_model()))


def test_a_model_is_decrypted_and_checked_every_time_but_loaded_once(home, mine):
    models.import_model(home, "alice", PW, mine, name="mine")
    row = model_row(home, "alice", sha(mine.read_bytes()))
    first = models.load_model(home, alice(home), row)
    assert models.load_model(home, alice(home), row) is first
    stored = home / models.MODELS_DIR / "alice" / f"{row.sha256}.enc"
    stored.write_bytes(stored.read_bytes()[:-1] + bytes([stored.read_bytes()[-1] ^ 1]))
    with pytest.raises(ServiceError, match="modified"):
        models.load_model(home, alice(home), row)
