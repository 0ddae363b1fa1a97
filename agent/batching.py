"""Micro-batching for the local service on a GPU: photos protected at the same time by different
worker threads go through the networks as one batch.

A GPU runs one 1-image forward pass barely faster than an 8-image one, so with several uploads in
flight (a user dropping an album on a page) batching multiplies throughput. Calls are grouped only
when their inputs have the same shape (the same working size, or the same tile size of large
photos), so nothing is padded and every result equals the unbatched one: the shipped models use
batch norm, which in eval mode treats every image on its own.

No thread of its own: the first call of a group waits up to `wait` seconds for companions (or
until the group is full), runs the batch and hands each caller its slice.
"""

from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from .rgan.model import RGAN


@dataclass(eq=False)
class _Call:
    x: torch.Tensor
    pattern: torch.Tensor | None
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class _Group:
    calls: list[_Call] = field(default_factory=list)
    full: threading.Event = field(default_factory=threading.Event)


class MicroBatcher:
    """Runs `function(x, pattern)` for many threads, stacking same-shaped calls that arrive within
    `wait` seconds of the first into one call of up to `max_batch` images. `x` is (1, C, H, W);
    `pattern` is (3, H, W), (1, 3, H, W) or None. Counts what it did, for the service's status."""

    def __init__(self, max_batch: int, wait: float = 0.005):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if wait < 0:
            raise ValueError(f"wait must not be negative, got {wait}")
        self.max_batch, self.wait = max_batch, wait
        self.calls = self.batches = 0
        self._lock = threading.Lock()
        self._open: dict[tuple, _Group] = {}

    def run(self, function: Callable, x: torch.Tensor, pattern: torch.Tensor | None, *options) -> torch.Tensor:
        """`function(x, pattern, *options)`; only calls with equal `options` share a batch."""
        if len(x) != 1:
            raise ValueError(f"micro-batching takes one image per call, got {len(x)}")
        key = (function, tuple(x.shape), x.device, x.dtype, pattern is None, options)
        call = _Call(x, pattern)
        with self._lock:
            group = self._open.get(key)
            leader = group is None
            if leader:
                group = self._open[key] = _Group()
            group.calls.append(call)
            if len(group.calls) >= self.max_batch:
                # closed: later calls start a group of their own
                del self._open[key]
                group.full.set()
        if leader:
            group.full.wait(self.wait)
            with self._lock:
                if self._open.get(key) is group:
                    del self._open[key]
                self.calls += len(group.calls)
                self.batches += 1
            self._execute(function, group.calls, options)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    @staticmethod
    def _execute(function: Callable, calls: list[_Call], options: tuple) -> None:
        try:
            x = torch.cat([call.x for call in calls])
            patterns = None
            if calls[0].pattern is not None:
                patterns = torch.stack([call.pattern.reshape(call.pattern.shape[-3:]) for call in calls])
            out = function(x, patterns, *options)
            for index, call in enumerate(calls):
                call.result = out[index : index + 1]
        except BaseException as error:  # every waiting caller gets the error, none hangs
            for call in calls:
                call.error = error
        finally:
            for call in calls:
                call.done.set()


class BatchedModel:
    """`model` with protection's forward pass (`perturbation`) going through a `MicroBatcher`;
    everything else (recovery, which the service never does) is the model's own."""

    def __init__(self, model: RGAN, batcher: MicroBatcher):
        self._model, self._batcher = model, batcher

    @property
    def model(self) -> RGAN:
        """The model itself (the refine scheme runs G's proposal unbatched, on the CPU)."""
        return self._model

    def perturbation(self, x: torch.Tensor, pattern: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
        return self._batcher.run(self._model.perturbation, x, pattern, strength)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


class Accelerator:
    """What the service runs its models on: a copy of each model on `device`, made once, behind
    one `MicroBatcher` when `micro_batch` > 1. The models it is given stay on the CPU, untouched:
    other commands in the process share them."""

    def __init__(self, device: str = "cpu", micro_batch: int = 1, wait: float = 0.005):
        self.device = torch.device(device)
        self.batcher = MicroBatcher(micro_batch, wait) if micro_batch > 1 else None
        # weak: a model the service's cache let go of takes its copy with it
        self._copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def prepare(self, model: RGAN) -> RGAN | BatchedModel:
        placed = model
        if next(model.parameters()).device != self.device:
            with self._lock:
                placed = self._copies.get(model)
                if placed is None:
                    placed = self._copies[model] = copy.deepcopy(model).to(self.device).eval()
        return BatchedModel(placed, self.batcher) if self.batcher else placed

    def status(self) -> dict:
        batcher = self.batcher
        return {"device": str(self.device), "micro_batch": batcher.max_batch if batcher else 1,
                "mean_batch": round(batcher.calls / batcher.batches, 2) if batcher and batcher.batches else None}
