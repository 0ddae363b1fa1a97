"""docs/benchmarks.md is shared by several bench scripts: rewriting one's section keeps the others."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("sections", Path(__file__).parents[1] / "bench" / "sections.py")
sections = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sections)


def test_each_script_rewrites_only_its_own_section(tmp_path):
    report = tmp_path / "benchmarks.md"
    sections.write_section(report, "quality", "## Quality\n\nold figures\n")
    sections.write_section(report, "serve", "## Serve\n\n| a |\n")
    sections.write_section(report, "quality", "## Quality\n\nnew figures\n")
    text = report.read_text()
    assert text.startswith("# Benchmarks")
    assert "new figures" in text and "old figures" not in text and "| a |" in text
    assert text.index("## Quality") < text.index("## Serve")  # a section keeps its place
    assert text.count("<!-- section quality") == 1
