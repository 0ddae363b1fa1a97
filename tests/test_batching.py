"""Micro-batching: concurrent calls share forward passes and each caller still gets exactly its
own result; shapes never mix; an error reaches every caller; no caller hangs."""

import threading

import numpy as np
import pytest
import torch

from agent import pipeline
from agent.batching import Accelerator, BatchedModel, MicroBatcher


class Recording:
    """x + pattern's first channel, recording the batch sizes it was called with."""

    def __init__(self, fail: bool = False):
        self.sizes: list[int] = []
        self.fail = fail

    def __call__(self, x, pattern):
        self.sizes.append(len(x))
        if self.fail:
            raise RuntimeError("the network broke")
        return x * 2 + pattern[:, :1]


def concurrently(count, call):
    """Runs call(i) in `count` threads released together; returns results (or errors) by i."""
    barrier = threading.Barrier(count)
    out = [None] * count

    def run(i):
        barrier.wait()
        try:
            out[i] = call(i)
        except Exception as error:  # noqa: BLE001 - handed to the test
            out[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
        assert not thread.is_alive(), "a caller hung"
    return out


def inputs(i, side=8):
    generator = torch.Generator().manual_seed(i)
    return torch.rand(1, 3, side, side, generator=generator), torch.rand(3, side, side, generator=generator)


def test_concurrent_calls_share_batches_and_each_gets_its_own_result():
    function, batcher = Recording(), MicroBatcher(max_batch=8, wait=0.5)
    results = concurrently(6, lambda i: batcher.run(function, *inputs(i)))
    for i, result in enumerate(results):
        x, pattern = inputs(i)
        assert torch.equal(result, x * 2 + pattern[None, :1])
    assert sum(function.sizes) == 6 and len(function.sizes) < 6
    assert batcher.calls == 6 and batcher.batches == len(function.sizes)


def test_a_full_group_runs_at_once_and_never_exceeds_the_batch():
    function, batcher = Recording(), MicroBatcher(max_batch=2, wait=5.0)
    # with a 5 s wait only a full group runs in time: four callers make two full pairs
    results = concurrently(4, lambda i: batcher.run(function, *inputs(i)))
    assert all(isinstance(r, torch.Tensor) for r in results)
    assert function.sizes == [2, 2]


def test_shapes_never_share_a_batch():
    function, batcher = Recording(), MicroBatcher(max_batch=8, wait=0.3)
    results = concurrently(4, lambda i: batcher.run(function, *inputs(i, side=8 if i % 2 else 12)))
    assert [r.shape[-1] for r in results] == [12, 8, 12, 8]
    assert sorted(function.sizes) == [2, 2]


def test_an_error_reaches_every_caller_of_the_batch():
    broken, batcher = Recording(fail=True), MicroBatcher(max_batch=4, wait=0.5)
    results = concurrently(4, lambda i: batcher.run(broken, *inputs(i)))
    assert all(isinstance(r, RuntimeError) and "broke" in str(r) for r in results)


def test_bad_settings_and_batches_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(0)
    with pytest.raises(ValueError, match="one image per call"):
        MicroBatcher(2).run(Recording(), torch.rand(2, 3, 4, 4), torch.rand(3, 4, 4))


def test_protecting_through_the_batcher_gives_the_pixels_of_protecting_alone():
    model = pipeline.default_model()
    images = [np.random.default_rng(i).integers(0, 256, (40, 56, 3), dtype=np.uint8) for i in range(4)]
    keys = [bytes([i + 1]) * 32 for i in range(4)]
    alone = [pipeline.protect_rgan(image, key, model=model)[0] for image, key in zip(images, keys)]
    batched = BatchedModel(model, MicroBatcher(max_batch=4, wait=0.5))
    together = concurrently(4, lambda i: pipeline.protect_rgan(images[i], keys[i], model=batched)[0])
    for a, b in zip(alone, together):
        # batched convolutions may sum in another order: at most one grey level, and rarely
        difference = np.abs(a.astype(int) - b.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.001
    assert batched._batcher.batches < batched._batcher.calls == 4


def test_the_accelerator_leaves_a_cpu_model_as_it_is_unless_batching():
    model = pipeline.default_model()
    assert Accelerator("cpu").prepare(model) is model
    assert Accelerator("cpu").status() == {"device": "cpu", "micro_batch": 1, "mean_batch": None}
    batched = Accelerator("cpu", micro_batch=4).prepare(model)
    assert isinstance(batched, BatchedModel) and batched.config is model.config


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_accelerator_copies_the_model_once_and_leaves_the_original_on_the_cpu():
    model = pipeline.default_model()
    accelerator = Accelerator("cuda", micro_batch=4)
    first, second = accelerator.prepare(model), accelerator.prepare(model)
    assert first._model is second._model
    assert next(first.parameters()).is_cuda and not next(model.parameters()).is_cuda
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    on_gpu = pipeline.protect(image, bytes(32), model=first)[0]
    on_cpu = pipeline.protect(image, bytes(32), model=model)[0]
    assert np.abs(on_gpu.astype(int) - on_cpu.astype(int)).max() <= 1
