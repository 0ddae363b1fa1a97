"""Protecting images: files of a batch (`agent protect`) and uploads held in memory (the local
service). Each is read and decoded once, protected by the pipeline with the user's active key and
model, encoded as the original was (format, quality, cleaned EXIF, ICC), and logged as one signed
record, committed before the output appears.

Outputs are `<stem>.protected<suffix>`. A protection killed between its record and its output
leaves a note in the home's `pending/` folder; the next protection of any batch finishes what it
left (`settle_pending`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import images, pipeline, selfcheck
from .. import store as db
from ..atomic import stale_temporaries, write_text
from ..keys import UserKeys
from ..pipeline import ProtectInfo, ProtectOptions
from ..recovery import seal_field
from . import models
from .batch import PROTECTED_TAG, RECOVERED_TAG, Job, ProgressFn, output_name, plan, run_jobs
from .home import ServiceError, check_output, crash_point, database, home_lock, output, resolve_user, unlock

PENDING_DIR = "pending"
MIN_JPEG_QUALITY = 90
# WebP and HEIC: their encoders' quality cannot be read back from a file
LOSSY_QUALITY = 95


@dataclass(frozen=True)
class ProtectResult:
    """One file of a `protect_paths` batch: its output and record, or why it failed."""

    source: Path
    output: Path | None = None
    error: str | None = None
    record_id: str | None = None
    format: str | None = None
    quality: int | None = None
    original_size: tuple[int, int] | None = None
    working_size: tuple[int, int] | None = None
    psnr: float | None = None
    exif_removed: tuple[str, ...] = ()
    # an earlier run (perhaps interrupted) had already protected it into `output` with this record
    skipped: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(source=str(self.source), output=None if self.output is None else str(self.output), ok=self.ok,
                   exif_removed=list(self.exif_removed))
        for name in ("original_size", "working_size"):
            out[name] = None if out[name] is None else list(out[name])
        return out


def protect_paths(home: Path, user: str | None, passphrase: str, paths: Sequence[Path],
                  out_dir: Path | None = None, options: ProtectOptions | None = None, *,
                  source: str = "cli", overwrite: bool = False,
                  on_progress: ProgressFn | None = None) -> list[ProtectResult]:
    """Protects every image in `paths` (files, and folders searched recursively for .jpg .jpeg
    .png .webp .heic .heif) with the user's active key and logs one signed record per file.

    Outputs are `<stem>.protected<suffix>` beside each input or in `out_dir`, in the input's
    format: JPEG at the original's estimated quality and at least 90 (4:4:4), PNG (8 or 16 bits),
    WebP (lossless stays lossless, else quality 95), HEIC (quality 95, 4:4:4); the pixels the right
    way up at the working resolution (`options.max_side`); the EXIF cleaned by `clean_exif`; the
    ICC profile kept. An existing output is refused unless `overwrite`; an original never written.
    An output that an earlier run of the same original made (its record says so) is skipped
    (`skipped`), and what a run killed before its rename left is finished first: running a batch
    again finishes it.

    Bad files do not stop the batch: each gets a `ProtectResult` with its error. Problems that
    concern the whole batch (wrong passphrase, unknown user, another agent process, a locked
    log) raise before or while it runs. `on_progress(done, total, result)` is called with
    (0, total, None) once the files are listed, then after each file.
    """
    home = Path(home)
    options = ProtectOptions() if options is None else options
    user = resolve_user(home, user)
    keys = unlock(home, user, passphrase)
    jobs = plan(paths, out_dir, lambda p: output_name(p, images.format_of_suffix(p) or "PNG", PROTECTED_TAG),
                 (PROTECTED_TAG, RECOVERED_TAG))
    if on_progress:
        on_progress(0, len(jobs), None)
    with home_lock(home), database(home, create=True) as factory:
        settle_pending(home, factory)
        with factory.begin() as session:
            model_row, model = models.active_model(session, home, keys)
        return run_jobs(jobs, lambda job: _protect_one(home, factory, keys, model_row, model, job, options, source,
                                                       overwrite),
                        lambda source_path, why: ProtectResult(source_path, error=why), on_progress)


def _protect_one(home: Path, factory, keys: UserKeys, model_row, model, job: Job, options: ProtectOptions, source: str,
                 overwrite: bool) -> ProtectResult:
    src = job.source
    data = images.read_bytes(src)
    crash_point("read")
    facts = images.inspect(src, data)
    dst = job.output
    if dst.suffix.lower() not in images.FORMAT_SUFFIXES[facts.format]:  # the suffix lied about the content
        dst = dst.with_name(output_name(src, facts.format, PROTECTED_TAG))
    finished = _finished_before(factory, keys, data, dst, options)
    if finished is not None:
        return ProtectResult(src, dst, None, finished.id, facts.format, None, finished.original_size,
                             finished.working_size, finished.psnr, skipped=True)
    check_output(src, dst, overwrite)
    done = _protect_data(keys, model_row, model, data, facts, str(src), options)
    # the record is committed before the output appears, so that no output is ever without its
    # record; a kill between the two leaves the output's temporary file, which the next run of the
    # same output renames (`_finished_before`)
    with pending(home, dst), output(dst, done.data, overwrite):
        crash_point("temp")
        with factory.begin() as session:
            record = done.record(session, keys, model_row, source, src.name)
        crash_point("commit")
    crash_point("rename")
    return ProtectResult(src, dst, None, record.id, facts.format, done.quality, done.info.original_size,
                         done.info.working_size, done.psnr, done.exif_removed)


def _records_of(factory, path: Path) -> list[db.Record]:
    with factory() as session:
        return db.find_by_sha256(session, hashlib.sha256(path.read_bytes()).hexdigest())


def _settle(factory, dst: Path) -> None:
    """Finishes or rolls back what a killed protection left at `dst`. The home's lock is held, so
    every temporary file of `dst` was left by a run that was killed: one whose bytes a record
    holds was committed and only its rename was lost, which is done now; any other is removed."""
    try:
        for tmp in stale_temporaries(dst):
            if not dst.exists() and _records_of(factory, tmp):
                os.replace(tmp, dst)
            else:
                tmp.unlink(missing_ok=True)
    except OSError as error:
        raise ServiceError(f"cannot finish what an interrupted run left at {dst}: {error.strerror or error}") from None


@contextlib.contextmanager
def pending(home: Path, dst: Path) -> Iterator[None]:
    """Notes `dst` in the home's pending folder for as long as its protection is under way, so
    that the next protection of any batch settles it (`_settle_pending`) if this one is killed."""
    folder = Path(home) / PENDING_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    note = folder / f"{secrets.token_hex(8)}.json"
    write_text(note, json.dumps({"output": str(Path(dst).absolute())}))
    try:
        yield
    finally:
        note.unlink(missing_ok=True)


def settle_pending(home: Path, factory) -> None:
    """Settles every output a killed protection left pending (the home's lock is held)."""
    folder = Path(home) / PENDING_DIR
    for note in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            dst = Path(json.loads(note.read_text())["output"])
        except (OSError, ValueError, KeyError, TypeError):
            dst = None  # a note torn by the kill itself: nothing was written after it
        if dst is not None:
            _settle(factory, dst)
        note.unlink(missing_ok=True)


def _finished_before(factory, keys: UserKeys, original: bytes, dst: Path, options: ProtectOptions) -> db.Record | None:
    """The record of an earlier run that protected `original` into `dst` for this user as
    `options` ask (the same working size and strength), or None."""
    _settle(factory, dst)
    if not dst.is_file():
        return None
    original_sha256 = hashlib.sha256(original).hexdigest()

    def asked(record: db.Record) -> bool:
        info = record.params.get("protect_info") or {}
        return (record.user == keys.user and record.original_sha256 == original_sha256
                and info.get("strength", pipeline.DEFAULT_STRENGTH) == options.strength
                and pipeline.working_size(*record.original_size, options.max_side) == tuple(record.working_size))

    return next((record for record in _records_of(factory, dst) if asked(record)), None)


@dataclass(frozen=True)
class _Protected:
    """An image protected and encoded in its original's format, with what its record holds."""

    original: bytes
    data: bytes
    info: ProtectInfo
    quality: int | None
    psnr: float
    self_check_asr: float | None
    exif_removed: tuple[str, ...]
    params: dict[str, Any]
    # of the protected pixels as a reader decodes them, already at hand: hashing `data` would decode it again
    phash: str

    def record(self, session, keys: UserKeys, model_row, source: str, file_name: str | None,
               site: str | None = None) -> db.Record:
        return db.record_protection(session, keys, original=self.original, protected=self.data, info=self.info,
                                      model=model_row, source=source, file_name=file_name, site=site,
                                      params=self.params, psnr=self.psnr, self_check_asr=self.self_check_asr,
                                      phash=self.phash)


def _protect_data(keys: UserKeys, model_row, model, data: bytes, facts: images.Source, name: str,
                  options: ProtectOptions) -> _Protected:
    """What files and uploads share: decode `data` (already `images.inspect`ed), protect it with the
    user's active key and model, encode it as the original was (format, quality, cleaned EXIF, ICC)."""
    pixels = images.decode_image(data, name)
    working = pipeline.working_copy(pixels, options)
    try:
        protected, info = pipeline.protect(working, keys.active_rgan_key.key, options, model,
                                           original_size=(pixels.shape[1], pixels.shape[0]))
    except (ValueError, FileNotFoundError) as error:
        raise ServiceError(str(error)) from None
    quality = max(MIN_JPEG_QUALITY, facts.quality or 0) if facts.format == "JPEG" else \
        None if facts.format == "PNG" or facts.lossless else LOSSY_QUALITY
    exif, removed = images.clean_exif(facts.exif, info.working_size)
    # a PNG carries the field it was protected with, so that it recovers exactly on any machine
    seal = seal_field(keys.active_rgan_key.key, info.applied_field) \
        if facts.format == "PNG" and info.applied_field is not None else None
    encoded = images.encode_image(protected, facts.format, quality=quality or LOSSY_QUALITY, lossless=facts.lossless,
                                  icc=facts.icc, exif=exif, field_seal=seal)
    lossless = facts.format == "PNG" or facts.lossless
    uploaded = protected if lossless else images.decoded_rgb(encoded)
    psnr = images.image_psnr(uploaded, working)
    check = selfcheck.measure(working, uploaded)
    params = {
        "format": facts.format,
        "quality": quality,
        "original_quality": facts.quality,
        "max_side": options.max_side,
        "strength": options.strength,
        "tile": options.tile,
        "overlap": options.overlap,
        "tile_above": options.tile_above,
        "model": model_row.name,
        "exif_removed": list(removed),
        "self_check": None if check is None else check.to_params(),
    }
    return _Protected(data, encoded, info, quality, psnr, None if check is None else check.asr, removed, params,
                      db.perceptual_hash(uploaded))


@dataclass(frozen=True)
class ProtectedImage:
    """What `protect_bytes` gives back: the protected file's bytes (in the original's format) and
    its record."""

    data: bytes
    format: str
    record_id: str
    quality: int | None
    original_size: tuple[int, int]
    working_size: tuple[int, int]
    psnr: float
    exif_removed: tuple[str, ...]


def protect_bytes(home: Path, keys: UserKeys, data: bytes, *, file_name: str | None = None,
                  site: str | None = None, options: ProtectOptions | None = None, source: str = "extension",
                  max_pixels: int = images.MAX_PIXELS, factory=None, prepare=None) -> ProtectedImage:
    """Protects one image held in memory (an upload the browser extension hands the local service)
    with the active key of the unlocked user `keys`, and logs its signed record (`file_name` and
    `site`, the page's origin, encrypted in it). Same format and metadata policy as `protect_paths`.

    Bad bytes raise an `ImageError` (`TooManyPixelsError` above `max_pixels`) before any model
    runs. The home's lock is held only while the record is appended, not during inference, so an
    `AgentBusyError` means another process is writing (a batch of `agent protect`). `factory`: the
    log's session factory of a caller that keeps it open (the service), instead of opening the log
    (and checking its migrations) for every image. `prepare`: what the caller runs the model on
    (`batching.Accelerator.prepare`: a GPU copy, micro-batched), given the user's model."""
    home = Path(home)
    options = ProtectOptions() if options is None else options
    name = file_name or "the upload"
    facts = images.inspect(name, data, max_pixels)
    with contextlib.nullcontext(factory) if factory is not None else database(home) as factory:
        with factory.begin() as session:
            model_row, model = models.active_model(session, home, keys)
        done = _protect_data(keys, model_row, prepare(model) if prepare else model, data, facts, name, options)
        with home_lock(home), factory.begin() as session:
            record = done.record(session, keys, model_row, source, file_name, site)
    return ProtectedImage(done.data, facts.format, record.id, done.quality, done.info.original_size,
                          done.info.working_size, done.psnr, done.exif_removed)
