import pytest
import torch

from agent.adversaries.nrp import NRP, make_ssp, train_nrp
from conftest import NoisyPairs, smooth_images

EPSILON = 16 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


def feature_net():
    """A small frozen random conv net: a surrogate with features, like a classifier's early layers.
    Its weights are scaled so that its features have about unit mean square, as a classifier's
    mid-level features do (ResNet-20's: 0.66), which keeps NRP's default loss weights meaningful."""
    torch.manual_seed(7)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
    )
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.mul_(4)
    return net.eval().requires_grad_(False)


def distortion(net, x, y):
    return (net(x) - net(y)).pow(2).mean().item()


def test_ssp_stays_in_the_budget_and_beats_random_noise_without_labels():
    net = feature_net()
    clean = smooth_images(4, 24, torch.Generator().manual_seed(1))
    ssp = make_ssp(net, clean, epsilon=EPSILON, steps=5, generator=torch.Generator().manual_seed(2))
    assert ssp.shape == clean.shape and not ssp.requires_grad
    assert (ssp - clean).abs().max() <= EPSILON + 1e-6
    assert ssp.min() >= 0 and ssp.max() <= 1
    # random noise at the full budget at every pixel: the strongest random perturbation
    signs = torch.sign(torch.rand(clean.shape, generator=torch.Generator().manual_seed(3)) - 0.5)
    random = (clean + EPSILON * signs).clamp(0, 1)
    assert distortion(net, ssp, clean) > 1.5 * distortion(net, random, clean)


def test_ssp_works_under_no_grad_and_is_seeded():
    net = feature_net()
    clean = smooth_images(2, 16, torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = make_ssp(net, clean, generator=torch.Generator().manual_seed(5))
    second = make_ssp(net, clean, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, second)


@pytest.mark.parametrize("shape", [(16, 16), (32, 32), (37, 53)])
def test_nrp_keeps_any_shape_in_the_unit_range(shape):
    torch.manual_seed(0)
    purifier = NRP(width=4, depth=1).eval()
    # P starts as the identity; a random output layer exercises the whole network
    torch.nn.init.normal_(purifier.tail.weight, std=0.5)
    x = torch.rand(2, 3, *shape)
    with torch.no_grad():
        out = purifier(x)
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1


def test_training_reduces_the_losses_and_purifies_unseen_ssp():
    net = feature_net()
    purifier, info = train_nrp(NoisyPairs(), 40, feature_net=net, ssp_steps=2, batch_size=4, lr=2e-3, width=8, depth=1)
    assert info["steps"] == 40 and info["seconds"] > 0
    assert len(info["losses"]) == len(info["feature_losses"]) == len(info["critic_losses"]) == 40
    for key in ("losses", "feature_losses", "pixel_losses"):
        values = info[key]
        assert sum(values[-5:]) < 0.8 * sum(values[:5]), key
    assert not purifier.training
    assert all(not p.requires_grad for p in purifier.parameters())
    # P started as the identity, so this says it learnt to undo perturbations it never saw
    clean = smooth_images(8, 16, torch.Generator().manual_seed(11))
    ssp = make_ssp(net, clean, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        purified = purifier(ssp)
    assert distortion(net, purified, clean) < 0.7 * distortion(net, ssp, clean)
    assert (purified - clean).pow(2).mean() < 0.8 * (ssp - clean).pow(2).mean()


def test_training_is_deterministic():
    calls = []

    def run():
        return train_nrp(NoisyPairs(), 3, feature_net=feature_net(), ssp_steps=1, batch_size=2, width=4, depth=1,
                         on_step=lambda step, loss: calls.append(step))

    (first, info_a), (second, info_b) = run(), run()
    assert info_a["losses"] == info_b["losses"]
    assert calls == [0, 1, 2, 0, 1, 2]
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
