"""How fast protection and recovery are, end to end on files, beside the floor (JPEG decode +
encode alone) and a naive per-image attack (PGD-20 at full size), all measured in one run so that
the ratios are fair on a noisy machine. Writes bench/results/speed.json and docs/speed.md.

    .venv/bin/python bench/speed.py [--repeats 5]

1. decode → protect (medium, default working resolution) → encode JPEG, for a 2048×1536 photo and a
   12-megapixel (4000×3000) one; recovery of each protected PNG; the JPEG decode + encode alone.
2. PGD-20 applied naively: 20 signed steps on the whole 2048×1536 photo through both views.
3. Peak memory protecting a 24-megapixel photo at full size (`max_side=None`), in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.atomic import write_text  # noqa: E402
from agent.data import photo_paths  # noqa: E402
from agent.images import decode, read_bytes, read_image, write_image  # noqa: E402
from agent.jpeg import Quantization  # noqa: E402
from agent.pipeline import ProtectInfo, ProtectOptions, protect, recover  # noqa: E402
from agent.refine import views  # noqa: E402
from agent.surrogate import surrogate  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "speed.json"
REPORT = ROOT / "docs" / "speed.md"
KEY = bytes(range(32))
PGD_STEPS = 20
SIZES = (("2048x1536", (2048, 1536), 1.0), ("12MP 4000x3000", (4000, 3000), 1.5))


def make_photo(folder: Path, size: tuple[int, int]) -> Path:
    """A real photo (bsds500 test, upscaled) saved as a camera-like JPEG of the given size."""
    source = photo_paths("bsds-test")[0]
    with Image.open(source) as image:
        image = image.convert("RGB").resize(size, Image.LANCZOS)
    path = folder / f"photo-{size[0]}x{size[1]}.jpg"
    image.save(path, quality=92)
    return path


def protect_file(src: Path, dst: Path) -> ProtectInfo:
    """End to end, as the service protects a file: decode, protect, encode."""
    pixels, icc = decode(read_bytes(src), str(src))
    protected, info = protect(pixels, KEY, ProtectOptions())
    write_image(protected, dst, icc=icc)
    return info


def recover_file(src: Path, dst: Path, info: ProtectInfo) -> None:
    data = read_bytes(src)
    pixels, icc = decode(data, str(src))
    write_image(recover(pixels, KEY, info, jpeg=Quantization.read(data)), dst, icc=icc)


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def file_figures(folder: Path, repeats: int) -> dict[str, dict[str, float]]:
    results = {}
    for label, size, _ in SIZES:
        src = make_photo(folder, size)
        dst, png, back = (folder / f"{name}-{label.split()[0]}{suffix}"
                          for name, suffix in (("protected", ".jpg"), ("protected", ".png"), ("recovered", ".png")))

        def codec_only() -> None:
            with Image.open(src) as image:
                image.convert("RGB").save(dst, quality=95)

        protect_file(src, dst)  # warm-up: the networks load once per process
        floor = timed(codec_only, repeats)
        total = timed(lambda: protect_file(src, dst), repeats)
        info = protect_file(src, png)
        recovery = timed(lambda: recover_file(png, back, info), repeats)
        results[label] = {"median_s": statistics.median(total), "codec_median_s": statistics.median(floor),
                          "recover_median_s": statistics.median(recovery), "attempt": info.attempt, "runs": repeats}
    return results


def pgd_full_size(folder: Path) -> dict[str, float]:
    """PGD-20 as a naive per-image attack would run it: every step through the full-size photo."""
    pixels = read_image(make_photo(folder, (2048, 1536)))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    classifier = surrogate()
    with torch.no_grad():
        labels = classifier(views(x)).argmax(1)
    epsilon, delta = 4 / 255, torch.zeros_like(x)
    started = time.perf_counter()
    for _ in range(PGD_STEPS):
        delta.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(classifier(views((x + delta).clamp(0, 1))), labels)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + epsilon / 4 * grad.sign()).clamp(-epsilon, epsilon)
    return {"seconds": time.perf_counter() - started, "steps": PGD_STEPS}


MEMORY_PROBE = """
import numpy as np
from PIL import Image
from agent.pipeline import ProtectOptions, protect
small = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
photo = np.asarray(Image.fromarray(small).resize((6000, 4000), Image.Resampling.BILINEAR))
protect(photo, bytes(32), ProtectOptions(max_side=None))
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def memory_figures() -> dict[str, float]:
    """Peak RSS of protecting a 24-megapixel photo at full size, measured by a fresh
    process on itself. VmHWM and not getrusage's ru_maxrss: Linux carries ru_maxrss across
    fork + exec, so the child would report this bench's own size."""
    import subprocess

    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE], check=True, cwd=ROOT,
                          capture_output=True, text=True)
    peak_kib = int(done.stdout.split()[-1])
    return {"megapixels": 24.0, "peak_rss_gib": peak_kib / 2**20, "seconds": time.perf_counter() - started}


def report(results: dict) -> str:
    files, pgd = results["files"], results["pgd"]
    rows = []
    for label, _, target in SIZES:
        f = files[label]
        rows.append(f"| {label} | {f['median_s']:.2f} s ({'met' if f['median_s'] <= target else '**missed**'}) "
                    f"| {f['recover_median_s']:.2f} s ({'met' if f['recover_median_s'] <= target else '**missed**'}) "
                    f"| ≤ {target} s | {f['codec_median_s']:.3f} s | {f['median_s'] / f['codec_median_s']:.1f}× |")
    memory = results["memory"]
    medium = files["2048x1536"]["median_s"]
    return f"""# Speed

Generated by `bench/speed.py` (raw figures in `bench/results/speed.json`), on {results['threads']} CPU
threads; medians of {files['2048x1536']['runs']} runs, medium strength, default working resolution
(long side 2048), all in one run.

| photo, JPEG | protect end to end (decode → protect → encode) | recover the protected PNG | target | JPEG decode + encode alone | protect ÷ floor |
|---|---|---|---|---|---|
{chr(10).join(rows)}

PGD-20 applied naively to the 2048×1536 photo (every step through the full-size image and both
views): {pgd['seconds']:.2f} s, {pgd['seconds'] / medium:.1f}× the whole protection of the same photo.

Peak memory protecting a 24-megapixel photo at full size (`max_side=None`), in a fresh process:
{memory['peak_rss_gib']:.2f} GiB (target ≤ 1.5 GB: {"met" if memory['peak_rss_gib'] * 2**30 <= 1.5e9 else "**missed**"}), {memory['seconds']:.1f} s.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = {
            "threads": torch.get_num_threads(),
            "files": file_figures(Path(folder), args.repeats),
            "pgd": pgd_full_size(Path(folder)),
            "memory": memory_figures(),
        }
    write_text(RESULTS, json.dumps(results, indent=2))
    text = report(results)
    write_text(REPORT, text)
    print(text)


if __name__ == "__main__":
    main()
