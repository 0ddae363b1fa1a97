import pytest
import torch

from agent.adversaries.apegan import ApeGan, WassersteinCritic, train_apegan
from agent.adversaries.wgan import gradient_penalty
from conftest import NoisyPairs

pytestmark = pytest.mark.usefixtures("one_thread")


class Confident(torch.nn.Module):
    """The tiny classifier with its logits scaled up: confident on clean images, as a trained
    classifier is. Against the random, near-uniform tiny classifier itself, the cross-entropy
    term (weight 0.5, like the MSE's) pulls every image towards higher confidence, whatever the
    MSE."""

    def __init__(self, classifier, scale=100.0):
        super().__init__()
        self.classifier, self.scale = classifier, scale

    def forward(self, x):
        return self.scale * self.classifier(x)


def train(classifier, steps, **options):
    return train_apegan(NoisyPairs(), steps, classifier=classifier, batch_size=4, width=4, depth=1,
                        critic_steps=2, **options)


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (37, 53)])
def test_any_size_comes_back_whole_and_in_range(size):
    torch.manual_seed(0)
    x = torch.rand(2, 3, *size)
    out = ApeGan(width=4, depth=1)(x)
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().max() <= 0.25 + 1e-6


def test_the_gradient_penalty_is_zero_for_a_unit_slope_critic_and_positive_otherwise():
    real, fake = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(3, 8, 8)

    def unit_slope(x):  # a linear critic whose gradient has norm 1 everywhere
        return (x * direction / direction.norm()).flatten(1).sum(1)

    assert gradient_penalty(unit_slope, real, fake, generator).item() == pytest.approx(0, abs=1e-10)
    assert gradient_penalty(WassersteinCritic(4), real, fake, generator).item() > 0


def test_training_lowers_the_mse_to_clean(tiny_classifier):
    _, info = train(Confident(tiny_classifier), steps=20, lr=1e-3)
    assert info["steps"] == 20 and info["seconds"] > 0
    assert len(info["losses"]) == len(info["mse"]) == len(info["gradient_penalty"]) == 20
    assert sum(info["mse"][-5:]) < 0.7 * sum(info["mse"][:5])
    assert all(penalty > 0 for penalty in info["gradient_penalty"])


def test_the_classifier_term_raises_the_classifiers_confidence_in_its_own_label(tiny_classifier):
    generator_net, info = train(tiny_classifier, steps=20, lr=1e-3)
    assert sum(info["classification"][-5:]) < sum(info["classification"][:5])
    assert not generator_net.training and not any(p.requires_grad for p in generator_net.parameters())


def test_the_same_seed_trains_the_same_weights(tiny_classifier):
    first, _ = train(tiny_classifier, steps=2, seed=3)
    second, _ = train(tiny_classifier, steps=2, seed=3)
    third, _ = train(tiny_classifier, steps=2, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), third.state_dict().values()))
