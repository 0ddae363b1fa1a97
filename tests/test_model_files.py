import pytest
import torch
from safetensors.torch import save_file

from agent.rgan.config import ModelConfig, ReducerConfig
from agent.rgan.model import RGAN, load_model, save_model


def test_model_round_trips_with_its_config(tmp_path):
    config = ModelConfig(width=4, g_depth=2, r_depth=3, reducer=ReducerConfig(down="avg", up="deconv", kernel=3))
    model = RGAN(config).eval()
    save_model(model, tmp_path / "m.safetensors", extra={"note": "x"})
    loaded, extra = load_model(tmp_path / "m.safetensors")
    assert loaded.config == config and extra == {"note": "x"}
    x = torch.rand(1, 3, 20, 20)
    assert torch.equal(loaded.protect(x), model.protect(x))


def test_a_foreign_safetensors_file_is_refused(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an rgan-agent model"):
        load_model(tmp_path / "other.safetensors")


def test_the_shipped_version_1_cifar_model_still_loads():
    from pathlib import Path

    model, _ = load_model(Path(__file__).parents[1] / "agent" / "weights" / "cifar10-rgan.safetensors")
    assert not model.config.keyed


def test_an_unknown_format_version_is_refused(tmp_path):
    model = RGAN(ModelConfig(width=4, g_depth=1, r_depth=1))
    save_model(model, tmp_path / "m.safetensors")
    from safetensors.torch import load_file
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as handle:
        metadata = dict(handle.metadata())
    save_file(load_file(str(tmp_path / "m.safetensors")), str(tmp_path / "future.safetensors"),
              metadata={**metadata, "version": "99"})
    with pytest.raises(ValueError, match="version '99'"):
        load_model(tmp_path / "future.safetensors")
