"""Training checkpoints as safetensors + JSON metadata, never pickles.

A checkpoint holds every module's weights, every optimizer's state (its tensors flattened into
the safetensors file, its hyper-parameters in the metadata), every scheduler's state and the
trainer's own counters, so that a resumed run continues exactly where the saved one stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path

CHECKPOINT_FORMAT = "rgan-agent/checkpoint"
CHECKPOINT_FORMAT_VERSION = "1"


def save_checkpoint(
    path: Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    state: dict[str, Any],
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    optimizer_meta: dict[str, Any] = {}
    for name, module in modules.items():
        for key, tensor in module.state_dict().items():
            tensors[f"module/{name}/{key}"] = tensor.detach().cpu().contiguous()
    for name, optimizer in optimizers.items():
        saved = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, slots in saved["state"].items():
            for slot, value in slots.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer/{name}/{index}/{slot}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[slot] = value
        optimizer_meta[name] = {"param_groups": saved["param_groups"], "scalars": scalars}
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_FORMAT_VERSION,
        "optimizers": json.dumps(optimizer_meta),
        "schedulers": json.dumps({name: s.state_dict() for name, s in schedulers.items()}),
        "state": json.dumps(state),
    }
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_checkpoint(
    path: Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
) -> dict[str, Any]:
    """Restores everything `save_checkpoint` wrote into the given objects; returns the state."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != CHECKPOINT_FORMAT or metadata.get("version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{path} is not an rgan-agent checkpoint of version {CHECKPOINT_FORMAT_VERSION}")
    tensors = load_file(str(path), device="cpu")
    for name, module in modules.items():
        prefix = f"module/{name}/"
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    optimizer_meta = json.loads(metadata["optimizers"])
    for name, optimizer in optimizers.items():
        meta = optimizer_meta[name]
        state: dict[int, dict[str, Any]] = {}
        for index, slots in meta["scalars"].items():
            state.setdefault(int(index), {}).update(slots)
        prefix = f"optimizer/{name}/"
        for key, value in tensors.items():
            if key.startswith(prefix):
                index, slot = key[len(prefix):].split("/")
                state.setdefault(int(index), {})[slot] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler_meta = json.loads(metadata["schedulers"])
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(scheduler_meta[name])
    return json.loads(metadata["state"])
