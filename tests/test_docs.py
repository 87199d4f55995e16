"""The documentation site builds with ``mkdocs build --strict`` and no warning.

Strict mode turns every warning into a failure: a broken link or anchor between pages, a page
missing from the navigation, a snippet file that does not exist, an API reference (``::: name``)
to a module that is gone, a docstring that documents a parameter the signature does not have.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires

ROOT = Path(__file__).resolve().parents[1]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


# Skipped on a machine without the docs extra; under CI=true that is a failure (conftest.requires).
pytestmark = requires(
    all(_installed(m) for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")),
    "the docs extra is not installed (pip install -e '.[docs]')",
)

#: Pages other files link to by path (README.md among them); moving one breaks those links.
LINKED_PAGES = [
    "index.md",
    "getting-started.md",
    "concepts.md",
    "guide/pruning.md",
    "guide/training.md",
    "guide/inference.md",
    "guide/cli.md",
    "guide/saving.md",
    "benchmarks.md",
    "design-notes.md",
    "changelog.md",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    return out, log


def test_site_builds_strict_without_warnings(site: tuple[Path, str]) -> None:
    _, log = site
    problems = [line for line in log.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert not problems, "\n".join(problems)


def test_linked_pages_exist_and_are_built(site: tuple[Path, str]) -> None:
    out, _ = site
    for page in LINKED_PAGES:
        assert (ROOT / "docs" / page).is_file(), f"docs/{page} is missing"
        built = out / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), f"docs/{page} was not built"


def test_included_files_are_rendered(site: tuple[Path, str]) -> None:
    """The changelog page includes CHANGELOG.md; the benchmarks page the measured tables."""
    out, _ = site
    changelog = (out / "changelog" / "index.html").read_text()
    first_heading = next(line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("#"))
    assert first_heading.lstrip("# ").strip() in changelog
    benchmarks = (out / "benchmarks" / "index.html").read_text()
    assert "busy / idle" in benchmarks and "sr-ste" in benchmarks  # from benchmarks/results/*.md
    assert "--8&lt;--" not in benchmarks and "--8<--" not in changelog  # no snippet left unexpanded


def test_readme_links_into_the_docs_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(((?:docs|examples)/[^)#\s]*)", readme)
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
