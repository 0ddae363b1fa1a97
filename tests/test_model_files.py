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
