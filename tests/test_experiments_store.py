"""The SQLite results store: runs and metrics round-trip, no duplicates, many writer processes,
locked and damaged files refused without losing rows."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from sparseforge.errors import SparseforgeError
from sparseforge.experiments.config import expand, parse_config
from sparseforge.experiments.store import ResultsStore, code_version, machine_info


def _runs(n_seeds: int = 3, name: str = "exp"):
    config = parse_config(
        {"name": name, "algorithm": "rigl", "seeds": list(range(n_seeds)), "grid": {"sparsity.target": [0.8, 0.9]}}
    )
    return expand(config)


def test_runs_and_metrics_round_trip(tmp_path):
    runs = _runs()
    with ResultsStore(tmp_path / "r.sqlite") as store:
        assert store.add_runs(runs) == 6
        assert store.add_runs(runs) == 0  # the same keys again: nothing new
        assert store.counts() == {"pending": 6, "running": 0, "done": 0, "failed": 0}
        key = runs[0].key
        assert store.start(key, machine={"cpu": "x"}, version="v1") == 1
        store.log_epoch(key, 1, 10, {"train_loss": 2.0, "accuracy": 0.5})
        store.log_epoch(key, 2, 20, {"train_loss": 1.0, "accuracy": 0.7})
        store.log_epoch(key, 2, 20, {"train_loss": 0.9, "accuracy": 0.75})  # a resumed epoch replaces
        store.finish(key, {"accuracy": 0.75, "sparsity": 0.8})
        assert store.start(runs[1].key) == 1
        store.fail(runs[1].key, "worker died\nsecond line")
    with ResultsStore(tmp_path / "r.sqlite") as store:  # reopened: everything is still there
        assert store.metrics(key) == {
            1: {"step": 10.0, "train_loss": 2.0, "accuracy": 0.5},
            2: {"step": 20.0, "train_loss": 0.9, "accuracy": 0.75},
        }
        done = store.runs(status="done")
        assert [r.key for r in done] == [key]
        record = done[0]
        assert record.summary == {"accuracy": 0.75, "sparsity": 0.8} and record.machine == {"cpu": "x"}
        assert record.code_version == "v1" and record.attempts == 1 and record.seed == runs[0].seed
        assert record.config["sparsity"]["target"] == 0.8 and record.config["algorithm"]["name"] == "rigl"
        failed = store.runs(status="failed")
        assert failed[0].error == "worker died"
        assert len(store.runs(experiment="exp")) == 6 and store.runs(experiment="other") == []
        assert [r.key for r in store.runs(keys=[runs[2].key])] == [runs[2].key]
        with pytest.raises(SparseforgeError, match="status='finished' is not allowed"):
            store.runs(status="finished")
        with pytest.raises(SparseforgeError, match="is not in results store"):
            store.log_epoch("nope", 1, 1, {"a": 1.0})


def _writer(path: str, worker: int) -> None:
    """One process: adds every run (all workers add the same ones), then works on its share."""
    from sparseforge.experiments.config import expand, parse_config

    config = parse_config(
        {"name": "exp", "algorithm": "set", "seeds": list(range(12)), "grid": {"sparsity.target": [0.5, 0.9]}}
    )
    runs = expand(config)
    store = ResultsStore(path, timeout=120)
    store.add_runs(runs)
    for i, run in enumerate(runs):
        if i % 8 != worker:
            continue
        store.start(run.key)
        for epoch in range(1, 6):
            store.log_epoch(run.key, epoch, epoch * 10, {"loss": 1.0 / epoch, "worker": float(worker)})
        store.finish(run.key, {"worker": worker})
    store.close()


def test_eight_writer_processes_lose_and_duplicate_nothing(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    ctx = multiprocessing.get_context("fork")  # each child opens its own connection after the fork
    procs = [ctx.Process(target=_writer, args=(path, w)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * 8
    with ResultsStore(path) as store:
        records = store.runs()
        assert len(records) == 24 and len({r.key for r in records}) == 24
        assert all(r.status == "done" and r.attempts == 1 for r in records)
        for i, r in enumerate(records):
            assert r.summary == {"worker": i % 8}
            metrics = store.metrics(r.key)
            assert sorted(metrics) == [1, 2, 3, 4, 5] and metrics[5]["loss"] == pytest.approx(0.2)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 24 * 5 * 2
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_a_locked_store_waits_then_says_so(tmp_path):
    path = tmp_path / "locked.sqlite"
    ResultsStore(path).close()
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(SparseforgeError, match=r"is locked by another process; waited 0.3 s"):
            ResultsStore(path, timeout=0.3)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with ResultsStore(path, timeout=0.3) as store:  # free again: opens
        assert store.counts()["pending"] == 0


def test_a_write_waits_for_a_short_lock(tmp_path):
    path = tmp_path / "busy.sqlite"
    store = ResultsStore(path, timeout=5)
    runs = _runs(1)
    holder = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    import threading

    timer = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    timer.start()
    try:
        assert store.add_runs(runs) == 2  # waited for the other writer, then wrote
    finally:
        timer.join()
        holder.close()
        store.close()


def test_damaged_or_foreign_files_are_refused_and_left_untouched(tmp_path):
    good = tmp_path / "good.sqlite"
    with ResultsStore(good) as store:
        store.add_runs(_runs())
    data = bytearray(good.read_bytes())
    # a file of garbage
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SparseforgeError, match="not a SQLite database or is damaged.*left untouched"):
        ResultsStore(junk)
    assert junk.read_bytes() == b"this is not a database" * 100
    # a damaged page inside a real store
    damaged = tmp_path / "damaged.sqlite"
    broken = bytearray(data)
    page = 4096
    broken[page : page + 16] = b"\xff" * 16  # the b-tree header of page 2: an invalid page type
    damaged.write_bytes(bytes(broken))
    with pytest.raises(SparseforgeError, match="damaged|not a SQLite"):
        ResultsStore(damaged)
    assert damaged.read_bytes() == bytes(broken)
    # another application's database
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(str(other))
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    conn.close()
    before = other.read_bytes()
    with pytest.raises(SparseforgeError, match="not a sparseforge results store"):
        ResultsStore(other)
    assert other.read_bytes() == before


def test_bad_paths_and_arguments(tmp_path):
    with pytest.raises(SparseforgeError, match="is a directory"):
        ResultsStore(tmp_path)
    with pytest.raises(SparseforgeError, match="does not exist"):
        ResultsStore(tmp_path / "no" / "r.sqlite")
    with pytest.raises(SparseforgeError, match="timeout=0 is not allowed"):
        ResultsStore(tmp_path / "r.sqlite", timeout=0)


def test_provenance_helpers():
    assert code_version().startswith("sparseforge ")
    info = machine_info()
    assert info["cores"] >= 1 and info["torch"] and info["python"].count(".") == 2
