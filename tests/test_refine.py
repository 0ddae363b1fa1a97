"""The refine scheme (issue 16): the keyed coupling undoes exactly what it did, the field fools the
surrogate on the platform's views, and recovery is exact from the file, follows the record for
copies, and needs the key."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE
from PIL import Image

from agent import coupling as coupling_module
from agent import images, pipeline, selfcheck
from agent.coupling import Coupling, bands, estimate, field_part, headroom
from agent.jpeg import Quantization
from agent.pipeline import ProtectInfo, ProtectOptions, protect, protect_rgan, recover
from agent.recovery import RecoveryData, open_field, seal_field
from agent.refine import METHOD, Budget, field_size, upsampled_rows, views

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.full_protection


def photo(width: int, height: int) -> np.ndarray:
    with Image.open(SAMPLE) as image:
        image = image.convert("RGB")
        scale = min(image.width / width, image.height / height)
        box = (0, 0, round(width * scale), round(height * scale))
        return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS, box=box))


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    scale = float(np.iinfo(image.dtype).max)
    mse = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(scale**2 / mse)


# ---------------------------------------------------------------- the coupling, with any field


def test_the_split_is_keyed_and_versioned():
    """Version 1 of the split: if these change, every protected image stops recovering."""
    part = field_part(KEY, 4, 6)
    assert np.packbits(part).tobytes().hex() == "666a95"
    assert part.sum() == 12  # one diagonal of every 2×2 cell
    assert not np.array_equal(field_part(OTHER_KEY, 64, 64), field_part(KEY, 64, 64))
    odd = field_part(KEY, 7, 5)
    assert odd.shape == (7, 5)


def test_every_unknown_pixel_has_known_neighbours_and_the_estimate_uses_only_them():
    rng = np.random.default_rng(0)
    planes = torch.from_numpy(rng.integers(0, 256, (3, 9, 11)).astype(np.int16))
    part = torch.from_numpy(field_part(KEY, 9, 11))
    first = estimate(planes, ~part)
    scrambled = planes.clone()
    scrambled[:, part] = torch.from_numpy(rng.integers(0, 256, (3, int(part.sum()))).astype(np.int16))
    assert torch.equal(first, estimate(scrambled, ~part))
    assert torch.equal(first[:, ~part], planes[:, ~part].float())


def test_headroom_keeps_changes_inside_black_and_white():
    planes = torch.full((1, 6, 6), 250, dtype=torch.int16)
    planes[0, :, :3] = 3
    known = torch.from_numpy(field_part(KEY, 6, 6))
    low, high = headroom(planes, ~known, 255, 12)
    assert int(high[0, 0, 5]) == 0 and int(low[0, 0, 0]) == 0  # by white no room up, by black none down
    assert int(low[0, 0, 5]) < 0 and int(high[0, 0, 0]) > 0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_the_coupling_undoes_any_field_exactly(dtype):
    """Black, white and noise: whatever the field, the pixels come back exactly, with the clipped
    ones from the record (and the rest from the file alone)."""
    rng = np.random.default_rng(1)
    maxval = np.iinfo(dtype).max
    pixels = rng.integers(0, maxval + 1, (33, 40, 3)).astype(dtype)
    pixels[:10] = maxval
    pixels[-10:] = 0

    def wild(known):
        # depends on the known pixels in an arbitrary, discontinuous way
        return lambda top, bottom: torch.sin(known.band(top, bottom).float() * 0.37) * maxval * 0.2

    coupling = Coupling(KEY, wild, maxval // 255, 52)
    coupled = coupling.couple(pixels)
    assert not np.array_equal(coupled.pixels, pixels)
    assert np.array_equal(coupling.uncouple(coupled.pixels, coupled.clipped_at, coupled.clipped_values), pixels)
    with pytest.raises(ValueError, match="outside this image"):
        coupling.uncouple(coupled.pixels, np.array([pixels.size]), np.array([0]))
    unclipped = np.ones(pixels.size, bool)
    unclipped[coupled.clipped_at] = False
    assert np.array_equal(coupling.uncouple(coupled.pixels).reshape(-1)[unclipped], pixels.reshape(-1)[unclipped])


def test_bands_are_invisible(monkeypatch):
    """The coupling works a band of rows at a time (memory); the bands' size changes nothing, with
    a field read by rows from the whole (the first method) or upsampled by rows (today's)."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    pixels[:6] = 255
    small = (rng.normal(size=(3, 9, 6)) * 9).astype(np.float32)

    def by_rows(known):
        return upsampled_rows(small, *known.shape)

    def from_the_whole(known):
        whole = torch.sin(torch.cat([known.band(top, bottom) for top, bottom in bands(known.shape[0])], 1).float()) * 9
        return lambda top, bottom: whole[:, top:bottom]

    for field in (by_rows, from_the_whole):
        coupling = Coupling(KEY, field, 2, 12)
        whole = coupling.couple(pixels)
        monkeypatch.setattr(coupling_module, "BAND", 4)
        banded = coupling.couple(pixels)
        assert np.array_equal(banded.pixels, whole.pixels) and np.array_equal(banded.clipped_at, whole.clipped_at)
        assert np.array_equal(coupling.uncouple(banded.pixels, banded.clipped_at, banded.clipped_values), pixels)
        assert np.array_equal(coupling.change(banded.pixels), coupling.change(whole.pixels))
        monkeypatch.undo()
    rows = upsampled_rows(small, 37, 23)
    full = torch.nn.functional.interpolate(torch.from_numpy(small)[None], size=(37, 23), mode="bilinear")[0]
    assert torch.allclose(rows(0, 37), full, atol=1e-5) and torch.equal(rows(10, 19), rows(0, 37)[:, 10:19])


def test_recovery_data_round_trips_and_refuses_damage():
    field = np.arange(-30, 30, dtype=np.int8).reshape(3, 4, 5) // 3
    data = RecoveryData.keep(field, np.array([9, 3, 70000]), np.array([255, 0, 7], np.uint16), luma_step=4)
    again = RecoveryData.from_bytes(data.to_bytes())
    assert data.to_bytes()[:4] == b"RCV2" and again.chroma.shape == (2, 1, 2) and again.luma_step == 4
    assert RecoveryData.luma_step_for(5.5) == 3 and RecoveryData.luma_step_for(10) == 4
    assert np.array_equal(again.luma, data.luma) and np.array_equal(again.chroma, data.chroma)
    assert list(again.clipped_at) == [3, 9, 70000] and list(again.clipped_values) == [0, 255, 7]
    for bad in (b"", b"XXXX" + data.to_bytes()[4:], data.to_bytes()[:-3], data.to_bytes() + b"\0"):
        with pytest.raises(ValueError):
            RecoveryData.from_bytes(bad)
    with pytest.raises(ValueError, match="chroma"):
        RecoveryData(data.luma, data.chroma[:, :, :1], data.clipped_at, data.clipped_values)
    with pytest.raises(ValueError, match="luma step"):
        RecoveryData.keep(field, [], [], luma_step=0)


def test_the_kept_field_is_its_brightness_and_coarse_colour():
    """Known answers: grey keeps its level to the luma step; colour is kept as 4×4 means."""
    grey = RecoveryData.keep(np.full((3, 8, 8), 6, np.int8), [], [])
    assert np.array_equal(grey.luma, np.full((8, 8), 2)) and not grey.chroma.any()
    assert np.allclose(grey.field(), 6, atol=1e-4)
    red = RecoveryData.keep(np.stack([np.full((8, 8), 8), np.zeros((8, 8)), np.zeros((8, 8))]).astype(np.int8), [], [])
    assert np.abs(red.field() - [[[8]], [[0]], [[0]]]).max() <= 1.5
    # a smooth field, as refinement makes at the view's scale, comes back within a level or so (RMS)
    smooth = torch.nn.functional.interpolate(torch.randn(1, 3, 8, 10, generator=torch.Generator().manual_seed(1)) * 5,
                                             size=(64, 80), mode="bilinear")[0].round().numpy().astype(np.int8)
    rebuilt = RecoveryData.keep(smooth, [], []).field()
    assert np.sqrt(np.mean((rebuilt - smooth) ** 2)) < 1.5  # the luma step alone gives 0.87


def test_recovery_data_of_the_first_version_is_read():
    first = (ROOT / "tests" / "data" / "refine-method-1" / "recovery.bin").read_bytes()
    assert first[:4] == b"RCV1"
    data = RecoveryData.from_bytes(first)
    assert data.luma.shape == (90, 120) and len(data.clipped_at) == len(data.clipped_values)
    for bad in (first[:-3], first + b"\0"):
        with pytest.raises(ValueError):
            RecoveryData.from_bytes(bad)


# ---------------------------------------------------------------- protection and recovery


@pytest.fixture(scope="module")
def protected_sample():
    original = photo(320, 240)
    protected, info = protect(original, KEY)
    return original, protected, info


def test_protection_fools_both_views_and_recovers_exactly(protected_sample):
    original, protected, info = protected_sample
    assert info.scheme == "refine" and info.recovery is not None
    assert 36 <= psnr(protected, original) < 45
    assert selfcheck.measure(original, protected).asr == 1  # both views of the surrogate fooled
    assert np.array_equal(recover(protected, KEY, info, recovery=info.recovery), original)
    # from the file alone (no record): exact but for pixels that clipped, with the strength found
    alone = recover(protected, KEY)
    assert psnr(alone, original) >= 55
    wrong = recover(protected, OTHER_KEY, info, recovery=info.recovery)
    assert psnr(wrong, original) <= psnr(protected, original) + 1


def test_protection_is_deterministic_and_keyed(protected_sample):
    original, protected, info = protected_sample
    again, _ = protect(original, KEY)
    assert np.array_equal(again, protected)
    other, _ = protect(original, OTHER_KEY)
    assert not np.array_equal(other, protected)


def test_a_working_copy_with_its_originals_size_is_protected_as_the_photo_itself():
    original, options = photo(320, 240), ProtectOptions(max_side=200)
    whole, whole_info = protect(original, KEY, options)
    working = pipeline.working_copy(original, options)
    assert working.shape[:2] == (150, 200)
    again, info = protect(working, KEY, options, original_size=(320, 240))
    assert np.array_equal(again, whole) and info.original_size == (320, 240) and info.working_size == (200, 150)
    assert info.to_dict() == whole_info.to_dict()
    with pytest.raises(ValueError, match="not the working size 200×150 of a 320×240 photo"):
        protect(original, KEY, options, original_size=(320, 240))


def test_recovery_is_the_same_whatever_the_thread_count(protected_sample):
    """The field is recomputed on a fixed number of threads: the caller's setting cannot change it."""
    original, protected, info = protected_sample
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = recover(protected, KEY, info)
        torch.set_num_threads(2)
        two = recover(protected, KEY, info)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(one, two) and np.array_equal(one, original)


def test_recovery_in_a_fresh_process_matches(protected_sample, tmp_path):
    """Another process (one thread) recomputes the same field from the same PNG."""
    original, protected, info = protected_sample
    images.write_image(protected, tmp_path / "p.png")
    (tmp_path / "info.json").write_text(__import__("json").dumps(info.to_dict()))
    script = ("import json, sys, numpy as np, torch; torch.set_num_threads(1)\n"
              "from agent.images import read_image, write_image\nfrom agent.pipeline import ProtectInfo, recover\n"
              f"p = read_image({str(tmp_path / 'p.png')!r}); i = ProtectInfo.from_dict(json.load(open({str(tmp_path / 'info.json')!r})))\n"
              f"write_image(recover(p, bytes(range(32)), i), {str(tmp_path / 'r.png')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    clipped = info.recovery.clipped_at
    recovered = images.read_image(tmp_path / "r.png")
    keep = np.ones(original.size, bool)
    keep[clipped] = False
    assert np.array_equal(recovered.reshape(-1)[keep], original.reshape(-1)[keep])


@pytest.mark.parametrize("strength", ["low", "high"])
def test_every_strength_round_trips(strength):
    original = photo(200, 150)
    protected, info = protect(original, KEY, ProtectOptions(strength=strength))
    assert info.strength == strength
    assert np.array_equal(recover(protected, KEY, info, recovery=info.recovery), original)
    floor = {"low": 42, "high": 31}[strength]
    assert psnr(protected, original) >= floor


def test_photos_heavy_in_clipping_recover_exactly():
    """A white sky over a dark night street: most pixels sit at white or black."""
    rng = np.random.default_rng(2)
    image = np.zeros((180, 240, 3), np.uint8)
    image[:90] = 255
    image[90:, 100:140] = rng.integers(0, 40, (90, 40, 3))
    image[60:90, 30:200] = rng.integers(180, 256, (30, 170, 3))
    protected, info = protect(image, KEY)
    assert not np.array_equal(protected, image)
    assert np.array_equal(recover(protected, KEY, info, recovery=info.recovery), image)
    assert psnr(recover(protected, KEY, info), image) >= 55


@pytest.mark.parametrize("shape, dtype", [((64, 64), np.uint8), ((61, 97, 3), np.uint8), ((70, 90, 4), np.uint8),
                                          ((50, 80, 2), np.uint8), ((64, 96, 3), np.uint16), ((40, 30), np.uint16)],
                         ids=["grey64", "odd", "rgba", "grey-alpha", "rgb16", "grey16"])
def test_layouts_round_trip(shape, dtype):
    rng = np.random.default_rng(3)
    base = photo(shape[1], shape[0])
    maxval = np.iinfo(dtype).max
    colour = base.astype(np.float64) * (maxval / 255)
    channels = shape[2] if len(shape) == 3 else 1
    image = colour.mean(axis=2) if channels in (1, 2) else colour
    if channels in (1, 2):
        image = image[..., None]
    if channels in (2, 4):
        image = np.concatenate([image, rng.integers(0, maxval + 1, shape[:2] + (1,))], axis=2)
    image = np.rint(image).astype(dtype).reshape(shape)
    protected, info = protect(image, KEY)
    recovered = recover(protected, KEY, info, recovery=info.recovery)
    assert recovered.shape == image.shape and recovered.dtype == image.dtype
    assert np.array_equal(recovered, image)


def test_a_large_photo_is_protected_at_the_working_size():
    big = np.asarray(Image.fromarray(photo(600, 450)).resize((3000, 2250)))
    protected, info = protect(big, KEY)
    assert info.working_size == (2048, 1536) and protected.shape == (1536, 2048, 3)
    assert field_size(1536, 2048) == (256, 341)
    working = pipeline.working_copy(big)
    assert np.array_equal(recover(protected, KEY, info, recovery=info.recovery), working)


def test_a_jpeg_copy_recovers_with_the_record(protected_sample):
    original, protected, info = protected_sample
    buffer = io.BytesIO()
    Image.fromarray(protected).save(buffer, "JPEG", quality=90, subsampling=2)
    copy = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    with_record = recover(copy, KEY, info, recovery=info.recovery, copy=True)
    assert psnr(with_record, original) > psnr(copy, original) + 0.5
    own = images.encode_image(protected, "JPEG", quality=95)
    decoded = images.decode_image(own)
    tables = recover(decoded, KEY, info, recovery=info.recovery, jpeg=Quantization.read(own))
    assert psnr(tables, original) > psnr(decoded, original) + 2


def test_files_of_the_first_model_still_recover():
    """A record without a scheme is the rgan scheme's: R and G undo it, as before."""
    original = photo(224, 160)
    protected, info = protect_rgan(original, KEY)
    assert info.scheme == "rgan" and "scheme" not in info.to_dict()
    restored = ProtectInfo.from_dict(info.to_dict())
    assert psnr(recover(protected, KEY, restored), original) >= 48


def test_files_of_the_first_refine_method_still_recover():
    """A photo protected before methods existed (stop 21's code, kept in tests/data): its record has
    no method, and it recovers exactly, with the record and from the file alone."""
    folder = ROOT / "tests" / "data" / "refine-method-1"
    original, protected = (np.asarray(Image.open(folder / name)) for name in ("original.png", "protected.png"))
    info = ProtectInfo.from_dict(json.loads((folder / "info.json").read_text()))
    recovery = RecoveryData.from_bytes((folder / "recovery.bin").read_bytes())
    assert info.method == 1 and "method" not in info.to_dict() and not np.array_equal(protected, original)
    assert np.array_equal(recover(protected, KEY, info, recovery=recovery), original)
    # the record holds the field itself: exact on any machine, even one whose arithmetic would
    # recompute another field (this one was protected on a machine with AVX-512); recomputing from
    # the file alone is exact only where the arithmetic matches (see the next test)
    assert np.array_equal(recover(protected, KEY, applied_field=recovery.exact), original)


# another machine's arithmetic, emulated: ATen's plain kernels and oneDNN's SSE4.1 ones
OTHER_ARITHMETIC = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def test_the_sealed_field_recovers_exactly_where_the_arithmetic_differs(protected_sample, tmp_path):
    """A file's sealed field (`recovery.seal_field`) makes recovery independent of the machine: a
    process with other float kernels recovers the photo exactly from the file and the key, where
    recomputing the field would give another one."""
    original, protected, info = protected_sample
    seal = seal_field(KEY, info.applied_field)
    data = images.encode_image(protected, "PNG", field_seal=seal)
    assert images.png_chunk(data, images.FIELD_CHUNK) == seal
    (tmp_path / "p.png").write_bytes(data)
    (tmp_path / "info.json").write_text(json.dumps(info.to_dict()))
    (tmp_path / "recovery.bin").write_bytes(info.recovery.to_bytes())
    script = ("import json, pathlib, numpy as np\n"
              "from agent import images\nfrom agent.pipeline import ProtectInfo, recover\n"
              "from agent.recovery import RecoveryData, open_field\n"
              f"folder = pathlib.Path({str(tmp_path)!r}); data = (folder / 'p.png').read_bytes()\n"
              "info = ProtectInfo.from_dict(json.loads((folder / 'info.json').read_text()))\n"
              "record = RecoveryData.from_bytes((folder / 'recovery.bin').read_bytes())\n"
              "field = open_field(bytes(range(32)), images.png_chunk(data, images.FIELD_CHUNK))\n"
              "pixels = images.decode_image(data)\n"
              "images.write_image(recover(pixels, bytes(range(32)), info, recovery=record, applied_field=field), folder / 'sealed.png')\n"
              "images.write_image(recover(pixels, bytes(range(32)), info, applied_field=field), folder / 'alone.png')\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env={**os.environ, **OTHER_ARITHMETIC})
    assert np.array_equal(images.read_image(tmp_path / "sealed.png"), original)
    alone = images.read_image(tmp_path / "alone.png")
    clipped = np.zeros(original.size, bool)
    clipped[info.recovery.clipped_at] = True
    assert np.array_equal(alone.reshape(-1)[~clipped], original.reshape(-1)[~clipped])


def test_a_sealed_field_opens_only_with_its_key(protected_sample):
    _, _, info = protected_sample
    seal = seal_field(KEY, info.applied_field)
    assert np.array_equal(open_field(KEY, seal), info.applied_field)
    with pytest.raises(ValueError, match="does not open with this key"):
        open_field(bytes(reversed(KEY)), seal)
    changed = bytearray(seal)
    changed[-1] ^= 1
    with pytest.raises(ValueError, match="does not open"):
        open_field(KEY, bytes(changed))
    with pytest.raises(ValueError, match="version"):
        open_field(KEY, b"XXXX" + seal[4:])
    with pytest.raises(ValueError, match="not the field of this image"):
        recover(np.zeros((50, 60, 3), np.uint8), KEY, applied_field=info.applied_field)


def test_a_record_names_its_method(protected_sample):
    original, protected, info = protected_sample
    assert info.method == METHOD == 2 and info.to_dict()["method"] == 2
    assert ProtectInfo.from_dict(info.to_dict()) == info
    as_first = ProtectInfo.from_dict({**info.to_dict(), "method": 1})
    assert not np.array_equal(recover(protected, KEY, as_first, recovery=info.recovery), original)
    for bad in (3, 0, "2", None):
        with pytest.raises(ValueError, match="method"):
            ProtectInfo.from_dict({**info.to_dict(), "method": bad})


def test_recovery_follows_the_budget_the_record_holds(protected_sample, monkeypatch):
    """Strengths may be retuned later: a record keeps the budget it was protected with."""
    original, protected, info = protected_sample
    assert ProtectInfo.from_dict(info.to_dict()).budget == (5.5, 5, 1)
    monkeypatch.setattr(pipeline, "STRENGTHS", {name: Budget(1.0, 1, 1) for name in pipeline.STRENGTHS})
    assert np.array_equal(recover(protected, KEY, ProtectInfo.from_dict(info.to_dict()), recovery=info.recovery), original)


def test_bad_info_and_recovery_data_are_refused(protected_sample):
    original, protected, info = protected_sample
    for bad in ({**info.to_dict(), "attempt": 7}, {**info.to_dict(), "scheme": "magic"},
                {**info.to_dict(), "budget": [0, 5, 1]}, {**info.to_dict(), "budget": None}):
        with pytest.raises(ValueError):
            ProtectInfo.from_dict(bad)
    with pytest.raises(ValueError, match="size"):
        recover(protected[:-2], KEY, info)


def test_the_judge_is_never_in_the_attack():
    """EfficientNet-Lite1 only judges (bench, tests): no product module may import it."""
    for path in (ROOT / "agent").rglob("*.py"):
        assert "efficientnet" not in path.read_text().lower(), path


def test_views_are_the_platforms(protected_sample):
    original, _, _ = protected_sample
    x = torch.from_numpy(original.astype(np.float32) / 255).permute(2, 0, 1)[None]
    both = views(x)
    assert both.shape == (2, 3, 224, 224)
    assert Budget(6, 5, 1).attempt(2).epsilon == 9
