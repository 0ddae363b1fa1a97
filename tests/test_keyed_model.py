import pytest
import torch

from agent.rgan.config import ModelConfig, ReducerConfig
from agent.rgan.keying import key_pattern
from agent.rgan.model import RGAN, load_model, save_model
from agent.rgan.nets import PerturbationNet

KEYED = ModelConfig(width=4, g_depth=1, r_depth=1, keyed=True, key_noise=3 / 255, g_stride=2, norm="batch",
                    reducer=ReducerConfig(down="avg"))


def keyed_model():
    torch.manual_seed(0)
    return RGAN(KEYED).eval()


@pytest.mark.parametrize("size", [(32, 32), (37, 51), (9, 13)])
def test_half_resolution_net_keeps_any_size(size):
    net = PerturbationNet(4, 1, in_channels=6, stride=2, norm="batch").eval()
    assert net(torch.rand(2, 6, *size)).shape == (2, 3, *size)


def test_keyed_protection_stays_within_the_bound_and_needs_the_key():
    model = keyed_model()
    x = torch.rand(2, 3, 40, 36)
    pattern = key_pattern(bytes(range(32)), 40, 36)
    with torch.no_grad():
        adversarial = model.protect(x, pattern)
    assert (adversarial - x).abs().max() <= KEYED.epsilon + 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="need the key"):
        model.protect(x)
    with pytest.raises(ValueError, match="does not fit"):
        model.protect(x, key_pattern(bytes(32), 40, 35))


def test_the_key_decides_the_sign_of_the_key_share():
    model = keyed_model()
    x = torch.full((1, 3, 24, 24), 0.5)
    first, second = key_pattern(bytes(32), 24, 24), key_pattern(bytes(range(32)), 24, 24)
    with torch.no_grad():
        difference = model.perturbation(x, first) - model.perturbation(x, second)
    # G sees the key too, so only the sign-changed pixels must differ by about 2 * key_noise
    changed = first != second
    assert (difference[0][changed].abs() > KEYED.key_noise).float().mean() > 0.9


def test_recovery_with_the_wrong_key_is_worse_than_with_the_right_key():
    model = keyed_model()
    x = torch.rand(1, 3, 32, 32)
    right, wrong = key_pattern(bytes(32), 32, 32), key_pattern(bytes(range(32)), 32, 32)
    with torch.no_grad():
        adversarial = model.protect(x, right)
        error_right = (model.recover(adversarial, right) - x).pow(2).mean()
        error_wrong = (model.recover(adversarial, wrong) - x).pow(2).mean()
    assert error_wrong > 2 * error_right


def test_an_unkeyed_model_refuses_a_key():
    model = RGAN(ModelConfig(width=4, g_depth=1, r_depth=1)).eval()
    with pytest.raises(ValueError, match="not keyed"):
        model.protect(torch.rand(1, 3, 16, 16), key_pattern(bytes(32), 16, 16))


@pytest.mark.parametrize("changes, message", [
    ({"key_noise": 1 / 255}, "keyed"),
    ({"keyed": True, "key_noise": 8 / 255}, "key_noise"),
    ({"g_stride": 3}, "g_stride"),
    ({"norm": "layer"}, "norm"),
])
def test_bad_model_options_are_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)


def test_a_saved_keyed_model_loads_identically(tmp_path):
    model = keyed_model()
    save_model(model, tmp_path / "m.safetensors")
    loaded, _ = load_model(tmp_path / "m.safetensors")
    x, pattern = torch.rand(1, 3, 20, 28), key_pattern(bytes(32), 20, 28)
    with torch.no_grad():
        assert loaded.config == KEYED
        assert torch.equal(loaded.protect(x, pattern), model.protect(x, pattern))
