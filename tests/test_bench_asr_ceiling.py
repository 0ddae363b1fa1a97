"""bench/asr_ceiling.py's measurements on a stand-in model and classifier with known answers."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

spec = importlib.util.spec_from_file_location("asr_ceiling", Path(__file__).parents[1] / "bench" / "asr_ceiling.py")
asr_ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(asr_ceiling)

EPS = 8 / 255


class RedThreshold(nn.Module):
    """Class 1 when the mean red value is above one half, else class 0."""

    def forward(self, x):
        red = x[:, 0].mean(dim=(1, 2))
        return torch.stack([0.5 - red, red - 0.5], dim=1) * 100


@dataclass
class FixedPerturbation:
    """Adds +ε of red to images 0 and 2, and −ε/2 to images 1 and 3."""

    @dataclass
    class Config:
        epsilon: float = EPS

    config = Config()

    def learned_perturbation(self, x):
        share = torch.tensor([1.0, -0.5, 1.0, -0.5])[:, None, None, None]
        return EPS * share * torch.tensor([1.0, 0.0, 0.0])[None, :, None, None].expand_as(x)


def test_measure_separates_gs_directions_from_their_magnitude_and_from_one_shared_pattern():
    clean = torch.full((4, 3, 8, 8), 125 / 255)  # class 0, ε away from class 1
    labels = torch.tensor([0, 0, 1, 1])
    figures = asr_ceiling.measure(FixedPerturbation(), RedThreshold(), clean, labels)
    assert figures["asr"] == 0.5
    # the mean perturbation is positive red everywhere: at ±ε it moves every image
    assert figures["universal_sign"]["asr"] == 1.0
    # at the full bound images 1 and 3 get −ε of red: still class 0
    assert figures["full_bound"]["asr"] == 0.5
    assert figures["share_at_bound"] == pytest.approx(2 / 12)  # the red planes of images 0 and 2
    assert figures["per_class"]["airplane"] == {"images": 2, "asr": 0.5, "sent_to": {"airplane": 1, "automobile": 1}}
    assert figures["per_class"]["automobile"]["asr"] == 0.5


def test_the_report_names_each_model_and_class():
    split = {"images": 4, "asr": 0.5, "psnr": 31.0, "universal_sign": {"asr": 1.0, "psnr": 30.1},
             "full_bound": {"asr": 0.5, "psnr": 30.2}, "share_at_bound": 0.2,
             "per_class": {"ship": {"images": 4, "asr": 0.5, "sent_to": {"cat": 3, "ship": 1}}}}
    text = asr_ceiling.report({"m.safetensors": {"held back": split}})
    assert "| `m.safetensors` | held back (4) | 50.0% ASR, 31.00 dB | 100.0% ASR, 30.10 dB | 50.0% ASR, 30.20 dB |" in text
    assert "| `m.safetensors` | ship (held back) | 4 | 50.0% | cat 75%, ship 25% |" in text
