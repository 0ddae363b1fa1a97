"""The files of a batch: what `agent protect` and `agent recover` are given (files, and folders
searched recursively) turned into one job per image, each with its output, or the reason it
cannot be done."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..images import FORMAT_SUFFIXES, IMAGE_SUFFIXES
from ..store import DatabaseLockedError
from .home import USER_ERRORS

# what a batch function reports after each file: (done, total, that file's result)
ProgressFn = Callable[[int, int, Any], None]
PROTECTED_TAG = ".protected"
RECOVERED_TAG = ".recovered"


@dataclass(frozen=True)
class Job:
    source: Path
    output: Path | None
    error: str | None = None


def walk(root: Path, skip: tuple[str, ...]) -> list[Path]:
    """Image files under `root`, recursively, in a stable order; hidden files and folders and
    files whose stem ends with a tag in `skip` are left out (so a second run does not protect the
    first run's outputs)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES \
                    and not path.stem.lower().endswith(skip):
                found.append(path)
    return found


def plan(paths: Iterable[Path], out_dir: Path | None, name_of: Callable[[Path], str],
          skip: tuple[str, ...]) -> list[Job]:
    """One job per file: explicit files as given, folders expanded; the output beside the input,
    or in `out_dir` (keeping a folder's sub-folders, so equal names cannot collide)."""
    jobs: list[Job] = []
    for given in paths:
        given = Path(given)
        if given.is_dir():
            files = walk(given, skip)
            if not files:
                jobs.append(Job(given, None, f"{given}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                                 "in this folder"))
            for path in files:
                where = path.parent if out_dir is None else Path(out_dir) / path.parent.relative_to(given)
                jobs.append(Job(path, where / name_of(path)))
        elif given.exists():
            where = given.parent if out_dir is None else Path(out_dir)
            jobs.append(Job(given, where / name_of(given)))
        else:
            jobs.append(Job(given, None, f"{given}: no such file or folder"))
    # an output must never be one of the batch's inputs, nor the output of another input
    inputs = {path_key(job.source) for job in jobs}
    taken: dict[str, Path] = {}
    checked = []
    for job in jobs:
        if job.error is None:
            key = path_key(job.output)
            if key in inputs:
                job = dataclasses.replace(job, error=f"{job.source}: its output {job.output} is one of the "
                                          "inputs; an original is never overwritten")
            elif key in taken:
                job = dataclasses.replace(job, error=f"{job.source}: its output {job.output} would also be "
                                          f"the output of {taken[key]}; write them into different folders (-o)")
            else:
                taken[key] = job.source
        checked.append(job)
    return checked


def path_key(path: Path) -> str:
    return os.path.normcase(os.path.abspath(path))


def output_name(path: Path, fmt: str, tag: str) -> str:
    """`path`'s name with `tag` before a suffix of format `fmt` (its own if it is one of them)."""
    suffix = path.suffix if path.suffix.lower() in FORMAT_SUFFIXES[fmt] else FORMAT_SUFFIXES[fmt][0]
    return f"{path.stem}{tag}{suffix}"


def run_jobs(jobs: list[Job], do: Callable[[Job], Any], failed: Callable[[Path, str], Any],
             on_progress: ProgressFn | None) -> list[Any]:
    """Each job's result: `do(job)`, or `failed(source, why)` for a job that could not be planned or
    raised an error the user can act on. A locked log stops the batch: every later file would fail
    the same way."""
    results: list[Any] = []
    for job in jobs:
        if job.error is not None:
            result = failed(job.source, job.error)
        else:
            try:
                result = do(job)
            except DatabaseLockedError:
                raise
            except USER_ERRORS as error:
                result = failed(job.source, str(error))
        results.append(result)
        if on_progress:
            on_progress(len(results), len(jobs), result)
    return results

