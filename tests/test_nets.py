import itertools

import pytest
import torch

from agent.rgan.config import ModelConfig, ReducerConfig
from agent.rgan.model import RGAN, quantize
from agent.rgan.nets import Discriminator, PerturbationNet
from agent.rgan.reducer import DimensionReducer

SIZES = [(32, 32), (31, 17), (5, 9), (1, 1), (33, 64)]
REDUCERS = [
    ReducerConfig(down=down, up=up, kernel=kernel, skip=skip)
    for down, up, kernel, skip in itertools.product(
        ["conv", "avg", "max"], ["nearest", "unpool", "deconv"], [2, 3], [False, True])
]


@pytest.mark.parametrize("config", REDUCERS, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_every_reducer_keeps_the_shape(config, size):
    x = torch.randn(2, 3, *size)
    assert DimensionReducer(config)(x).shape == x.shape


@pytest.mark.parametrize(
    "config", [c for c in REDUCERS if not c.skip and c.up != "deconv"], ids=str)
def test_reducer_without_skip_makes_kxk_structures(config):
    """Without the skip, DR's output only has one degree of freedom per k×k window."""
    out = DimensionReducer(config)(torch.randn(1, 3, 8, 8))
    blocks = out.unfold(2, config.kernel, config.kernel).unfold(3, config.kernel, config.kernel)
    blocks = blocks.reshape(*blocks.shape[:4], -1)
    if config.up == "nearest":
        assert torch.allclose(blocks, blocks[..., :1].expand_as(blocks))
    else:  # max-unpooling: one non-zero value per window
        assert ((blocks != 0).sum(-1) <= 1).all()


def test_reducer_rejects_a_missing_mode_and_bad_options():
    with pytest.raises(ValueError, match="down-sampling"):
        DimensionReducer(ReducerConfig(down=None))
    with pytest.raises(ValueError, match="kernel"):
        ReducerConfig(kernel=1)
    with pytest.raises(ValueError, match="up-sampling"):
        ReducerConfig(up="bicubic")


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("depth", [0, 2])
def test_perturbation_net_and_discriminator_take_any_size(size, depth):
    x = torch.rand(2, 3, *size)
    assert PerturbationNet(4, depth)(x).shape == x.shape
    assert Discriminator(4)(torch.rand(2, 3, 32, 32)).shape[:2] == (2, 1)


@pytest.mark.parametrize("reducer", [ReducerConfig(down=None), ReducerConfig()], ids=["NA", "conv-nearest-skip"])
def test_protect_is_bounded_8_bit_and_recover_keeps_range(reducer):
    torch.manual_seed(0)
    model = RGAN(ModelConfig(width=4, g_depth=1, r_depth=1, reducer=reducer))
    # a huge output scale would expose a missing bound
    with torch.no_grad():
        model.generator.decoder[-1].weight.mul_(1000)
    x = torch.round(torch.rand(3, 3, 31, 17) * 255) / 255
    adversarial = model.protect(x)
    assert adversarial.shape == x.shape
    levels = adversarial * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    # bound + half a grey level of rounding
    assert (adversarial - x).abs().max() <= model.config.epsilon + 0.5 / 255 + 1e-6
    recovered = model.recover(adversarial)
    assert recovered.min() >= 0 and recovered.max() <= 1


def test_na_model_has_no_reducer_parameters():
    model = RGAN(ModelConfig(width=4, reducer=ReducerConfig(down=None)))
    assert isinstance(model.reducer, torch.nn.Identity)


def test_quantize_rounds_forward_and_passes_gradients_straight_through():
    x = torch.tensor([0.1234, 0.5, 0.99, 1.3, -0.2], requires_grad=True)
    y = quantize(x)
    assert torch.equal(y.detach(), torch.round(x.detach().clamp(0, 1) * 255) / 255)
    y.sum().backward()
    # straight through inside [0, 1]; clamped values get no gradient
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))
