import contextlib
import dataclasses
import os
from pathlib import Path

import pytest
import torch

from agent.data import load_cifar10, shared_dir

SAMPLE = Path(__file__).resolve().parents[1] / "agent" / "assets" / "sample.png"  # the bundled photo

torch.set_num_threads(2)
# never the OS keyring of the machine the tests run on (nor in the CLI's subprocesses): a backend
# that refuses everything, as on a machine without one; tests/test_keyring.py sets its own
os.environ["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"


@pytest.fixture(scope="session")
def cifar_train():
    if not (shared_dir() / "data" / "cifar10").exists():
        pytest.skip("../shared is not available")
    return load_cifar10("train")


@pytest.fixture(scope="session")
def cifar_test():
    if not (shared_dir() / "data" / "cifar10").exists():
        pytest.skip("../shared is not available")
    return load_cifar10("test")


@contextlib.contextmanager
def single_thread():
    """Small tensors gain nothing from a second thread, and on a busy machine handing work between
    two threads costs several times over; the setting is restored for the tests that follow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


def smooth_images(count, side, generator):
    """Smooth random images: what a purifier can learn to clean within a few steps."""
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)


@dataclasses.dataclass
class NoisyPairs:
    """A purifier's training pairs for tests: smooth images and a sign-noise "adversarial" copy."""

    side: int = 16
    amplitude: float = 0.03

    def batch(self, size, generator):
        clean = smooth_images(size, self.side, generator)
        noise = torch.sign(torch.rand(clean.shape, generator=generator) - 0.5)
        return clean, (clean + self.amplitude * noise).clamp(0, 1)


class TinyClassifier(torch.nn.Module):
    """A small random frozen CNN: a stand-in target where a real classifier is not the point."""

    def __init__(self, classes: int = 10):
        super().__init__()
        torch.manual_seed(123)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, classes),
        )
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.net(x)


@pytest.fixture
def tiny_classifier():
    return TinyClassifier()


@pytest.fixture(scope="session")
def imagenet_val():
    from agent.data import load_photos

    if not (shared_dir() / "data" / "photos").exists():
        pytest.skip("../shared is not available")
    return load_photos("imagenet-val")


@pytest.fixture(autouse=True)
def quick_protection(request, monkeypatch):
    """Most tests check what happens around a protection (files, records, the service, the
    extension), not how strong it is: they get one step and one attempt, several times cheaper.
    Tests of the protection itself are marked `full_protection` and get the real budgets."""
    if request.node.get_closest_marker("full_protection"):
        return
    from agent import pipeline
    from agent.refine import Budget

    cheap = {name: Budget(budget.epsilon, 1, budget.pattern) for name, budget in pipeline.STRENGTHS.items()}
    monkeypatch.setattr(pipeline, "STRENGTHS", cheap)
    monkeypatch.setattr(pipeline, "PROTECT_ATTEMPTS", 1)
