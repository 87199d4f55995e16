"""The README's Python examples run as written (in a scratch folder, as one script, in order),
and no user-facing file speaks of sessions or issue numbers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_examples_run_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 3
    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(blocks))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "cnn90.safetensors").stat().st_size > 0 and (
        tmp_path / "mlp90.sf.safetensors"
    ).stat().st_size > 0
    assert "sparseforge.convert:" in out.stdout  # the report was printed


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_user_facing_text_speaks_of_the_project_only():
    """No session history or issue numbers in the README, the changelog, the docs, the examples or
    the docstrings (the API reference is generated from them)."""
    files = [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        *(ROOT / "docs").rglob("*.md"),
        *(ROOT / "examples").glob("*.py"),
        *(ROOT / "src").rglob("*.py"),
        *(ROOT / "benchmarks").glob("*.py"),  # docstrings become the API reference
    ]
    pattern = re.compile(r"\bsession\b|\bissue\s*#?\d+|\(issue|\b\d{2}:\d{2}-\d{2}:\d{2}\b", re.IGNORECASE)
    hits = [
        f"{f.relative_to(ROOT)}:{i + 1}: {line.strip()[:80]}"
        for f in files
        for i, line in enumerate(f.read_text().splitlines())
        if pattern.search(line)
    ]
    assert not hits, hits


def test_the_one_shot_guide_example_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "guide" / "oneshot.md").read_text(), re.S)
    assert blocks
    script = tmp_path / "oneshot_example.py"
    script.write_text("\n".join(blocks))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sparsity 0.500" in out.stdout and "relative output error" in out.stdout
