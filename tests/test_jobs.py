"""Background fine-tuning jobs (agent/service/jobs.py, agent/finetune.py): the queue, claiming, cancelling,
stopping and resuming, the quality gate, and the commands. Runs are tiny (12 random photos, 32-px
crops, batches of 4) but go through the real loop, the real MobileNetV2 and the real model store."""

import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from agent import finetune
from agent.cli import app
from agent.rgan import train as training
from agent.service import jobs, models
from agent.service.home import USER_ERRORS
from agent.service.protect import protect_paths
from agent.service.recover import recover_paths
from agent.service.users import init_user

PW = "correct horse"
KDF = 2**14
TINY = {"epochs": 2, "crop": 32, "batch_size": 4}
from conftest import SAMPLE


@pytest.fixture(autouse=True)
def prompt_reports(monkeypatch):
    # every step's progress written and the state read every time: the tests stop at exact steps
    monkeypatch.setattr(jobs, "REPORT_EVERY", 0.0)


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        pixels = (rng.random((40 + i, 56, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / ("nested" if i % 3 == 0 else "") / f"p{i}.{'png' if i % 2 else 'jpg'}")
    (folder / "notes.txt").write_text("not a photo")
    return folder


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "home"
    init_user(home, "alice", PW, kdf_n=KDF)
    return home


def state(home: Path, job_id: int) -> str:
    return jobs.show_job(home, job_id)["state"]


def trained_epochs(monkeypatch) -> list[int]:
    """The epochs the loop trains from now on (a resumed run must not train the finished ones again)."""
    epochs = []
    original = training.train_epoch

    def counting(trainer, *args, **kwargs):
        epochs.append(trainer.epoch + 1)
        return original(trainer, *args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", counting)
    return epochs


def on_progress(monkeypatch, action):
    """Calls `action(progress)` after the worker records each progress report."""
    original = jobs._Reporter.progress

    def progress(self, report, force=False):
        original(self, report, force)
        action(report)

    monkeypatch.setattr(jobs._Reporter, "progress", progress)


# ---------------------------------------------------------------- the queue

def test_submit_list_show_and_cancel_a_queued_job(home, photos):
    job = jobs.submit_finetune(home, None, [photos], **TINY)
    assert job["state"] == "queued" and job["user"] == "alice"
    assert job["params"] == {"images": [str(photos.resolve())], "epochs": 2, "device": "cpu", "nproc": 1,
                             "crop": 32, "batch_size": 4, "seed": 0}
    second = jobs.submit_finetune(home, "alice", [photos])
    assert second["params"]["epochs"] == finetune.DEFAULTS["cpu"]["epochs"]
    assert [j["id"] for j in jobs.list_jobs(home)] == [second["id"], job["id"]]
    assert [j["id"] for j in jobs.active_jobs(home, "alice")] == [job["id"], second["id"]]

    assert jobs.cancel_job(home, job["id"])["state"] == "cancelled"
    assert state(home, job["id"]) == "cancelled" and jobs.show_job(home, job["id"])["finished"]
    assert [j["id"] for j in jobs.active_jobs(home, "alice")] == [second["id"]]
    with pytest.raises(jobs.JobError, match="already cancelled"):
        jobs.cancel_job(home, job["id"])
    with pytest.raises(jobs.JobError, match="no job 99"):
        jobs.show_job(home, 99)


@pytest.mark.parametrize("images, options, problem", [
    (["missing"], {}, "missing: no such folder"),
    (["photos/p1.png"], {}, "is a file"),
    (["photos/nested"], {}, "4 JPEG or PNG photos; fine-tuning needs at least 10"),
    (["photos"], {"device": "tpu"}, "--device must be cpu or cuda"),
    (["photos"], {"epochs": 0}, "epochs must be a whole number of at least 1"),
    (["photos"], {"crop": 8}, "crop must be at least 16"),
    (["photos"], {"batch_size": 2, "nproc": 4}, "cannot be shared by 4 processes"),
])
def test_bad_requests_are_refused_with_the_reason(home, photos, images, options, problem):
    with pytest.raises(jobs.JobError, match=problem):
        jobs.submit_finetune(home, None, [photos.parent / name for name in images], **options)
    assert jobs.list_jobs(home) == []


def test_the_split_is_deterministic_and_holds_out_a_tenth(photos, tmp_path):
    paths = finetune.photo_files([photos])
    assert len(paths) == 12 and all(p.suffix in (".png", ".jpg") for p in paths)
    training_set, holdout = finetune.split(paths)
    assert len(holdout) == 1 and set(training_set) | set(holdout) == set(paths)
    # by content: the same photos, in another folder under other names, hold out the same one
    moved = tmp_path / "moved"
    moved.mkdir()
    for i, path in enumerate(reversed(paths)):
        (moved / f"x{i}{path.suffix}").write_bytes(path.read_bytes())
    assert finetune.split(finetune.photo_files([moved]))[1][0].read_bytes() == holdout[0].read_bytes()


def test_two_workers_never_claim_one_job_and_a_dead_workers_job_is_claimed_again(home, photos):
    job = jobs.submit_finetune(home, None, [photos], **TINY)
    job_id, lock = jobs.claim_job(home, "alice")
    assert job_id == job["id"] and state(home, job_id) == "running"
    assert jobs.claim_job(home, "alice") is None  # its lock is held: another worker skips it
    os.close(lock)  # the worker dies; the job is still marked running
    again = jobs.claim_job(home, "alice")
    assert again is not None and again[0] == job_id
    os.close(again[1])


# ---------------------------------------------------------------- running, the gate

FIGURES = {"asr": 0.5, "psnr_adv": 33.0, "psnr_rec": 50.0, "psnr_rec_wrong_key": 33.0, "ssim_adv": 0.97}


@pytest.mark.parametrize("better", [True, False], ids=["passes-the-gate", "fails-the-gate"])
def test_a_job_stores_the_new_model_encrypted_and_activates_it_only_through_the_gate(
        home, photos, monkeypatch, better, tmp_path):
    # the gate's inputs are fixed so that both outcomes are certain; training and storing are real
    measured = []

    def measure(model, holdout, device="cpu"):
        measured.append(model)
        default = len(measured) == 1
        return dict(FIGURES, asr=0.5 if default else (0.6 if better else 0.4))

    monkeypatch.setattr(finetune, "measure", measure)
    protected = protect_paths(home, None, PW, [SAMPLE], tmp_path / "before")[0]
    assert protected.ok

    job = jobs.submit_finetune(home, None, [photos], **TINY)
    assert jobs.run_worker(home, None, PW, once=True) == 1
    done = jobs.show_job(home, job["id"])
    assert done["state"] == "done" and done["error"] is None
    assert done["progress"]["epoch"] == 2 and set(done["progress"]["losses"]) >= {"L_G_adv", "L_R_mse", "L_A_mse"}
    result = done["result"]
    assert result["active"] is better and result["report"]["activate"] is better
    assert result["report"]["holdout_photos"] == 1 and result["report"]["training_photos"] == 11
    assert bool(result["report"]["reasons"]) is not better
    listing = {m["name"]: m for m in models.list_models(home)}
    stored = listing[result["model"]]
    assert stored["encrypted"] and stored["sha256"] == result["sha256"] and stored["active"] is better
    assert listing["default"]["active"] is not better
    assert stored["report"]["report"]["finetuned"]["asr"] == (0.6 if better else 0.4)
    # nothing in plaintext is left behind, and the photo protected before still recovers
    assert not jobs.work_dir(home, job["id"]).exists()
    recovered = recover_paths(home, [protected.output], tmp_path / "after", PW)[0]
    assert recovered.ok, recovered.error


def test_the_gate_needs_every_figure_and_a_useless_wrong_key():
    assert finetune.gate(FIGURES, FIGURES) == []
    worse = finetune.gate(FIGURES, dict(FIGURES, psnr_adv=32.9, psnr_rec=49.0))
    assert len(worse) == 2 and "psnr_adv" in worse[0] and "psnr_rec" in worse[1]
    leaky = finetune.gate(FIGURES, dict(FIGURES, psnr_rec_wrong_key=34.5))
    assert leaky and "wrong key recovers 34.50 dB" in leaky[0]


def test_cancelling_a_running_job_stops_it_at_the_next_step(home, photos, monkeypatch):
    job = jobs.submit_finetune(home, None, [photos], **TINY)
    on_progress(monkeypatch, lambda report: report.get("step") == 1 and jobs.cancel_job(home, job["id"]))
    epochs = trained_epochs(monkeypatch)
    assert jobs.run_worker(home, None, PW, once=True) == 1
    assert state(home, job["id"]) == "cancelled" and epochs == [1]
    assert jobs.show_job(home, job["id"])["result"] is None
    assert not jobs.work_dir(home, job["id"]).exists()
    assert [m["name"] for m in models.list_models(home)] == ["default"]


def test_sigterm_requeues_the_job_and_the_next_worker_resumes_from_its_checkpoint(home, photos, monkeypatch):
    job = jobs.submit_finetune(home, None, [photos], **TINY)
    # SIGTERM to this very process while epoch 2 runs (after epoch 1's checkpoint)
    on_progress(monkeypatch, lambda report: report.get("epoch") == 2 and os.kill(os.getpid(), signal.SIGTERM))
    epochs = trained_epochs(monkeypatch)
    assert jobs.run_worker(home, None, PW) == 0  # not `once`: the signal ends the worker
    assert state(home, job["id"]) == "queued" and epochs == [1, 2]
    assert (jobs.work_dir(home, job["id"]) / training.CHECKPOINT_NAME).exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    monkeypatch.undo()
    monkeypatch.setattr(jobs, "REPORT_EVERY", 0.0)
    epochs = trained_epochs(monkeypatch)
    assert jobs.run_worker(home, None, PW, once=True) == 1
    assert state(home, job["id"]) == "done" and epochs == [2]


def test_a_crashed_job_resumes_from_its_last_checkpoint(home, photos, monkeypatch):
    job = jobs.submit_finetune(home, None, [photos], **TINY)
    job_id, lock = jobs.claim_job(home, "alice")
    folder = jobs.work_dir(home, job_id)
    params = finetune.FinetuneParams.from_dict(job["params"])
    with pytest.raises(training.TrainingStopped):  # the process "dies" during epoch 2
        finetune.train_run(folder, params, on_progress=lambda report: None,
                           stop=lambda: (folder / training.CHECKPOINT_NAME).exists())
    os.close(lock)
    assert state(home, job_id) == "running"

    epochs = trained_epochs(monkeypatch)
    assert jobs.run_worker(home, None, PW, once=True) == 1
    assert state(home, job_id) == "done" and epochs == [2]


def test_a_failing_job_is_marked_failed_with_its_error(home, photos):
    job = jobs.submit_finetune(home, None, [photos], **TINY)
    for path in photos.glob("*.png"):
        path.write_bytes(b"no longer a photo")
    assert jobs.run_worker(home, None, PW, once=True) == 1
    failed = jobs.show_job(home, job["id"])
    assert failed["state"] == "failed" and "is not a readable photo" in failed["error"]
    assert not jobs.work_dir(home, job["id"]).exists()


def test_the_worker_refuses_a_wrong_passphrase_before_claiming(home, photos):
    jobs.submit_finetune(home, None, [photos], **TINY)
    with pytest.raises(USER_ERRORS):
        jobs.run_worker(home, None, "wrong", once=True)
    assert [j["state"] for j in jobs.list_jobs(home)] == ["queued"]


def test_a_worker_stopped_from_another_thread_leaves_queued_jobs_alone(home, photos):
    stop = threading.Event()
    stop.set()
    jobs.submit_finetune(home, None, [photos], **TINY)
    assert jobs.run_worker(home, None, PW, stop=stop) == 0
    assert [j["state"] for j in jobs.list_jobs(home)] == ["queued"]


# ---------------------------------------------------------------- the commands

def test_the_commands(home, photos, monkeypatch):
    monkeypatch.setattr(finetune, "measure", lambda model, holdout, device="cpu": dict(FIGURES))
    runner = CliRunner()
    env = {"AGENT_HOME": str(home), "AGENT_PASSPHRASE": PW}

    def agent(*args):
        return runner.invoke(app, list(map(str, args)), env=env)

    result = agent("models", "finetune", "--images", photos, "--epochs", 1)
    assert result.exit_code == 0, result.output
    job_id = int(result.stdout.strip())
    listed = json.loads(agent("jobs", "list", "--json").stdout)
    assert [(j["id"], j["state"]) for j in listed] == [(job_id, "queued")]
    assert "queued" in agent("jobs", "list").output
    result = agent("worker", "--once")
    assert result.exit_code == 0, result.output
    shown = agent("jobs", "show", job_id)
    assert shown.exit_code == 0 and "done" in shown.output and f"finetuned-job-{job_id}" in shown.output
    assert json.loads(agent("jobs", "show", job_id, "--json").stdout)["result"]["active"] is True
    for args, problem in ((("jobs", "cancel", job_id), "already done"),
                          (("jobs", "show", 42), "no job 42"),
                          (("models", "finetune", "--images", photos / "nested"), "at least 10"),
                          (("models", "finetune", "--images", photos, "--device", "cuda"), "no CUDA GPU")):
        result = agent(*args)
        assert result.exit_code == 2 and problem in result.output, result.output
    assert "worker: agent worker" in (Path(__file__).resolve().parent.parent / "Procfile").read_text()
