"""docs/benchmarks.md gathers the figures of several bench scripts. Each script owns one section
of it, between markers, and rewrites only that section, so running one benchmark never drops
another's figures."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from agent.atomic import write_text

TITLE = "# Benchmarks\n\nEach section is written by the bench script it names; rerun that script to refresh it.\n"


def write_section(path: Path, name: str, text: str) -> None:
    begin, end = f"<!-- section {name}: written by bench/{name}.py -->", f"<!-- end of section {name} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = path.read_text() if path.exists() else TITLE
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    write_text(path, new)


def run_photo_bench(doc: str, name: str, results: Path, report_path: Path,
                    measure: Callable[[int | None], dict], report: Callable[[dict], str]) -> None:
    """The command line of a bench script measured on held-back photos: measure (all photos, or
    `--limit N` of them for a quick check that saves nothing), or `--report-only` from the saved
    JSON; a full run saves its JSON and rewrites its section `name` of `report_path`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="only the first N photos of each set (a quick check)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the saved JSON")
    args = parser.parse_args()
    if args.report_only:
        figures = json.loads(results.read_text())
    else:
        figures = measure(args.limit)
        if args.limit is None:
            write_text(results, json.dumps(figures, indent=2))
    text = report(figures)
    if args.limit is None or args.report_only:
        write_section(report_path, name, text)
    print(text)
