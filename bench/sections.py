"""docs/benchmarks.md gathers the figures of several bench scripts. Each script owns one section
of it, between markers, and rewrites only that section, so running one benchmark never drops
another's figures."""

from __future__ import annotations

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
