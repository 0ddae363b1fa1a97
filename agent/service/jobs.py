"""Background jobs: a queue of fine-tuning runs in the provenance database, and the worker that runs
them (`agent worker`, the Procfile's `worker`).

A job is a row of `jobs` (`store.JobRow`): its user, its state (queued → running → done,
failed or cancelled), when it was created, started and finished, its parameters (JSON,
`finetune.FinetuneParams`), its progress as last reported (epoch, step, running losses, images per
second, ETA) and its result (the model stored, with the quality report) or error.

**Claiming.** A job's work folder, `$AGENT_HOME/jobs/<id>/` (private, 0700), holds a `lock` file
that the worker running the job keeps locked (`fcntl.flock`) from before it claims the job until
after its last update. A worker claims the oldest job of its user that is queued, or marked
running while nobody holds its lock (its worker died: the kernel released the lock with the
process), by taking the lock first and then, in one write transaction, checking the state and
marking it running. Two workers therefore never run one job, and a crashed job is picked up
again by the next worker, which resumes it from the checkpoint of its last finished epoch.

**Stopping.** Cancellation (`cancel`) marks the job cancelled; its worker notices between two
training steps (it reads the state at most once a second) and stops. SIGTERM or SIGINT to the
worker stops the job the same way, puts it back in the queue with its checkpoint and ends the
worker; the next worker resumes it. The partial epoch is trained again on resume, from the same
batches (`rgan/train.py`).

**The result.** After training, `finetune.assess` measures the default and the new model on the
held-out photos; the new model is stored encrypted with the user's data key and registered
(`models.import_model`: file and row together, or neither), and only then, if it passed the gate,
activated (`models.use_model`). A failed gate leaves it stored and inactive, with its report; the
active model is never touched until the new one is complete. Images protected before keep
recovering with the model that protected them (records name it by SHA-256).

The work folder holds plaintext weights (the checkpoint) while the job runs, and is removed when
the job ends (done, failed or cancelled). Job rows are written without the home's lock
(`home.home_lock`), which a long `agent protect` batch may hold for minutes: SQLite's own
locking serialises them, and they touch nothing else.

With `nproc` > 1 the worker runs the training as `torchrun --standalone --nproc-per-node N -m
agent.finetune WORKDIR` (data parallel, `rgan/train.py`) and relays rank 0's progress and the stop
request through files in the work folder; it measures and stores the result itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select

from .. import finetune
from .. import store as db
from ..finetune import FinetuneError, FinetuneParams
from ..store import JobRow
from ..rgan.model import load_model, save_model
from . import models
from .home import DB_TIMEOUT, USER_ERRORS, AgentBusyError, ServiceError, database, logged_user, resolve_user, unlock

JOBS_DIR = "jobs"
LOCK_NAME = "lock"
LOG_NAME = "ranks.log"
ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled")
# how often a running job's progress is written and its state read (a step may take milliseconds)
REPORT_EVERY = 1.0
# how long storing the result waits for another agent process (an `agent protect` batch) to let go
# of the home before the job fails
STORE_PATIENCE = 600.0
MODEL_PREFIX = "finetuned-job-"


class JobError(ServiceError):
    """A job request the user can act on (unknown job, wrong state); the message says which."""


def jobs_dir(home: Path) -> Path:
    return Path(home) / JOBS_DIR


def work_dir(home: Path, job_id: int) -> Path:
    return jobs_dir(home) / str(job_id)


# ---------------------------------------------------------------- the queue

def submit_finetune(home: Path, user: str | None, images, *, epochs: int | None = None, device: str = "cpu",
                    nproc: int = 1, crop: int | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Queues a fine-tuning job for `user` on the photos in the folders `images`; returns it. The
    folders are checked now (they must hold enough photos), and read again when the job starts."""
    home = Path(home)
    user = resolve_user(home, user)
    try:
        params = FinetuneParams.make(images, epochs=epochs, device=device, nproc=nproc, crop=crop,
                                     batch_size=batch_size)
        finetune.check_device(params)
        finetune.photo_files(params.images)
    except FinetuneError as error:
        raise JobError(str(error)) from None
    with _write(home, "queueing a job") as session:
        row = JobRow(user_id=logged_user(session, user).id, state="queued", created=_now(),
                     params=json.dumps(params.to_dict(), sort_keys=True))
        session.add(row)
        session.flush()
        return _describe(row, user)


def list_jobs(home: Path, user: str | None = None) -> list[dict[str, Any]]:
    """Every job (of `user`, if given), newest first."""
    home = Path(home)
    with database(home) as factory, factory() as session:
        query = select(JobRow, db.UserRow.name).join(db.UserRow).order_by(JobRow.id.desc())
        if user is not None:
            query = query.where(db.UserRow.name == resolve_user(home, user))
        return [_describe(row, name) for row, name in session.execute(query)]


def show_job(home: Path, job_id: int) -> dict[str, Any]:
    with database(Path(home)) as factory, factory() as session:
        row, name = _job(session, job_id)
        return _describe(row, name)


def cancel_job(home: Path, job_id: int) -> dict[str, Any]:
    """Cancels a queued job at once, a running one at its worker's next step."""
    with _write(Path(home), "cancelling a job") as session:
        row, name = _job(session, job_id)
        if row.state in FINAL:
            raise JobError(f"job {job_id} is already {row.state}; only queued and running jobs can be cancelled")
        row.state, row.finished = "cancelled", _now()
        return _describe(row, name)


def active_jobs(home: Path, user: str) -> list[dict[str, Any]]:
    """The user's queued and running jobs with their progress, oldest first: what the local
    service's status shows. Empty for a home without a log or a user without jobs."""
    home = Path(home)
    if not db.database_path(home).exists():
        return []
    with database(home) as factory, factory() as session:
        rows = session.execute(select(JobRow).join(db.UserRow)
                               .where(db.UserRow.name == user, JobRow.state.in_(ACTIVE)).order_by(JobRow.id))
        return [{"id": row.id, "state": row.state, "created": row.created, "started": row.started,
                 "progress": _json(row.progress)} for (row,) in rows]


# ---------------------------------------------------------------- the worker

def run_worker(home: Path, user: str | None, passphrase: str, *, once: bool = False, poll: float = 2.0,
               on_event: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> int:
    """Runs the user's queued jobs one at a time until stopped (SIGTERM or SIGINT, or `stop`), or,
    with `once`, runs at most one job. Returns how many jobs it ran to an end (done, failed or
    cancelled). The passphrase is checked now: the results are stored encrypted with the user's
    data key."""
    home = Path(home)
    user = resolve_user(home, user)
    unlock(home, user, passphrase)
    say = on_event or (lambda message: None)
    stop = stop or threading.Event()
    finished = 0
    with _signals_set(stop):
        while not stop.is_set():
            _sweep(home)
            claimed = claim_job(home, user)
            if claimed is None:
                if once:
                    break
                stop.wait(poll)
                continue
            job_id, lock = claimed
            try:
                say(f"job {job_id}: started")
                state = _run(home, user, passphrase, job_id, stop)
            finally:
                os.close(lock)
            say(f"job {job_id}: {state}")
            finished += state in FINAL
            if once:
                break
    _sweep(home)
    return finished


@contextlib.contextmanager
def _signals_set(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` instead of killing the worker mid-step (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = lambda *_: stop.set()  # noqa: E731
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def claim_job(home: Path, user: str) -> tuple[int, int] | None:
    """(job id, the locked file descriptor of its lock) for the oldest job this worker may run."""
    with database(home) as factory, factory() as session:
        candidates = session.scalars(select(JobRow.id).join(db.UserRow).where(
            db.UserRow.name == user, JobRow.state.in_(ACTIVE)).order_by(JobRow.id)).all()
    for job_id in candidates:
        lock = _try_lock(home, job_id)
        if lock is None:
            continue  # a live worker runs it
        with _write(home, "claiming a job") as session:
            row = session.get(JobRow, job_id)
            if row is not None and row.state in ACTIVE:
                row.state, row.started = "running", row.started or _now()
                row.error = None
                return job_id, lock
        os.close(lock)
    return None


def _try_lock(home: Path, job_id: int) -> int | None:
    folder = work_dir(home, job_id)
    try:
        for parent in (jobs_dir(home), folder):
            parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        raise ServiceError(f"cannot open the lock of job {job_id} in {folder}: {error.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _sweep(home: Path) -> None:
    """Removes the work folders (plaintext checkpoints) of jobs that ended or no longer exist."""
    folder = jobs_dir(home)
    if not folder.is_dir():
        return
    with database(home) as factory, factory() as session:
        active = {str(i) for i in session.scalars(select(JobRow.id).where(JobRow.state.in_(ACTIVE)))}
    for child in folder.iterdir():
        if child.name not in active and child.is_dir():
            lock = _try_lock(home, int(child.name)) if child.name.isdigit() else None
            if lock is not None or not child.name.isdigit():
                shutil.rmtree(child, ignore_errors=True)
            if lock is not None:
                os.close(lock)


class _Reporter:
    """The running job's side of the database: progress written and the state read at most once
    a second each, so that a fast GPU step does not wait on SQLite."""

    def __init__(self, home: Path, job_id: int, stop: threading.Event):
        self.home, self.job_id, self.stop = home, job_id, stop
        self.last_write = self.last_read = 0.0
        self.is_cancelled = False
        self.latest: dict[str, Any] = {}

    def progress(self, progress: dict[str, Any], force: bool = False) -> None:
        """Records `progress` (a later phase keeps the training's last figures beside it)."""
        self.latest = {**self.latest, **progress}
        last_step = "step" in progress and progress["step"] == progress["steps"]
        if force or last_step or time.monotonic() - self.last_write >= REPORT_EVERY:
            self.last_write = time.monotonic()
            with _write(self.home, "reporting a job's progress") as session:
                session.get(JobRow, self.job_id).progress = json.dumps({**self.latest, "updated": _now()})

    def cancelled(self, fresh: bool = False) -> bool:
        if not self.is_cancelled and (fresh or time.monotonic() - self.last_read >= REPORT_EVERY):
            self.last_read = time.monotonic()
            with database(self.home) as factory, factory() as session:
                self.is_cancelled = session.scalar(select(JobRow.state).where(JobRow.id == self.job_id)) == "cancelled"
        return self.is_cancelled

    def should_stop(self) -> bool:
        return self.stop.is_set() or self.cancelled()


def _run(home: Path, user: str, passphrase: str, job_id: int, stop: threading.Event) -> str:
    """Runs one claimed job to an end or a stop; returns the state it is left in."""
    folder = work_dir(home, job_id)
    reporter = _Reporter(home, job_id, stop)
    with database(home) as factory, factory() as session:
        params = FinetuneParams.from_dict(json.loads(session.get(JobRow, job_id).params))
    try:
        finetune.check_device(params)
        device = "cuda" if params.device == "cuda" else "cpu"
        if params.nproc > 1:
            trained = _train_distributed(folder, params, reporter)
        else:
            try:
                finetune.train_run(folder, params, on_progress=reporter.progress, stop=reporter.should_stop)
                trained = True
            except finetune.TrainingStopped:
                trained = False
        if not trained or stop.is_set() or reporter.cancelled(fresh=True):
            if reporter.cancelled(fresh=True):
                return _finish(home, job_id, "cancelled")
            _requeue(home, job_id)
            return "queued"
        reporter.progress({"phase": "evaluating"}, force=True)
        model, extra = load_model(finetune.model_path(folder))
        report = finetune.assess(folder, model, device)
        reporter.progress({"phase": "storing"}, force=True)
        result = _store(home, user, passphrase, job_id, model, extra, report, stop)
        return _finish(home, job_id, "done", result=result)
    except (FinetuneError, *USER_ERRORS, FileNotFoundError) as error:
        return _finish(home, job_id, "failed", error=str(error))
    except Exception as error:  # a bug must fail the job, not kill the worker with the job marked running
        traceback.print_exc()
        return _finish(home, job_id, "failed", error=f"internal error: {type(error).__name__}: {error}")


def _train_distributed(folder: Path, params: FinetuneParams, reporter: _Reporter) -> bool:
    """Runs the training as a torchrun of `params.nproc` processes; True if it reached the end."""
    finetune.prepare(folder, params)
    model = finetune.model_path(folder)
    model.unlink(missing_ok=True)  # so that its presence afterwards means this run finished
    (folder / finetune.STOP_NAME).unlink(missing_ok=True)
    progress_file = folder / finetune.PROGRESS_NAME
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={params.nproc}",
               "-m", "agent.finetune", str(folder)]
    with open(folder / LOG_NAME, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        seen = None
        while process.poll() is None:
            time.sleep(0.2)
            if reporter.should_stop():
                (folder / finetune.STOP_NAME).touch()
            if progress_file.exists() and progress_file.stat().st_mtime != seen:
                seen = progress_file.stat().st_mtime
                with contextlib.suppress(ValueError, OSError):  # replaced atomically; a miss waits for the next
                    reporter.progress(json.loads(progress_file.read_text()))
    if model.exists():
        return True
    if (folder / finetune.STOP_NAME).exists():
        return False
    tail = (folder / LOG_NAME).read_text(errors="replace").strip().splitlines()[-5:]
    raise FinetuneError(f"the {params.nproc} training processes failed (exit {process.returncode}): "
                        + " | ".join(tail))


def _store(home: Path, user: str, passphrase: str, job_id: int, model, extra: dict, report: dict,
           stop: threading.Event) -> dict[str, Any]:
    """Stores the new model encrypted (file and row, or neither), then activates it if it passed."""
    folder = work_dir(home, job_id)
    path = folder / "finetuned.safetensors"
    after = report["finetuned"]
    # top-level figures are what `agent models list` summarises
    save_model(model, path, extra={**extra, "job": job_id, "report": report,
                                            **{name: after[name] for name in finetune.GATED}})
    name = f"{MODEL_PREFIX}{job_id}"
    deadline = time.monotonic() + STORE_PATIENCE
    while True:
        try:
            stored = models.import_model(home, user, passphrase, path, name)
            if report["activate"]:
                models.use_model(home, user, stored["sha256"])
            break
        except AgentBusyError:
            if time.monotonic() > deadline or stop.wait(2.0):
                raise
    return {"model": stored["name"], "sha256": stored["sha256"], "active": report["activate"], "report": report}


def _finish(home: Path, job_id: int, state: str, *, result: dict | None = None, error: str | None = None) -> str:
    with _write(home, "finishing a job") as session:
        row = session.get(JobRow, job_id)
        if row.state == "running":
            row.state, row.finished = state, _now()
        # a cancel that came while the model was being stored keeps its state; the model is there
        if result is not None:
            row.result = json.dumps(result, sort_keys=True)
        row.error = error
        return row.state


def _requeue(home: Path, job_id: int) -> None:
    with _write(home, "putting a job back in the queue") as session:
        row = session.get(JobRow, job_id)
        if row.state == "running":
            row.state = "queued"


# ---------------------------------------------------------------- helpers

@contextlib.contextmanager
def _write(home: Path, doing: str):
    """A session in a write transaction (the lock taken at BEGIN), committed on success."""
    with database(home) as factory:
        with db.translate_errors(doing, DB_TIMEOUT), factory.begin() as session:
            db.begin_write(session)
            yield session


def _job(session, job_id: int) -> tuple[JobRow, str]:
    found = session.execute(select(JobRow, db.UserRow.name).join(db.UserRow).where(JobRow.id == job_id)).first()
    if found is None:
        raise JobError(f"there is no job {job_id} (see `agent jobs list`)")
    return found[0], found[1]


def _json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _describe(row: JobRow, user: str) -> dict[str, Any]:
    return {"id": row.id, "user": user, "state": row.state, "created": row.created, "started": row.started,
            "finished": row.finished, "params": _json(row.params), "progress": _json(row.progress),
            "result": _json(row.result), "error": row.error}


def _now() -> str:
    return db.time_text(db.utc_now(), micro=False)
