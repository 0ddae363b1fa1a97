import pytest
import torch

from agent.adversaries.robust_recovery import RobustRecovery, train_robust_recovery
from conftest import NoisyPairs

pytestmark = pytest.mark.usefixtures("one_thread")


def train(classifier, steps, post_steps, **options):
    # the classifier's first convolution: a frozen mid-level feature map of it, as
    # `agent.classifiers.feature_extractor` gives for real classifiers
    return train_robust_recovery(NoisyPairs(), steps, classifier=classifier, feature_net=classifier.net[:2],
                                 post_steps=post_steps, batch_size=4, width=4, **options)


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (37, 53)])
def test_any_size_comes_back_whole_and_in_range(size):
    torch.manual_seed(0)
    x = torch.rand(2, 3, *size)
    out = RobustRecovery(width=4)(x)
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1


def test_the_output_mixes_the_noise_and_image_reconstructions_by_the_attention_map():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 20, 24)
    parts = RobustRecovery(width=4).reconstruct(x)
    assert parts.noise.shape == parts.image.shape == x.shape
    assert parts.mix.shape == (2, 1, 20, 24)
    assert 0 < parts.mix.min() and parts.mix.max() < 1
    expected = (parts.mix * parts.image + (1 - parts.mix) * (x - parts.noise)).clamp(0, 1)
    assert torch.allclose(parts.output, expected)


def test_training_lowers_the_l1_then_post_training_lowers_the_feature_loss(tiny_classifier):
    recovery, info = train(tiny_classifier, steps=20, post_steps=12, lr=2e-3)
    assert info["steps"] == 20 and info["post_steps"] == 12 and info["seconds"] > 0
    assert len(info["losses"]) == len(info["l1"]) == 20 and len(info["feature_losses"]) == 12
    assert sum(info["l1"][-5:]) < 0.8 * sum(info["l1"][:5])
    assert sum(info["feature_losses"][-3:]) < sum(info["feature_losses"][:3])
    # the self-attention's γ starts at 0 and is learnt
    assert any(name.endswith("self_attention.gamma") for name, _ in RobustRecovery(width=4).named_parameters())
    assert recovery.self_attention.gamma.abs().item() > 0
    assert not recovery.training and not any(p.requires_grad for p in recovery.parameters())


def test_the_same_seed_trains_the_same_weights(tiny_classifier):
    first, _ = train(tiny_classifier, steps=2, post_steps=2, seed=3)
    second, _ = train(tiny_classifier, steps=2, post_steps=2, seed=3)
    third, _ = train(tiny_classifier, steps=2, post_steps=2, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), third.state_dict().values()))
