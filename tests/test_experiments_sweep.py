"""Sweeps: local worker processes and a local Ray instance fill one store with the same numbers as
in-process runs; a dead worker is retried once from its checkpoint; an error is recorded, not retried."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest

from conftest import requires
from sparseforge.errors import SparseforgeError
from sparseforge.experiments.config import expand, parse_config
from sparseforge.experiments.runner import run_experiment
from sparseforge.experiments.store import ResultsStore
from sparseforge.experiments.sweep import checkpoint_path, run_sweep

BASE = {
    "data": {"name": "mnist1d", "samples": 600},
    "model": {"name": "mlp", "width": 16},
    "training": {"epochs": 2, "batch_size": 64},
    "sparsity": {"target": 0.8},
}


def _runs(**changes):
    return expand(parse_config({**BASE, **changes}))


def _in_process(run):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_experiment(run)
    finally:
        torch.set_num_threads(threads)


def test_local_workers_fill_the_store_and_a_rerun_skips_done_runs(tmp_path):
    runs = _runs(seeds=[0, 1], grid={"algorithm": ["static", {"name": "rigl", "every": 5}]})
    store_path = tmp_path / "results.sqlite"
    result = run_sweep(runs, store_path, workers=2, threads=1, progress=False)
    assert sorted(result.done) == sorted(r.key for r in runs) and not result.failed and not result.retried
    with ResultsStore(store_path) as store:
        records = {r.key: r for r in store.runs()}
        assert all(r.status == "done" and r.attempts == 1 for r in records.values())
        expected = _in_process(runs[-1])  # the same run in this process, one thread: the same numbers
        assert records[runs[-1].key].summary["accuracy"] == expected["accuracy"]
        assert records[runs[-1].key].summary["train_loss"] == expected["train_loss"]
        assert len(store.metrics(runs[0].key)) == 2
    assert checkpoint_path(store_path, runs[0].key).exists()
    again = run_sweep(runs, store_path, workers=2, threads=1, progress=False)
    assert again.done == [] and sorted(again.skipped) == sorted(r.key for r in runs)


FACTORIES = textwrap.dedent(
    """
    import os, signal
    from pathlib import Path
    import torch

    MARKER = Path(__file__).with_name("died-once")

    class DiesOnce(torch.nn.Sequential):
        def forward(self, x):
            if not MARKER.exists() and self.training:
                MARKER.touch()
                os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-run, once
            return super().forward(x)

    class Broken(torch.nn.Sequential):
        def forward(self, x):
            if self.training:
                raise RuntimeError("this model cannot train")
            return super().forward(x)

    def dies_once():  # for MNIST-1D: 40 features, 10 classes
        return DiesOnce(torch.nn.Linear(40, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))

    def broken():
        return Broken(torch.nn.Linear(40, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    """
)


def test_a_dead_worker_is_retried_once_and_an_error_is_recorded(tmp_path):
    factories = tmp_path / "factories.py"
    factories.write_text(FACTORIES, encoding="utf-8")
    dies = _runs(model=f"{factories}:dies_once", algorithm="static")
    broken = _runs(model=f"{factories}:broken", algorithm="static")
    store_path = tmp_path / "results.sqlite"
    result = run_sweep(dies + broken, store_path, workers=2, threads=1, progress=False, check=False)
    assert result.retried == [dies[0].key] and result.done == [dies[0].key]
    assert result.failed == [broken[0].key]
    with ResultsStore(store_path) as store:
        died = store.runs(keys=[dies[0].key])[0]
        assert died.status == "done" and died.attempts == 2
        failed = store.runs(keys=[broken[0].key])[0]
        assert failed.status == "failed" and failed.attempts == 1
        assert failed.error == "RuntimeError: this model cannot train"


def test_settings_that_cannot_work_stop_the_sweep_before_anything_is_written(tmp_path):
    runs = _runs(algorithm={"name": "rigl", "every": 1000})  # 16 steps in all
    store_path = tmp_path / "results.sqlite"
    with pytest.raises(SparseforgeError, match=r"run seed=0: RigL with every=1000 .* never updates the masks"):
        run_sweep(runs, store_path, progress=False)
    assert not store_path.exists()
    for bad, message in [
        ({"workers": 0}, "workers=0"),
        ({"backend": "dask"}, "backend='dask' is not allowed"),
        ({"address": "ray://x:1"}, "applies to backend ray only"),
    ]:
        with pytest.raises(SparseforgeError, match=message):
            run_sweep(runs, store_path, progress=False, **bad)


HAVE_RAY = importlib.util.find_spec("ray") is not None


@requires(HAVE_RAY, "needs the [ray] extra")
def test_the_ray_backend_gives_the_local_numbers(tmp_path):
    runs = _runs(seeds=[0, 1], algorithm={"name": "set", "every": 5})
    local, ray = tmp_path / "local.sqlite", tmp_path / "ray.sqlite"
    run_sweep(runs, local, workers=2, threads=1, progress=False)
    result = run_sweep(runs, ray, backend="ray", threads=1, progress=False)
    assert sorted(result.done) == sorted(r.key for r in runs)
    with ResultsStore(local) as a, ResultsStore(ray) as b:
        for run in runs:
            assert a.runs(keys=[run.key])[0].summary["accuracy"] == b.runs(keys=[run.key])[0].summary["accuracy"]
            assert a.metrics(run.key) == b.metrics(run.key)


def test_ctrl_c_keeps_the_store_stops_the_workers_and_resume_finishes(tmp_path):
    """SIGINT to `sparseforge run` mid-sweep: status 130, one line naming the store, no worker left
    running; `--resume` then finishes every run."""
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "long.yaml"
    config.write_text(
        "data: {name: mnist1d, samples: 2000}\nmodel: {name: mlp, width: 128}\n"
        "training: {epochs: 150, batch_size: 32}\nseeds: [0, 1]\ngrid:\n  algorithm: [static, dense]\n",
        encoding="utf-8",
    )
    store = tmp_path / "r.sqlite"
    command = [sys.executable, "-c", "from sparseforge.cli import main; main()", "run", str(config)]
    command += ["--store", str(store), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a test worker may ignore SIGINT, and an ignored SIGINT is inherited: give the command the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until a run has logged an epoch (seconds before any ends)
        time.sleep(0.1)
        if store.exists():
            with ResultsStore(store) as opened:
                if any(opened.metrics(r.key) for r in opened.runs()):
                    break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"interrupted; kept (complete): {store}; nothing else was written"
    time.sleep(1)
    assert _holders(store) == []  # every worker held the store open: none is left running
    with ResultsStore(store) as opened:
        assert opened.counts()["done"] < 4
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    with ResultsStore(store) as opened:
        assert opened.counts()["done"] == 4


def _holders(path) -> list[int]:
    """Processes with ``path`` (or its SQLite WAL / shared-memory files) open, from ``/proc``."""
    import os

    names = {str(path), f"{path}-wal", f"{path}-shm"}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in names:
                    found.append(int(pid))
                    break
            except OSError:
                continue
    return found


def test_preflight_builds_each_generated_data_set_once_for_the_workers():
    import torch

    from sparseforge.experiments.runner import data_key
    from sparseforge.experiments.sweep import preflight

    runs = _runs(grid={"algorithm": ["static", "gmp"], "data.samples": [600, 700]}, seeds=[0, 1])
    shipped = preflight(runs)
    assert sorted(shipped) == sorted({data_key(r.config) for r in runs}) and len(shipped) == 2
    for run in runs:
        data = shipped[data_key(run.config)]
        assert len(data.y_train) + len(data.y_test) == run.config.data.samples
    fresh = _runs(data={"name": "mnist1d", "samples": 700})[0]
    from sparseforge.experiments.datasets import load_dataset

    again = load_dataset("mnist1d", seed=42, num_samples=700)
    assert torch.equal(shipped[data_key(fresh.config)].x_train, again.x_train)


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:1", r"Ray cluster at '127\.0\.0\.1:1' is not reachable"),
        ("ray://127.0.0.1:1", r"Ray cluster at 'ray://127\.0\.0\.1:1' is not reachable"),
        ("no-port", r"address='no-port' is not allowed"),
    ],
)
def test_an_unreachable_ray_address_is_refused_at_once(tmp_path, address, message):
    store_path = tmp_path / "results.sqlite"
    with pytest.raises(SparseforgeError, match=message):  # before Ray is even imported
        run_sweep(_runs(), store_path, backend="ray", address=address, progress=False)
    assert not store_path.exists()
