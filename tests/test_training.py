import re

import pytest
import torch

from agent.classifiers import load_classifier
from agent.data import ImageSet, PhotoSet
from agent.rgan.config import PHOTO_CONFIG, ModelConfig, ReducerConfig, TrainConfig, train_config
from agent.rgan.model import load_model
from agent.rgan.train import (CHECKPOINT_NAME, MODEL_NAME, Channel, build_trainer, load_networks, resume_trainer,
                              save_trainer, train, train_epoch)

SMALL = ModelConfig(width=4, g_depth=1, r_depth=1, d_width=8)
SMALL_KEYED = ModelConfig(width=4, g_depth=1, r_depth=1, d_width=8, keyed=True, key_noise=2 / 255,
                          g_stride=2, norm="batch", reducer=ReducerConfig(down="avg"))


def small_config(**changes):
    return TrainConfig(**{"model": SMALL, "epochs": 2, "batch_size": 8, "lr_step": 1, **changes})


def photo_config(**changes):
    """The photo path with every channel transform on: keys, crops, downscaling, JPEG."""
    return small_config(model=SMALL_KEYED, data="photos", crop=24, resize_min=0.5, jpeg_prob=1.0,
                        keyless_weight=1.0, **changes)


def random_photos(count=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sizes = [(int(torch.randint(20, 40, (1,), generator=generator)), int(torch.randint(20, 40, (1,), generator=generator)))
             for _ in range(count)]
    images = [torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8) for h, w in sizes]
    return PhotoSet(images, torch.full((count,), -1), [f"{i}.png" for i in range(count)])


def random_images(count=16, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)
    return ImageSet(images, torch.full((count,), -1))


def test_a_short_run_on_real_images_lowers_the_attack_and_recovery_losses(cifar_train):
    """40 steps on 64 real CIFAR images against the real ResNet-20."""
    config = TrainConfig(model=ModelConfig(width=8, g_depth=2, r_depth=2, d_width=16),
                         epochs=10, batch_size=16, lr_step=100)
    trainer = build_trainer(config, [load_classifier("cifar-resnet20")])
    data = cifar_train.subset(64)
    first = train_epoch(trainer, data)
    for _ in range(config.epochs - 2):
        train_epoch(trainer, data)
    last = train_epoch(trainer, data)
    assert last["L_G_adv"] < first["L_G_adv"] - 1.0
    assert last["L_R_mse"] < 0.7 * first["L_R_mse"]


@pytest.mark.parametrize("make_config, make_data", [(small_config, random_images), (photo_config, random_photos)],
                         ids=["cifar", "keyed-photos"])
def test_resumed_training_is_identical_to_uninterrupted_training(tmp_path, tiny_classifier, make_config, make_data):
    data = make_data()
    straight = build_trainer(make_config(), [tiny_classifier])
    for _ in range(2):
        train_epoch(straight, data)

    first_half = build_trainer(make_config(), [tiny_classifier])
    train_epoch(first_half, data)
    save_trainer(first_half, tmp_path)
    resumed = build_trainer(make_config(), [tiny_classifier])
    assert resume_trainer(resumed, tmp_path)
    assert resumed.epoch == 1
    train_epoch(resumed, data)

    for name, module in straight.modules().items():
        expected, got = module.state_dict(), resumed.modules()[name].state_dict()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}.{key} differs"
    for name, optimizer in straight.optimizers.items():
        assert optimizer.param_groups[0]["lr"] == resumed.optimizers[name].param_groups[0]["lr"]
    without_times = [[{k: v for k, v in h.items() if k != "seconds"} for h in t.history] for t in (straight, resumed)]
    assert without_times[0] == without_times[1]


def test_resume_refuses_a_different_configuration(tmp_path, tiny_classifier):
    trainer = build_trainer(small_config(), [tiny_classifier])
    save_trainer(trainer, tmp_path)
    other = build_trainer(small_config(kappa=1.0), [tiny_classifier])
    with pytest.raises(ValueError, match="different configuration"):
        resume_trainer(other, tmp_path)


def test_train_writes_a_loadable_model_and_continues_a_finished_run(tmp_path, tiny_classifier):
    config = small_config(model=ModelConfig(width=4, g_depth=1, r_depth=1, d_width=8,
                                            reducer=ReducerConfig(down="max", up="unpool")))
    trainer = train(config, random_images(), [tiny_classifier], tmp_path)
    assert trainer.epoch == 2 and len(trainer.history) == 2
    assert (tmp_path / CHECKPOINT_NAME).exists()
    model, extra = load_model(tmp_path / MODEL_NAME)
    assert model.config == config.model and extra["epochs"] == 2
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(model.protect(x), trainer.model.eval().protect(x))
    # asking for more epochs resumes from epoch 2
    seen = []
    longer = train(config.replace(epochs=3), random_images(), [tiny_classifier], tmp_path,
                   on_step=lambda trainer, step, steps, means: seen.append((trainer.epoch, step, steps, sorted(means))))
    assert longer.epoch == 3 and [h["epoch"] for h in longer.history] == [1, 2, 3]
    # the caller follows the resumed epoch step by step, with the running losses
    assert [(epoch, step, steps) for epoch, step, steps, _ in seen] == [(2, 1, 2), (2, 2, 2)]
    assert "L_G_adv" in seen[-1][3]


def test_a_warm_start_takes_another_runs_networks_under_changed_options(tmp_path, tiny_classifier):
    first = build_trainer(small_config(), [tiny_classifier])
    train_epoch(first, random_images())
    save_trainer(first, tmp_path / "first")
    changed = small_config(kappa=40.0, lr=5e-4, lr_step=10, epochs=1)
    trainer = train(changed, random_images(), [tiny_classifier], tmp_path / "second",
                    warm_start=tmp_path / "first")
    assert trainer.epoch == 1 and trainer.config.kappa == 40.0
    assert trainer.optimizers["generator"].param_groups[0]["lr"] == pytest.approx(5e-4)  # a fresh schedule
    untrained = build_trainer(changed, [tiny_classifier])
    load_networks(untrained, tmp_path / "first" / CHECKPOINT_NAME)
    for name, module in first.modules().items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, untrained.modules()[name].state_dict()[key]), (name, key)
    wider = build_trainer(small_config(model=ModelConfig(width=6, g_depth=1, r_depth=1, d_width=8)), [tiny_classifier])
    with pytest.raises(ValueError, match="another shape"):
        load_networks(wider, tmp_path / "first")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_networks(untrained, tmp_path / "nowhere")


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_the_recover_adversarial_loss_is_always_measured(tiny_classifier, beta):
    trainer = build_trainer(small_config(beta=beta), [tiny_classifier])
    means = train_epoch(trainer, random_images())
    assert means["L_R_adv"] > 0


def test_training_needs_a_target():
    with pytest.raises(ValueError, match="target"):
        build_trainer(small_config(), [])


def test_channel_transforms_draw_nothing_when_off():
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert Channel.draw(small_config(), 8, generator) == Channel()
    assert torch.equal(generator.get_state(), state)
    channel = Channel.draw(photo_config(), 8, generator)
    assert 0.5 <= channel.scale <= 1 and len(channel.jpeg_quality) == 8
    assert all(80 <= q <= 95 for q in channel.jpeg_quality)


def test_keyed_training_writes_a_keyed_model(tmp_path, tiny_classifier):
    trainer = train(photo_config(), random_photos(), [tiny_classifier], tmp_path)
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in trainer.history)
    assert "L_A_mse" in trainer.history[-1]
    model, extra = load_model(tmp_path / MODEL_NAME)
    assert model.config.keyed and extra["config"]["data"] == "photos"


def test_the_keyless_attacker_needs_a_keyed_model():
    with pytest.raises(ValueError, match="keyless_weight"):
        small_config(keyless_weight=1.0)


def test_train_config_changes_only_what_is_given_in_the_units_people_use():
    assert train_config("photos") == PHOTO_CONFIG
    assert train_config("cifar10", epochs=None, width=None) == TrainConfig()
    config = train_config("photos", epochs=3, width=16, epsilon=10, key_noise=5, down="none", skip=False,
                          targets=["imagenet-mobilenetv2", "imagenet-resnet18"], train_limit=8, device="cpu")
    assert config.epochs == 3 and config.train_limit == 8
    assert config.model.width == 16 and config.model.epsilon == 10 / 255 and config.model.key_noise == 5 / 255
    assert config.model.reducer.down is None and config.model.reducer.skip is False
    assert config.model.reducer.up == PHOTO_CONFIG.model.reducer.up and config.model.keyed
    assert config.targets == ("imagenet-mobilenetv2", "imagenet-resnet18")
    assert config.kappa == PHOTO_CONFIG.kappa and config.data == "photos"


@pytest.mark.parametrize("data, options, message", [
    ("imagenet", {}, "data must be one of cifar10, photos"),
    ("photos", {"widht": 8}, "no such training option: widht"),
    ("photos", {"data": "cifar10"}, "no such training option: data"),
    ("photos", {"epsilon": 3}, "key_noise must be in [0, epsilon)"),
    ("cifar10", {"down": "bogus"}, "down-sampling"),
])
def test_train_config_refuses_what_makes_no_config(data, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train_config(data, **options)
