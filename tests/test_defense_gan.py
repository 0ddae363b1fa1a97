import math

import pytest
import torch

from agent.adversaries.defense_gan import DefenseGan, train_defense_gan
from conftest import NoisyPairs, smooth_images


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gan(**options):
    """An untrained generator's images barely depend on z (all near grey); its output layer is
    scaled so that it has a range to project onto, as training would give it."""
    torch.manual_seed(0)
    gan = DefenseGan(latent=8, size=16, width=4, projection_steps=30, restarts=3, **options)
    with torch.no_grad():
        gan.generator.out.weight.mul_(20)
        gan.generator.out.bias.zero_()
    return gan.eval().requires_grad_(False)


def test_the_generator_maps_latents_to_images_of_its_size():
    gan = tiny_gan()
    images = gan.generator(torch.randn(5, 8))
    assert images.shape == (5, 3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError):
        DefenseGan(size=24)


def test_projection_comes_closer_than_the_best_restart_and_strips_a_perturbation():
    gan = tiny_gan()
    gan.projection_steps, gan.restarts = 100, 4
    # a clean image the generator can make, perturbed off its range as an attack would
    with torch.no_grad():
        clean = gan.generator(torch.randn(3, 8, generator=torch.Generator().manual_seed(2)))
    signs = torch.sign(torch.rand(clean.shape, generator=torch.Generator().manual_seed(3)) - 0.5)
    x = (clean + 0.01 * signs).clamp(0, 1)
    with torch.no_grad():
        starts = gan.generator(gan.initial_latents(3).flatten(0, 1)).view(3, 4, 3, 16, 16)
        initial_best = (starts - x[:, None]).pow(2).flatten(2).mean(2).amin(1)
    z, errors = gan.project(x)
    assert z.shape == (3, 8) and errors.shape == (3,)
    assert torch.all(errors < 0.5 * initial_best)
    with torch.no_grad():
        projected = gan.generator(z)
    assert torch.allclose((projected - x).pow(2).flatten(1).mean(1), errors)
    assert (projected - clean).pow(2).mean() < 0.2 * (x - clean).pow(2).mean()


@pytest.mark.parametrize("shape", [(16, 16), (37, 53)])
def test_forward_returns_the_inputs_shape_in_the_unit_range(shape):
    gan = tiny_gan()
    x = torch.rand(2, 3, *shape)
    with torch.no_grad():
        out = gan(x)
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1


def test_projection_is_deterministic_and_ignores_the_global_rng():
    gan = tiny_gan(seed=5)
    x = smooth_images(2, 16, torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    first = gan(x)
    torch.manual_seed(2)
    second = gan(x)
    assert torch.equal(first, second)
    gan.seed = 6
    assert not torch.equal(gan(x), first)


def test_training_runs_and_returns_a_frozen_module_whose_projection_still_works():
    calls = []
    gan, info = train_defense_gan(NoisyPairs(side=20), 3, size=16, latent=8, width=4, batch_size=4, n_critic=2,
                                  on_step=lambda step, loss: calls.append(step))
    assert info["steps"] == 3 and info["seconds"] > 0 and calls == [0, 1, 2]
    for key in ("losses", "critic_losses", "generator_losses"):
        assert len(info[key]) == 3 and all(math.isfinite(value) for value in info[key]), key
    assert not gan.training
    assert all(not p.requires_grad for p in gan.parameters())
    gan.projection_steps, gan.restarts = 20, 2
    x = smooth_images(2, 16, torch.Generator().manual_seed(4))
    with torch.no_grad():
        starts = gan.generator(gan.initial_latents(2).flatten(0, 1)).view(2, 2, 3, 16, 16)
        initial_best = (starts - x[:, None]).pow(2).flatten(2).mean(2).amin(1)
        out = gan(x)
    assert out.shape == x.shape and not out.requires_grad
    # a barely trained generator has little range to move in, but the latents must still move
    assert torch.all((out - x).pow(2).flatten(1).mean(1) < initial_best)
    assert all(p.grad is None for p in gan.parameters())


def test_training_is_deterministic():
    def run():
        return train_defense_gan(NoisyPairs(), 2, size=16, latent=8, width=4, batch_size=4, n_critic=2, seed=3)

    (first, info_a), (second, info_b) = run(), run()
    assert info_a["losses"] == info_b["losses"]
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
