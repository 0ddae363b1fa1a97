import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE
from PIL import Image

from agent import images, metrics, pipeline
from agent.jpeg import Quantization
from agent.pipeline import (
    DEFAULT_MODEL_PATH,
    ProtectInfo,
    ProtectOptions,
    default_model,
    protect,
    protect_rgan,
    recover,
)
from agent.rgan.config import ModelConfig, ReducerConfig
from agent.rgan.keying import PATTERN_VERSION
from agent.rgan.model import RGAN, save_model

WEIGHTS = DEFAULT_MODEL_PATH
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
EPSILON_LEVELS = 8  # the model's epsilon, 8/255, in 8-bit grey levels


@pytest.fixture(scope="module")
def model():
    """The photo model's shape with random weights, made to matter: freshly initialised, G's share
    of the perturbation is a quarter of a grey level and batch norm is the identity, which would
    let tiles on the wrong grid or short of context pass unnoticed."""
    torch.manual_seed(0)
    config = ModelConfig(keyed=True, key_noise=3 / 255, g_stride=2, norm="batch", reducer=ReducerConfig(down="avg"))
    model = RGAN(config).eval()
    with torch.no_grad():
        for net in (model.generator, model.recoverer):
            net.decoder[-1].weight.mul_(20)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2)
    return model


def photo(width: int, height: int, mode: str = "RGB") -> np.ndarray:
    """A real photo (the bundled cat) cropped to the aspect ratio and downscaled: protection
    is meant for photos, and noise would hide what the networks do to smooth regions."""
    with Image.open(SAMPLE) as image:
        image = image.convert("RGB")
        scale = min(image.width / width, image.height / height)
        box = (0, 0, round(width * scale), round(height * scale))
        return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS, box=box).convert(mode))


def with_alpha(rgb: np.ndarray, seed: int = 0) -> np.ndarray:
    alpha = np.random.default_rng(seed).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    return np.concatenate([rgb, alpha[:, :, None]], axis=2)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    scale = np.iinfo(image.dtype).max

    def tensor(a):
        return torch.from_numpy(a.astype(np.float32) / scale).reshape(1, -1)

    return metrics.psnr(tensor(image), tensor(reference)).item()


def levels(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- arrays -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(96, 80), (97, 61)], ids=str)
def test_protect_keeps_size_and_dtype_within_epsilon(model, size):
    original = photo(*size)
    protected, info = protect_rgan(original, KEY, model=model)
    assert protected.shape == original.shape and protected.dtype == np.uint8
    assert 0 < levels(protected, original) <= EPSILON_LEVELS
    assert info == ProtectInfo(size, size, "RGB", 8, PATTERN_VERSION)
    recovered = recover(protected, KEY, info, model=model)
    assert recovered.shape == original.shape and recovered.dtype == np.uint8


def test_grayscale_is_protected_in_colour_and_recovered_grayscale(model):
    grey = photo(96, 80, "L")
    protected, info = protect_rgan(grey, KEY, model=model)
    assert protected.shape == (80, 96, 3) and info.mode == "L"
    # the three channels are protected apart (the key pattern alone differs between them)
    assert not np.array_equal(protected[..., 0], protected[..., 1])
    assert levels(protected, np.repeat(grey[:, :, None], 3, axis=2)) <= EPSILON_LEVELS
    recovered = recover(protected, KEY, info, model=model)
    assert recovered.shape == grey.shape and recovered.dtype == np.uint8


def test_grayscale_with_alpha_keeps_alpha_and_layout(model):
    grey_alpha = with_alpha(photo(96, 80, "L")[:, :, None])
    protected, info = protect_rgan(grey_alpha, KEY, model=model)
    assert protected.shape == (80, 96, 4) and info.mode == "LA"
    assert np.array_equal(protected[..., 3], grey_alpha[..., 1])
    recovered = recover(protected, KEY, info, model=model)
    assert recovered.shape == (80, 96, 2)
    assert np.array_equal(recovered[..., 1], grey_alpha[..., 1])


def test_alpha_is_untouched_bit_for_bit(model):
    rgba = with_alpha(photo(97, 61))
    protected, info = protect_rgan(rgba, KEY, model=model)
    assert info.mode == "RGBA" and protected.shape == rgba.shape
    assert np.array_equal(protected[..., 3], rgba[..., 3])
    assert levels(protected[..., :3], rgba[..., :3]) <= EPSILON_LEVELS
    assert np.array_equal(recover(protected, KEY, info, model=model)[..., 3], rgba[..., 3])


def test_sixteen_bit_stays_sixteen_bit(model):
    original = photo(96, 80).astype(np.uint16) * 257 + np.uint16(100)
    protected, info = protect_rgan(original, KEY, model=model)
    assert protected.dtype == np.uint16 and info.bit_depth == 16
    assert levels(protected, original) <= round(8 / 255 * 65535) + 1
    # rounded on the 16-bit grid, not on the 8-bit one
    assert np.any((protected.astype(np.int64) - original) % 257)
    recovered = recover(protected, KEY, info, model=model)
    assert recovered.dtype == np.uint16
    assert psnr(recovered, original) > psnr(recover(protected, OTHER_KEY, info, model=model), original)


def test_working_resolution_downscales_but_never_upscales(model):
    original = photo(200, 150)
    small, info = protect_rgan(original, KEY, ProtectOptions(max_side=64), model=model)
    assert small.shape == (48, 64, 3)
    assert info.original_size == (200, 150) and info.working_size == (64, 48)
    # the downscale is antialiased: close to Pillow's Lanczos result, within the perturbation
    reference = np.asarray(Image.fromarray(original).resize((64, 48), Image.Resampling.LANCZOS))
    assert levels(small, reference) <= EPSILON_LEVELS + 2
    portrait, info = protect_rgan(photo(60, 90), KEY, ProtectOptions(max_side=45), model=model)
    assert portrait.shape == (45, 30, 3) and info.working_size == (30, 45)
    for max_side in (200, 4096, None):
        same, info = protect_rgan(original, KEY, ProtectOptions(max_side=max_side), model=model)
        assert same.shape == original.shape and info.working_size == info.original_size
    rgba, _ = protect_rgan(with_alpha(original), KEY, ProtectOptions(max_side=64), model=model)
    assert rgba.shape == (48, 64, 4)


def test_recover_refuses_an_image_of_another_size(model):
    protected, info = protect_rgan(photo(96, 80), KEY, model=model)
    resized = np.asarray(Image.fromarray(protected).resize((95, 80)))
    with pytest.raises(ValueError, match="size|resized"):
        recover(resized, KEY, info, model=model)
    future = ProtectInfo(info.original_size, info.working_size, info.mode, 8, PATTERN_VERSION + 1)
    with pytest.raises(ValueError, match="pattern version"):
        recover(protected, KEY, future, model=model)


def test_tiled_inference_matches_the_whole_image(model, monkeypatch):
    original = photo(320, 240)
    whole, _ = protect_rgan(original, KEY, model=model)
    tiles = []
    perturbation = model.perturbation

    def counting(x, *rest):
        tiles.append(tuple(x.shape[-2:]))
        return perturbation(x, *rest)

    monkeypatch.setattr(model, "perturbation", counting)
    # overlap 90 is rounded up to 96, keeping tile origins on the grid of 16
    tiled_options = ProtectOptions(tile=80, overlap=90, tile_above=1)
    tiled, _ = protect_rgan(original, KEY, tiled_options, model=model)
    assert len(tiles) == 4 * 3 and all(h * w < 240 * 320 for h, w in tiles)
    assert levels(tiled, whole) <= 1
    # tiles on the wrong grid or short of context differ in many pixels, not in a few roundings
    assert np.mean(tiled != whole) < 1e-4
    recovered_tiled = recover(tiled, KEY, model=model, options=tiled_options)
    recovered_whole = recover(tiled, KEY, model=model)
    assert levels(recovered_tiled, recovered_whole) <= 1 and np.mean(recovered_tiled != recovered_whole) < 1e-4


def test_tiling_needs_a_batch_norm_model():
    torch.manual_seed(0)
    instance = RGAN(ModelConfig(keyed=True, key_noise=3 / 255, norm="instance")).eval()
    protect_rgan(photo(64, 48), KEY, model=instance)  # whole-image inference is fine
    with pytest.raises(ValueError, match="tile by tile"):
        protect_rgan(photo(64, 48), KEY, ProtectOptions(tile=16, tile_above=1), model=instance)


def test_protection_is_deterministic(model):
    original = with_alpha(photo(97, 61))
    first, first_info = protect_rgan(original, KEY, model=model)
    second, second_info = protect_rgan(original.copy(), KEY, model=model)
    assert np.array_equal(first, second) and first_info == second_info


def test_the_key_matters(model):
    original = photo(96, 80)
    protected, info = protect_rgan(original, KEY, model=model)
    other, _ = protect_rgan(original, OTHER_KEY, model=model)
    assert not np.array_equal(protected, other)
    right = recover(protected, KEY, info, model=model)
    wrong = recover(protected, OTHER_KEY, info, model=model)
    # with random weights R's own estimate is noise; the key pattern's share still tells them apart
    assert psnr(right, original) > psnr(wrong, original)


def test_the_model_is_left_in_its_training_mode(model):
    model.train()
    try:
        protect_rgan(photo(64, 48), KEY, model=model)
        assert model.training
    finally:
        model.eval()


def test_an_unkeyed_model_or_a_bad_key_is_refused(model):
    with pytest.raises(ValueError, match="not keyed"):
        protect_rgan(photo(64, 48), KEY, model=RGAN(ModelConfig()).eval())
    with pytest.raises(ValueError, match="32 bytes"):
        protect_rgan(photo(64, 48), KEY[:16], model=model)


@pytest.mark.parametrize("image, message", [
    (np.zeros((40, 40, 3), np.float64), "dtype"),
    (np.zeros((40, 40, 3), np.int16), "dtype"),
    (np.zeros((40, 40, 5), np.uint8), "shape"),
    (np.zeros((2, 40, 40, 3), np.uint8), "shape"),
    (np.zeros((0, 40, 3), np.uint8), "empty"),
    (np.broadcast_to(np.zeros(1, np.uint8), (10_001, 10_000)), "pixels"),
    ([[0, 1], [2, 3]], "numpy"),
], ids=["float64", "int16", "5-channels", "4-d", "empty", "too-large", "list"])
def test_bad_images_are_refused(model, image, message):
    with pytest.raises(ValueError, match=message):
        protect_rgan(image, KEY, model=model)
    with pytest.raises(ValueError, match=message):
        recover(image, KEY, model=model)


@pytest.mark.parametrize("changes", [
    {"max_side": 0}, {"max_side": 8}, {"tile": 100}, {"tile": 0}, {"overlap": -1}, {"tile_above": 0},
    {"tile": 64.0},
], ids=str)
def test_bad_options_are_refused(changes):
    with pytest.raises(ValueError):
        ProtectOptions(**changes)


def test_info_round_trips_through_json():
    info = ProtectInfo((4000, 3000), (2048, 1536), "LA", 16)
    assert ProtectInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    assert info.key_pattern_version == PATTERN_VERSION


GOOD = {"original_size": [400, 300], "working_size": [200, 150], "mode": "RGB", "bit_depth": 8,
        "key_pattern_version": 1}


@pytest.mark.parametrize("data", [
    {k: v for k, v in GOOD.items() if k != "mode"},
    {**GOOD, "extra": 1},
    {**GOOD, "mode": "CMYK"},
    {**GOOD, "bit_depth": 12},
    {**GOOD, "bit_depth": "8"},
    {**GOOD, "original_size": [400, -300]},
    {**GOOD, "working_size": [200, 150, 3]},
    {**GOOD, "working_size": [800, 600]},
    {**GOOD, "working_size": [True, 150]},
    {**GOOD, "key_pattern_version": 0},
    {**GOOD, "strength": "extreme"},
    "not a dict",
], ids=["missing", "unknown", "mode", "depth", "depth-str", "negative", "three", "upscaled", "bool",
        "version", "strength", "str"])
def test_bad_info_is_refused(data):
    # GOOD is what records held before strengths existed: all were protected at the default
    assert ProtectInfo.from_dict(GOOD).working_size == (200, 150)
    assert ProtectInfo.from_dict(GOOD).strength == "medium"
    assert ProtectInfo.from_dict({**GOOD, "strength": "high"}).strength == "high"
    with pytest.raises(ValueError):
        ProtectInfo.from_dict(data)


# --- files ------------------------------------------------------------------------------------


def test_png_files_hold_protection_and_recovery_exactly(model, tmp_path):
    original = photo(97, 61)
    src = tmp_path / "photo.png"
    Image.fromarray(original).save(src)
    before = sha256(src)
    protected, info = protect(images.read_image(src), KEY, model=model)
    images.write_image(protected, tmp_path / "protected.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "protected.png")), protected)
    recovered = recover(images.read_image(tmp_path / "protected.png"), KEY, info, model=model)
    images.write_image(recovered, tmp_path / "recovered.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "recovered.png")), recover(protected, KEY, info, model=model))
    assert sha256(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png", "protected.png", "recovered.png"]


def test_sixteen_bit_grayscale_png_round_trip(model, tmp_path):
    grey = photo(96, 80, "L").astype(np.uint16) * 257
    src = tmp_path / "grey16.png"
    Image.fromarray(grey).save(src)
    protected, info = protect(images.read_image(src), KEY, model=model)
    assert info.mode == "L" and info.bit_depth == 16
    images.write_image(protected, tmp_path / "protected.png")
    # Pillow would read this 16-bit RGB file as 8-bit; the image module keeps every bit
    read = images.read_image(tmp_path / "protected.png")
    assert read.dtype == np.uint16 and np.array_equal(read, protected)
    images.write_image(recover(read, KEY, info, model=model), tmp_path / "recovered.png")
    with Image.open(tmp_path / "recovered.png") as image:
        assert image.mode == "I;16"
        assert np.array_equal(np.asarray(image), recover(protected, KEY, info, model=model))


def test_jpeg_and_exif_orientation(model, tmp_path):
    original = photo(96, 80)
    src = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90° clockwise
    Image.fromarray(original).save(src, exif=exif)
    protected, info = protect(images.read_image(src), KEY, model=model)
    assert info.original_size == (80, 96)
    images.write_image(protected, tmp_path / "protected.jpg")
    with Image.open(tmp_path / "protected.jpg") as image:
        assert image.format == "JPEG" and image.size == (80, 96)
        shown = np.asarray(image).astype(np.float64)
    # JPEG moves edges by more than epsilon here and there; on average the right way up is close
    upright = np.abs(shown - np.rot90(original, -1)).mean()
    assert upright < EPSILON_LEVELS and 2 * upright < np.abs(shown - np.rot90(original, 1)).mean()


def test_jpeg_cannot_hold_alpha_nor_16_bits(tmp_path):
    with pytest.raises(images.ImageError, match="out.jpg.*alpha.*png"):
        images.write_image(with_alpha(photo(64, 48)), tmp_path / "out.jpg")
    with pytest.raises(images.ImageError, match="out.webp.*16-bit.*png"):
        images.write_image(photo(64, 48, "L").astype(np.uint16), tmp_path / "out.webp")
    assert not list(tmp_path.iterdir())


def test_unreadable_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    with pytest.raises(images.ImageError, match="garbage.png"):
        images.read_image(garbage)
    with pytest.raises(images.ImageError, match="missing.png: no such file"):
        images.read_image(tmp_path / "missing.png")
    with pytest.raises(images.ImageError, match="format"):
        images.write_image(photo(64, 48), tmp_path / "out.gif")
    with pytest.raises(images.ImageError, match="quality"):
        images.write_image(photo(64, 48), tmp_path / "out.jpg", quality=101)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.png"]


# --- the shipped model ------------------------------------------------------------------------


def test_no_model_means_the_shipped_one(model, tmp_path, monkeypatch):
    save_model(model, tmp_path / "photo.safetensors")
    monkeypatch.setattr(pipeline, "DEFAULT_MODEL_PATH", tmp_path / "photo.safetensors")
    default_model.cache_clear()
    try:
        assert np.array_equal(protect(photo(64, 48), KEY)[0], protect(photo(64, 48), KEY, model=model)[0])
        assert default_model() is default_model()
    finally:
        default_model.cache_clear()


def test_a_missing_default_model_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "DEFAULT_MODEL_PATH", tmp_path / "none.safetensors")
    default_model.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="photo model"):
            default_model()
    finally:
        default_model.cache_clear()


def test_the_shipped_model_round_trips_a_photo_only_with_its_key():
    """Thresholds a little under the figures in docs/benchmarks.md (224 crops: protected 33.4 dB,
    recovered 47 dB, wrong key 33.2 dB)."""
    assert WEIGHTS.stat().st_size < 10 * 2**20
    original = photo(451, 300)
    protected, info = protect_rgan(original, KEY)
    recovered = recover(protected, KEY, info)
    wrong = recover(protected, bytes(reversed(KEY)), info)
    assert 32 <= psnr(protected, original) < 36
    assert psnr(recovered, original) >= 44
    assert psnr(wrong, original) <= psnr(protected, original) + 1


@pytest.mark.parametrize("strength", ["low", "medium", "high"])
def test_every_strength_recovers_only_with_the_key(strength):
    original = photo(224, 160)
    protected, info = protect_rgan(original, KEY, ProtectOptions(strength=strength))
    assert info.strength == strength
    recovered = recover(protected, KEY, info)
    assert psnr(recovered, original) >= 48
    # a wrong key subtracts the wrong ±signs of the key's share: never closer than a key-less
    # attacker may get (issue 7's bound), at any strength
    assert psnr(recover(protected, bytes(reversed(KEY)), info), original) <= 35


def test_stronger_moves_the_photo_further_and_recovery_follows_the_record():
    original = photo(224, 160)
    low, low_info = protect_rgan(original, KEY, ProtectOptions(strength="low"))
    high, _ = protect_rgan(original, KEY, ProtectOptions(strength="high"))
    assert psnr(high, original) < psnr(low, original) - 3
    # recovering a low-strength photo as if it were medium leaves part of G's share behind
    as_medium = recover(low, KEY, dataclasses.replace(low_info, strength="medium"))
    assert psnr(recover(low, KEY, low_info), original) > psnr(as_medium, original) + 3
    assert psnr(recover(low, KEY, low_info), original) >= 48
    with pytest.raises(ValueError, match="strength"):
        ProtectOptions(strength="extreme")


def test_recovery_from_a_jpeg_uses_its_quantisation_tables():
    """Issue 4's target for JPEG outputs (≥ 38 dB), at the quality the agent matches a typical
    phone photo's; subtracting alone stays near the JPEG's own loss of the key pattern."""
    original = photo(451, 300)
    protected, info = protect_rgan(original, KEY)
    data = images.encode_image(protected, "JPEG", quality=92)
    decoded = images.decode_image(data)
    tables = Quantization.read(data)
    with_tables = recover(decoded, KEY, info, jpeg=tables)
    assert psnr(with_tables, original) >= 38
    assert psnr(with_tables, original) > psnr(recover(decoded, KEY, info), original) + 3
    # the tables help anyone denoise a little (a wrong key gets about 36 dB here, as a key-less
    # attacker does from a PNG); the key's share still makes the difference
    assert psnr(recover(decoded, bytes(reversed(KEY)), info, jpeg=tables), original) <= psnr(with_tables, original) - 4


def test_refining_with_g_recovers_better_than_r_alone(monkeypatch):
    original = photo(224, 160)
    protected, info = protect_rgan(original, KEY)
    refined = psnr(recover(protected, KEY, info), original)
    monkeypatch.setattr(pipeline, "REFINE_STEPS", 0)
    assert refined > psnr(recover(protected, KEY, info), original) + 2
