"""The photo benches' reports: every target gets a verdict that follows the figures."""

import importlib.util
from pathlib import Path


def load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quality, speed = load("quality"), load("speed")


def photo_set(asr=0.99, psnr=39.0, transfer=0.6):
    figures = {"photos": 10, "psnr": psnr, "attempt": 0.1, "seconds": 0.9, "max_seconds": 1.4, "record_kb": 30.0,
               "attempts": [9, 1, 0], "transfer": transfer, "noise_transfer": 0.05, "recover_seconds": 0.7,
               "rec_sealed": 100.0, "seal_kb": 100.0, "png_kb": 400.0,
               "rec_lossless": 100.0, "rec_file_alone": 95.0, "top1_kept": 1.0, "rec_wrong_key": 36.0,
               "rec_own_jpeg": 45.0, "own_jpeg_of_original": 46.0, "rec_platform_jpeg90": 38.5,
               "platform_jpeg90_of_original": 39.0}
    for name in ("white", "jpeg90", "half"):
        figures.update({f"asr_{name}": asr, f"noise_{name}": 0.03, f"platform_{name}": 0.01})
    return figures


def test_quality_report_marks_each_target_and_states_the_controls():
    results = {"threads": 2, "strengths": {"medium": {"imagenet-val": photo_set()}}}
    text = quality.report(results)
    assert text.count("✓") == 4 and "target" not in text.split("### medium")[1].split("\n\n")[1].replace("(target", "")
    missed = quality.report({"threads": 2, "strengths": {"medium": {"imagenet-val": photo_set(asr=0.9, psnr=37.0, transfer=0.3)}}})
    assert "90.0% (target 98.0%)" in missed and "37.00 dB (target 38)" in missed and "30.0% (target 50.0%)" in missed
    assert "(3.0%)" in missed  # every ASR stands beside its noise control
    assert "| 30.0 | 100.0 (400) |" in text  # the record's size, and what a PNG adds to carry its field


def test_speed_report_states_the_floor_the_naive_attack_and_the_targets():
    files = {"2048x1536": {"median_s": 0.8, "codec_median_s": 0.04, "recover_median_s": 0.7, "runs": 5, "attempt": 0},
             "12MP 4000x3000": {"median_s": 1.7, "codec_median_s": 0.1, "recover_median_s": 1.2, "runs": 5, "attempt": 0}}
    text = speed.report({"threads": 2, "files": files, "pgd": {"seconds": 16.0, "steps": 20},
                         "memory": {"megapixels": 24.0, "peak_rss_gib": 1.2, "seconds": 20.0}})
    assert "1.20 GiB (target ≤ 1.5 GB: met)" in text
    assert "| 2048x1536 | 0.80 s (met) | 0.70 s (met) |" in text and "1.70 s (**missed**)" in text
    assert "20.0× the whole protection" in text


def test_steps_report_puts_each_start_beside_its_noise_control():
    steps = load("steps")
    rows = {str(k): {"asr": 0.5 + k / 20, "noise": 0.05, "psnr": 38.0} for k in steps.STEPS}
    text = steps.report({"photos": 24, "epsilon": 6.0, "starts": {"G": rows, "random": rows}})
    assert "| G | 50.0% (5.0%), 38.0 dB" in text and "90.0% (5.0%)" in text and text.count("| random |") == 1


def test_purify_report_puts_each_purifier_beside_its_controls():
    purify = load("purify")
    row = {"psnr": 36.0, "asr_protected": 0.7, "asr_noise": 0.05, "asr_itself": 0.0}
    rows = {"none": {**row, "asr_protected": 0.95}, "key-less R": row,
            "JPEG 75": {**row, "psnr": 30.0, "asr_protected": 0.4, "asr_itself": 0.3}}
    text = purify.report({"held_back": 60, "strength": "medium", "bound_levels": 12, "steps": 600, "batch": 8,
                          "crop": 128, "train_photos": 320, "train_seconds": 100.0, "purifiers": rows,
                          "best_attacker": "key-less R", "strongest": "JPEG 75"})
    assert "| key-less R | 36.00 dB | 70.0% | 5.0% | 0.0% |" in text and "| none | 36.00 dB | 95.0% |" in text
    assert "Strongest purifier: JPEG 75, which leaves 40.0% ASR (goal ≥ 50% at medium)" in text
    assert "own label on 30.0% of views" in text
