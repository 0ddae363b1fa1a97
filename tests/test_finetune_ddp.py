"""Data-parallel training (agent/rgan/train.py under torch.distributed): two CPU processes with the
gloo backend train on the same global batches as one process, and reach the same losses."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import distributed as dist

from agent.data import PhotoSet
from agent.rgan.config import ModelConfig, ReducerConfig, TrainConfig
from agent.rgan.train import build_trainer, train_epoch

# keyed, with every channel transform of the photo path (crops, keys, downscaling, JPEG, the
# key-less attacker); instance norm because on the CPU batch statistics stay per process (gloo has
# no SyncBatchNorm), which would make the two runs differ by design rather than by rounding
CONFIG = TrainConfig(
    model=ModelConfig(width=4, g_depth=1, r_depth=1, d_width=8, keyed=True, key_noise=2 / 255, g_stride=2,
                      reducer=ReducerConfig(down="conv")),
    data="photos", crop=32, epochs=1, batch_size=4, lr_step=1, resize_min=0.5, jpeg_prob=1.0, keyless_weight=1.0,
)
PHOTOS = 8


def photos() -> PhotoSet:
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 40, 48), generator=generator, dtype=torch.uint8) for _ in range(PHOTOS)]
    return PhotoSet(images, torch.full((PHOTOS,), -1), [f"{i}.png" for i in range(PHOTOS)])


def run(trainer) -> dict:
    steps = []
    train_epoch(trainer, photos(), on_step=lambda step, count, means: steps.append(dict(means)))
    weights = {name: tensor.tolist() for name, tensor in trainer.model.state_dict().items()
               if tensor.is_floating_point()}
    return {"steps": steps, "weights": weights}


def _process(rank: int, world: int, folder: str) -> None:
    from conftest import TinyClassifier

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        trainer = build_trainer(CONFIG, [TinyClassifier()])
        assert trainer.world == world and trainer.replicas is not None
        result = run(trainer)
        if rank == 0:
            with open(os.path.join(folder, "result.json"), "w") as handle:
                json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_train_like_one_on_the_same_global_batch(tmp_path, tiny_classifier):
    mp.spawn(_process, args=(2, str(tmp_path)), nprocs=2, join=True)
    parallel = json.loads((tmp_path / "result.json").read_text())
    single = run(build_trainer(CONFIG, [tiny_classifier]))

    # 2 steps of a global batch of 4 (2 images per process). The processes compute the same
    # per-image values as the single one; what differs is where sums are taken (a mean of two
    # half-batch gradient means, all-reduced, against one mean over the batch): about 1e-7
    # relative in float32, so the losses must agree to 1e-4 relative, far closer than anything a
    # real difference (another batch, a gradient not averaged) would give: the two steps' losses
    # differ from each other by more than 1e-2.
    assert len(parallel["steps"]) == len(single["steps"]) == 2
    for got, expected in zip(parallel["steps"], single["steps"]):
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
    # The weights: Adam divides by sqrt(v), so where a gradient is only rounding noise (a bias
    # followed by instance norm, which cancels it) its first updates are ±lr either way: such a
    # weight may move by up to 2·lr per step in opposite directions. Every other weight agrees to
    # rounding.
    lr, steps = CONFIG.lr, 2
    differences = []
    for name, expected in single["weights"].items():
        difference = (torch.tensor(parallel["weights"][name]) - torch.tensor(expected)).abs().flatten()
        assert difference.max() <= 2 * lr * steps, name
        differences.append(difference)
    differences = torch.cat(differences)
    assert (differences > 1e-5).float().mean() < 0.05


def test_a_job_with_two_processes_runs_under_torchrun(tmp_path, monkeypatch):
    """The product's path: the worker launches `torchrun -m agent.finetune` with two gloo processes,
    relays rank 0's progress, then measures and stores the model rank 0 wrote."""
    import numpy as np
    from PIL import Image

    from agent import finetune
    from agent.service import jobs, models
    from agent.service.users import init_user

    monkeypatch.setattr(finetune, "measure", lambda model, holdout, device="cpu": {
        "asr": 0.5, "psnr_adv": 33.0, "psnr_rec": 50.0, "psnr_rec_wrong_key": 33.0, "ssim_adv": 0.97})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    home = tmp_path / "home"
    init_user(home, "alice", "pw", kdf_n=2**14)
    job = jobs.submit_finetune(home, None, [folder], epochs=1, crop=32, batch_size=4, nproc=2)
    assert jobs.run_worker(home, None, "pw", once=True) == 1
    done = jobs.show_job(home, job["id"])
    assert done["state"] == "done", done["error"]
    assert done["progress"]["step"] == done["progress"]["steps"] == 3  # 11 training photos, global batch 4
    assert done["result"]["active"] and models.list_models(home)[1]["name"] == done["result"]["model"]
