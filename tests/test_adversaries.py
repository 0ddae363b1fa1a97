import torch

from agent.adversaries.keyless import protect_with_unseen_keys, train_keyless
from agent.data import PhotoSet
from agent.rgan.config import ModelConfig, ReducerConfig
from agent.rgan.model import RGAN, KeylessRecoverer


def keyed_model():
    torch.manual_seed(0)
    return RGAN(ModelConfig(width=4, g_depth=1, r_depth=1, keyed=True, key_noise=2 / 255, g_stride=2,
                            norm="batch", reducer=ReducerConfig(down="avg"))).eval()


def smooth_photos(count=6):
    """Smooth gradients: images a denoiser can learn to clean within a few steps."""
    ramp = torch.linspace(0, 1, 40)
    images = [((ramp[None, :, None] * (i + 1) / count + ramp[None, None, :] * 0.3).clamp(0, 1).expand(3, 40, 40)
               * 255).round().byte() for i in range(count)]
    return PhotoSet(images, torch.full((count,), -1), [f"{i}.png" for i in range(count)])


def test_the_keyless_recoverer_has_rs_shape_without_the_key_planes():
    config = keyed_model().config
    attacker = KeylessRecoverer(config)
    assert attacker.net.encoder[0][0].in_channels == 3
    x = torch.rand(2, 3, 24, 20)
    assert attacker(x).shape == x.shape
    assert (attacker(x) - x).abs().max() <= config.epsilon + 1 / 255 + 1e-6


def test_training_the_attacker_lowers_its_error_on_unseen_keys():
    model, photos = keyed_model(), smooth_photos()
    before = KeylessRecoverer(model.config).eval()
    attacker, info = train_keyless(model, photos, steps=30, batch_size=4, crop=24)
    assert info["steps"] == 30 and info["seconds"] > 0
    images = torch.stack([image[:, :24, :24] for image in photos.images])
    clean, adversarial, pattern = protect_with_unseen_keys(model, images)
    assert pattern.shape == (len(images), 3, 24, 24)
    with torch.no_grad():
        error_before = (before(adversarial) - clean).pow(2).mean()
        error_after = (attacker(adversarial) - clean).pow(2).mean()
    assert error_after < error_before
