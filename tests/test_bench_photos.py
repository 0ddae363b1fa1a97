"""The photo benches' reports: every target gets a verdict that follows the figures."""

import importlib.util
from pathlib import Path

import torch


def load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quality, speed = load("quality"), load("speed")


def quality_results(asr=0.97, psnr_attacker=34.0):
    crops = {"asr": asr, "psnr_adv": 33.0, "psnr_rec": 46.0, "acc_clean": 0.82, "acc_rec": 0.815,
             "psnr_rec_wrong_key": 33.5}
    full = {"asr_crop": 0.93, "asr_squash": 0.91, "psnr_adv": 33.1, "psnr_rec": 45.5,
            "protect_seconds_median": 0.1, "images": 200}
    return {"model": "m.safetensors", "threads": 2, "seconds": 10.0, "crops": crops,
            "jpeg90": {"asr": 0.9, "psnr_adv": 32.0, "psnr_rec": 39.0},
            "full_imagenet_val": full, "full_bsds_test": full,
            "keyless": {"psnr_attacker": psnr_attacker, "psnr_protected": 33.0, "steps": 100, "seconds": 5.0}}


def test_quality_report_gives_each_target_a_verdict():
    text = quality.report(quality_results())
    assert "**missed**" not in text and text.count("| met |") == 12
    missed = quality.report(quality_results(asr=0.9, psnr_attacker=38.0))
    assert missed.count("**missed**") == 2
    assert "90.0%" in missed and "38.00 dB" in missed


def test_the_wrong_key_target_is_relative_to_the_protected_image():
    results = quality_results()
    results["crops"]["psnr_rec_wrong_key"] = 34.5  # protected 33.0 + 1 dB < 34.5
    assert "**missed**" in quality.report(results)


def test_speed_report_states_the_ratio_and_the_targets():
    files = {"2048x1536": {"median_s": 0.8, "codec_median_s": 0.04, "runs": 5},
             "12MP 4000x3000": {"median_s": 1.7, "codec_median_s": 0.1, "runs": 5}}
    baseline = {"images": 200, "rgan_ms_per_image": 10.0, "pgd_ms_per_image": 2000.0, "speedup": 200.0,
                "rgan_asr": 0.95, "pgd_asr": 1.0, "rgan_psnr": 33.0, "pgd_psnr": 33.5}
    memory = {"megapixels": 24.0, "peak_rss_gib": 1.2, "seconds": 20.0}
    text = speed.report({"model": "m", "threads": 2, "files": files, "baseline": baseline, "gpu": None,
                         "memory": memory})
    assert "1.20 GiB (target ≤ 2 GB: met)" in text
    assert "200× faster" in text and "No GPU" in text
    assert "≤ 1.0 s: met" in text and "≤ 1.5 s: **missed**" in text


def test_pgd_stays_within_its_bound():
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    clean = torch.rand(3, 3, 8, 8)
    attacked = speed.pgd(classifier, clean, classifier(clean).argmax(1), 4 / 255)
    assert (attacked - clean).abs().max() <= 4 / 255 + 0.5 / 255 + 1e-6
    assert ((attacked * 255).round() == attacked * 255).all()
