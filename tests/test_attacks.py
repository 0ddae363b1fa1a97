from functools import partial

import pytest
import torch
from torch import nn

from agent.adversaries.attacks import ATTACKS, carlini_wagner, ddn, fgsm, pgd
from agent.adversaries.pairs import AttackPairs

# Few steps: enough to fool a small random net, fast on one core.
FAST = {
    "fgsm": fgsm,
    "pgd": pgd,
    "ddn": partial(ddn, steps=50),
    "cw": partial(carlini_wagner, steps=20, binary_search_steps=2),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pixel_classifier():
    """A frozen random CNN whose logits depend on where things are in the image. The shared
    `tiny_classifier` averages a random conv over the whole image, so it predicts the same class
    for every [0, 1] image and no attack within 8/255 can change that; its properties that do not
    need a success (bounds, grid, modes) are tested on it below."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    return net.eval().requires_grad_(False)


def images(count=4, side=16, seed=0):
    return torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


def on_8bit_grid(x):
    return torch.equal(torch.round(x * 255) / 255, x)


@pytest.mark.parametrize("name", list(FAST))
def test_each_attack_fools_most_images_and_returns_8bit_images(name, pixel_classifier):
    x = images()
    labels = pixel_classifier(x).argmax(1)
    adversarial = FAST[name](pixel_classifier, x, labels)
    assert adversarial.shape == x.shape and not adversarial.requires_grad
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert on_8bit_grid(adversarial)
    assert (pixel_classifier(adversarial).argmax(1) != labels).sum() >= 3


@pytest.mark.parametrize("attack", [pgd, fgsm])
def test_linf_attacks_stay_within_epsilon_after_rounding(attack, tiny_classifier):
    # off-grid clean pixels are the hard case: plain rounding could land half a level outside
    x = images(side=20)
    labels = tiny_classifier(x).argmax(1)
    for epsilon in (8 / 255, 0.02):
        adversarial = attack(tiny_classifier, x, labels, epsilon=epsilon)
        assert (adversarial - x).abs().max() <= epsilon + 1e-6
        assert on_8bit_grid(adversarial)


def test_minimal_norm_attacks_find_smaller_perturbations_than_pgd(pixel_classifier):
    x = images()
    labels = pixel_classifier(x).argmax(1)
    by_pgd = pgd(pixel_classifier, x, labels)
    pgd_fooled = pixel_classifier(by_pgd).argmax(1) != labels
    for name in ("ddn", "cw"):
        adversarial = FAST[name](pixel_classifier, x, labels)
        both = pgd_fooled & (pixel_classifier(adversarial).argmax(1) != labels)
        assert both.sum() >= 3
        l2 = (adversarial - x).flatten(1).norm(dim=1)
        assert torch.isfinite(l2).all()
        assert (l2[both] < (by_pgd - x).flatten(1).norm(dim=1)[both]).all()


def test_an_image_never_fooled_comes_back_clean(tiny_classifier):
    # the shared tiny net cannot be moved off its class within two tiny steps
    x = images()
    labels = tiny_classifier(x).argmax(1)
    for attack in (partial(ddn, steps=2, init_norm=0.01), partial(carlini_wagner, steps=2, binary_search_steps=1)):
        assert torch.equal(attack(tiny_classifier, x, labels), torch.round(x * 255) / 255)


def test_pgd_is_deterministic_given_a_generator_and_by_default(pixel_classifier):
    x = images()
    labels = pixel_classifier(x).argmax(1)

    def run(seed):
        return pgd(pixel_classifier, x, labels, steps=2, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    assert torch.equal(pgd(pixel_classifier, x, labels, steps=2), pgd(pixel_classifier, x, labels, steps=2))
    for name in ("ddn", "cw"):
        assert torch.equal(FAST[name](pixel_classifier, x, labels), FAST[name](pixel_classifier, x, labels))


def test_attacks_leave_the_classifier_alone_and_work_under_no_grad(tiny_classifier):
    tiny_classifier.train()
    before = [p.clone() for p in tiny_classifier.parameters()]
    x = torch.rand(2, 3, 19, 13)
    labels = tiny_classifier(x).argmax(1)
    with torch.no_grad():
        for attack in FAST.values():
            assert attack(tiny_classifier, x, labels).shape == x.shape
    assert tiny_classifier.training
    assert all(torch.equal(a, b) and a.grad is None for a, b in zip(tiny_classifier.parameters(), before))


def test_attacks_plug_into_attack_pairs_and_the_registry_keeps_table_3s_order(pixel_classifier):
    assert list(ATTACKS)[:3] == ["ddn", "pgd", "cw"] and ATTACKS["fgsm"] is fgsm
    photos = [(torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(i)) * 255).byte() for i in range(3)]
    pairs = AttackPairs(pixel_classifier, photos, 16, partial(pgd, steps=3))
    clean, adversarial = pairs.batch(4, torch.Generator().manual_seed(0))
    assert clean.shape == adversarial.shape == (4, 3, 16, 16)
    assert (adversarial - clean).abs().max() <= 8 / 255 + 1e-6
    assert (pixel_classifier(adversarial).argmax(1) != pixel_classifier(clean).argmax(1)).sum() >= 3
