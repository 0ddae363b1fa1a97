"""The surrogate classifier that protection attacks: torchvision's ImageNet MobileNetV2, shipped
with the agent (`weights/mobilenet_v2-imagenet.safetensors`, BSD-3-Clause, `weights/LICENSE-torchvision.txt`).

Protection and recovery both run it: the key holder recomputes the refinement from the protected
file, so the weights are part of the product, fixed bit for bit. They are stored in float16 (half
the size; the surrogate's top-1 on imagenet-sample is unchanged) and computed in float32.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .classifiers import IMAGENET_MEAN, IMAGENET_STD, Normalized, freeze

SURROGATE_PATH = Path(str(resources.files("agent") / "weights" / "mobilenet_v2-imagenet.safetensors"))


@functools.cache
def surrogate() -> nn.Module:
    """The frozen surrogate on [0, 1] RGB input, loaded once per process."""
    from torchvision.models import mobilenet_v2

    if not SURROGATE_PATH.is_file():
        raise FileNotFoundError(f"the surrogate classifier {SURROGATE_PATH} is not installed; reinstall the agent")
    net = mobilenet_v2()
    net.load_state_dict({name: tensor.float() for name, tensor in load_file(SURROGATE_PATH).items()})
    # channels-last runs the depthwise convolutions about a quarter faster on the CPU
    return freeze(Normalized(net, IMAGENET_MEAN, IMAGENET_STD)).to(memory_format=torch.channels_last)
