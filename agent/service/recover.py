"""Recovering protected images (`agent recover`): each file's record is found in the log (by the
exact hash of its bytes, else by perceptual hash for a platform's copy), verified, and recovery
runs with the key and model the record names. Outputs are `<stem>.recovered.png`, lossless, so
nothing recovery gave back is lost again."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import images, pipeline
from .. import store as db
from ..jpeg import Quantization
from ..keys import KeyStoreError, UserKeys
from ..pipeline import ProtectInfo
from ..store import ProvenanceError
from ..recovery import RecoveryData, open_field
from . import models
from .batch import PROTECTED_TAG, RECOVERED_TAG, Job, ProgressFn, plan, run_jobs
from .home import ServiceError, check_output, database, resolve_user, unlock, write_output


@dataclass(frozen=True)
class RecoverResult:
    """One file of a `recover_paths` batch. `matched_by`: sha256 (the protected file itself),
    phash (a look-alike: recompressed or resized copy; `distance` in bits), or user (no record;
    the given user's active key was tried)."""

    source: Path
    output: Path | None = None
    error: str | None = None
    record_id: str | None = None
    user: str | None = None
    matched_by: str | None = None
    distance: int | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(source=str(self.source), output=None if self.output is None else str(self.output), ok=self.ok)
        return out


def _recovered_name(path: Path) -> str:
    stem = path.stem
    if stem.lower().endswith(PROTECTED_TAG):
        stem = stem[:-len(PROTECTED_TAG)]
    return f"{stem}{RECOVERED_TAG}.png"


def recover_paths(home: Path, paths: Sequence[Path], out_dir: Path | None = None, passphrase: str = "",
                  user: str | None = None, *, overwrite: bool = False, force: bool = False,
                  on_progress: ProgressFn | None = None) -> list[RecoverResult]:
    """Recovers protected images into `<stem>.recovered.png` (beside each or in `out_dir`).

    Each image's record is found by the exact SHA-256 of its bytes, else by perceptual hash (a
    platform's recompressed or resized copy); recovery then uses that record's user, the RGAN key
    it was protected with (older keys survive rotation) and its `ProtectInfo`. `passphrase` unlocks
    whichever users' keys are needed. A record is used only if it verifies (its hash, its signature
    by the user's key, its place in the user's chain): an altered one is an error naming it. An
    image with no record is an error, unless `user` and `force` are given: then the user's active
    key is tried without the record's information. With `user`, an image whose record belongs to
    another user is an error. The result has the working resolution (what was protected).
    A JPEG at that resolution is recovered with its quantisation tables too (`agent/jpeg.py`).
    """
    home = Path(home)
    if user is not None:
        user = resolve_user(home, user)
    jobs = plan(paths, out_dir, _recovered_name, (RECOVERED_TAG,))
    if on_progress:
        on_progress(0, len(jobs), None)
    unlocked: dict[str, UserKeys | KeyStoreError] = {}

    def keys_of(name: str) -> UserKeys:
        if name not in unlocked:
            try:
                unlocked[name] = unlock(home, name, passphrase)
            except KeyStoreError as error:
                unlocked[name] = error
        found = unlocked[name]
        if isinstance(found, KeyStoreError):
            raise found
        return found

    with database(home) as factory:
        faults: dict[str, dict[str, str]] = {}

        def faults_of(name: str) -> dict[str, str]:
            # the batch writes no record, so each user's chain is verified once
            if name not in faults:
                with factory() as session:
                    faults[name] = db.record_faults(session, name, keys_of(name).public_key_bytes)
            return faults[name]

        return run_jobs(jobs, lambda job: _recover_one(home, factory, keys_of, faults_of, job, user, overwrite, force),
                        lambda source, why: RecoverResult(source, error=why), on_progress)


@dataclass(frozen=True)
class Match:
    record: db.Record | None
    matched_by: str | None
    distance: int | None
    original_of: db.Record | None = None


def find_record(session, data: bytes, path: Path, user: str | None = None) -> Match:
    """The record of an image: by exact SHA-256 of the protected file, else by perceptual hash;
    `original_of` when the bytes are an original that was protected (not a protected image).
    With `user`, that user's records come first, and another user's is still returned (the
    caller says whose it is rather than trying the wrong key)."""
    digest = hashlib.sha256(data).hexdigest()

    def theirs_first(records: list) -> list:
        return sorted(records, key=lambda record: user is not None and record.user != user)

    exact = theirs_first(db.find_by_sha256(session, digest))
    if exact:
        return Match(exact[0], "sha256", 0)
    originals = db.find_by_sha256(session, digest, original=True)
    if originals:
        return Match(None, None, None, originals[0])
    try:
        phash = db.perceptual_hash(data)
    except ProvenanceError:
        raise ServiceError(f"{path}: not an image the agent can read") from None
    hits = db.find_by_phash(session, phash)
    # nearest first; among equally near look-alikes, the user's own
    hits = sorted(hits, key=lambda hit: (hit[0], user is not None and hit[1].user != user))
    if hits:
        return Match(hits[0][1], "phash", hits[0][0])
    return Match(None, None, None)


def _recover_one(home: Path, factory, keys_of: Callable[[str], UserKeys], faults_of: Callable[[str], dict[str, str]],
                 job: Job, user: str | None, overwrite: bool, force: bool) -> RecoverResult:
    src, dst = job.source, job.output
    data = images.read_bytes(src)
    facts = images.inspect(src, data)
    check_output(src, dst, overwrite)
    with factory() as session:
        match = find_record(session, data, src, user)
    note = None
    if match.original_of is not None:
        record = match.original_of
        raise ServiceError(f"{src} is the original of record {record.id} (user {record.user!r}, {record.time}), "
                           "not a protected image: there is nothing to recover")
    pixels = images.decode_image(data, str(src))
    # the file's own block grid: what its rounding says about the original (gone if resized)
    tables = Quantization.read(data) if facts.format == "JPEG" else None
    if match.record is not None:
        record = match.record
        if user is not None and record.user != user:
            raise ServiceError(f"{src}: record {record.id} says user {record.user!r} protected this image, not "
                               f"{user!r}: {user!r}'s key would give a wrong image. Recover it as {record.user!r} "
                               "(or without --user)")
        keys = keys_of(record.user)
        fault = faults_of(record.user).get(record.id)
        if fault is not None:
            raise ServiceError(f"{src}: its record does not verify ({fault}): it was changed after it was "
                               "signed, and recovering by it could give a wrong image. Run `agent log verify`")
        with factory() as session:
            model = models.model_with_sha256(session, home, keys, record.model_sha256)
        key = keys.key_for(record.rgan_key_id)
        try:
            info = ProtectInfo.from_dict(record.params["protect_info"])
        except (KeyError, TypeError, ValueError) as error:
            raise ServiceError(f"record {record.id} holds no usable protect info ({error}); "
                               "run `agent log verify`") from None
        try:
            sealed = db.open_recovery(record, keys)
            recovery = None if sealed is None else RecoveryData.from_bytes(sealed)
        except (ProvenanceError, ValueError) as error:
            raise ServiceError(f"record {record.id}: {error}") from None
        # the protected pixels themselves can be undone exactly; any other pixels are a copy
        copy = match.matched_by != "sha256" or facts.format in ("JPEG", "HEIF") or \
            (facts.format == "WEBP" and not facts.lossless)
        width, height = pixels.shape[1], pixels.shape[0]
        if (width, height) != info.working_size:
            # a platform's resized copy: bring it back to the protected size; only approximate
            pixels = images.resize(pixels, *info.working_size)
            tables = None
            note = (f"the image is {width}×{height}, it was protected at {info.working_size[0]}×"
                    f"{info.working_size[1]}: resized back, the recovery is approximate")
        elif match.matched_by == "phash":
            note = f"a look-alike of the protected image (perceptual hash {match.distance} bits away)"
        owner, matched_by, distance, record_id = record.user, match.matched_by, match.distance, record.id
    elif user is not None and force:
        keys = keys_of(user)
        with factory.begin() as session:
            _, model = models.active_model(session, home, keys)
        key, info, recovery, copy = keys.active_rgan_key.key, None, None, None
        owner, matched_by, distance, record_id = user, "user", None, None
        note = (f"no record of this image: recovered with {user!r}'s active key, which is right only if "
                "that key protected it")
    else:
        raise ServiceError(f"{src}: no record of this image in the log (neither its exact bytes nor a "
                           "look-alike): it was not protected here, or it was cropped, rotated or filtered; "
                           "pass --user NAME --force to try that user's active key anyway (the result is "
                           "right only if that key protected it)")
    copy = copy or note is not None
    applied = None
    sealed = images.png_chunk(data, images.FIELD_CHUNK) if facts.format == "PNG" and matched_by != "phash" else None
    if sealed is not None:
        try:
            applied = open_field(key, sealed)
        except ValueError as error:
            note = "; ".join(filter(None, [note, f"{error}: the field was recomputed instead, which is exact only "
                                                 "on a machine whose arithmetic matches the one that protected"]))
    try:
        recovered = pipeline.recover(pixels, key, info, model, jpeg=tables, recovery=recovery,
                                     copy=copy, applied_field=applied)
    except ValueError as error:
        raise ServiceError(f"{src}: {error}") from None
    exif, _ = images.clean_exif(facts.exif, (recovered.shape[1], recovered.shape[0]))
    write_output(dst, images.encode_image(recovered, "PNG", icc=facts.icc, exif=exif), overwrite)
    return RecoverResult(src, dst, None, record_id, owner, matched_by, distance, note)
