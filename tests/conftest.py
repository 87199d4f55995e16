"""Shared test settings: one torch thread, a fast deadline-free hypothesis profile, and
:func:`requires` for tests that need an optional capability (numba kernels, a C compiler)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

pytest_plugins = ["pytester"]  # tests of requires() run a small pytest session in-process

torch.set_num_threads(1)

settings.register_profile(
    "sparseforge",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("sparseforge")
# A deeper, randomised search on demand: pytest --hypothesis-profile=thorough
settings.register_profile("thorough", deadline=None, max_examples=500, suppress_health_check=list(HealthCheck))

#: Marker name that :func:`requires` puts on a test whose capability is missing under ``CI=true``.
MISSING_IN_CI = "sparseforge_missing_in_ci"


def load_benchmark(name: str) -> Any:
    """The module ``benchmarks/<name>.py`` (benchmarks are scripts, not a package), loaded once."""
    import importlib.util
    import sys
    from pathlib import Path

    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def in_ci() -> bool:
    """Whether this run is CI (``CI=true``, as set by ``.ci/run`` and most CI services)."""
    return os.environ.get("CI") == "true"


def requires(condition: bool, reason: str) -> pytest.MarkDecorator:
    """Mark a test that needs ``condition`` (e.g. ``kernels_available()``) to be true.

    Normally a ``skipif(not condition, reason=reason)`` marker: a developer machine without
    numba or a C compiler skips the test. With ``CI=true`` (read when the marker is made, i.e.
    at collection) a missing capability is a failure instead, with ``reason`` as the message, so
    CI can never pass by silently skipping the kernel tests.
    """
    if not condition and in_ci():
        return getattr(pytest.mark, MISSING_IN_CI)(reason)
    return pytest.mark.skipif(not condition, reason=reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MISSING_IN_CI}(reason): set by requires() under CI=true; the test fails with the reason"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """Fail (not error, not skip) a test marked by :func:`requires` under CI, before its body runs."""
    marker = item.get_closest_marker(MISSING_IN_CI)
    if marker is not None:
        pytest.fail(f"CI=true and a required capability is missing: {marker.args[0]}", pytrace=False)


def older_cpu_library(tmp_path: Any, march: str) -> Any:
    """The C kernels built for ``march`` (say ``x86-64-v3``: no AVX-512) instead of this CPU: a
    compiler wrapper swaps ``-march=native`` for it. Skips off x86-64."""
    import platform
    import shutil

    from sparseforge.inference import native

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("an x86-64 target")
    cc = shutil.which("cc") or shutil.which("gcc")
    fake = tmp_path / f"cc-{march}"
    fake.write_text(
        f'#!/bin/sh\nfor a in "$@"; do shift; [ "$a" = "-march=native" ] && a="-march={march}"; set -- "$@" "$a"; done\nexec {cc} "$@"\n'
    )
    fake.chmod(0o755)
    return native.load_library(native.build_library(compiler=[str(fake)], directory=tmp_path / "cache"))


def stub_timing_rounds(monkeypatch: pytest.MonkeyPatch, round_fn: Any) -> None:
    """Replace the autotuner's timing rounds with ``round_fn(fns, reps) -> TimingRound``; the
    re-timing of close calls after a dense call then gives no evidence (zero times are ignored),
    so the stubbed rounds alone decide."""
    from sparseforge.inference import autotune

    monkeypatch.setattr(autotune, "_timing_round", round_fn)
    monkeypatch.setattr(autotune, "_times_after", lambda fns, reps, before: {k: [0.0] for k in fns})
