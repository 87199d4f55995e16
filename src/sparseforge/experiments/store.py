"""The results store: one SQLite file holding runs, their per-epoch metrics, resolved configs,
the code version and the machine.

Safe with many writer processes: the database is in WAL mode (readers never block the writer),
every connection waits up to ``timeout`` seconds for a lock (SQLite's busy timeout) and each
write transaction is retried with back-off until then; a store still locked after that is a
one-line :class:`~sparseforge.errors.SparseforgeError`. Runs are keyed by
:func:`~sparseforge.experiments.config.config_key` (the resolved settings and the seed), so adding
a run twice, or logging an epoch again after a resume, never duplicates a row.

A file that is not a sparseforge store, or fails SQLite's integrity check, is refused and left
exactly as it was: existing rows are never lost to a "repair".
"""

from __future__ import annotations

import json
import os
import platform
import random
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import SparseforgeError

__all__ = ["RunRecord", "ResultsStore", "STATUSES", "code_version", "machine_info"]

#: Written to the SQLite header (``PRAGMA application_id``): marks a file as a sparseforge store.
APPLICATION_ID = 0x53464F52  # "SFOR"
SCHEMA_VERSION = 1
#: The states of a run, in order.
STATUSES = ("pending", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    label TEXT NOT NULL,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    code_version TEXT,
    machine TEXT,
    summary TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_key TEXT NOT NULL REFERENCES runs(key),
    epoch INTEGER NOT NULL,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_key, epoch, name)
);
CREATE INDEX IF NOT EXISTS runs_by_experiment ON runs (experiment, status);
"""

T = TypeVar("T")


@dataclass(frozen=True)
class RunRecord:
    """One row of the ``runs`` table, decoded (``config``, ``machine`` and ``summary`` from JSON)."""

    key: str
    experiment: str
    label: str
    seed: int
    config: dict[str, Any]
    status: str
    attempts: int
    created: float
    started: float | None
    finished: float | None
    code_version: str | None
    machine: dict[str, Any] | None
    summary: dict[str, Any] | None
    error: str | None


def code_version() -> str:
    """``sparseforge X.Y.Z`` plus the git commit (and ``+dirty``) when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = f"sparseforge {version('sparseforge')}"
    except PackageNotFoundError:
        text = "sparseforge (not installed)"
    root = Path(__file__).resolve().parents[3]
    if (root / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            if commit:
                text += f" (git {commit}{'+dirty' if dirty else ''})"
        except (OSError, subprocess.SubprocessError):
            pass
    return text


def machine_info() -> dict[str, Any]:
    """The machine a run ran on: host, CPU, cores, Python, torch and its threads."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class ResultsStore:
    """A results store in one SQLite file (created when missing).

    Args:
        path: the ``.sqlite`` / ``.db`` file.
        timeout: seconds to wait for another process's lock before a write gives up.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 60.0) -> None:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 86400:
            raise SparseforgeError(f"timeout={timeout!r} is not allowed; allowed: seconds in (0, 86400]")
        self.path = Path(path)
        self.timeout = float(timeout)
        self._check_path()
        self._conn = self._open()

    # -- opening ------------------------------------------------------------------------------------

    def _check_path(self) -> None:
        where = f"results store {str(self.path)!r}"
        if self.path.is_dir():
            raise SparseforgeError(f"{where} is a directory; allowed: a file (e.g. results.sqlite)")
        if not self.path.exists():
            parent = self.path.parent
            if not parent.is_dir():
                raise SparseforgeError(f"{where}: folder {str(parent)!r} does not exist")
            if not os.access(parent, os.W_OK):
                raise SparseforgeError(f"{where}: folder {str(parent)!r} is not writable")

    def _open(self) -> sqlite3.Connection:
        where = f"results store {str(self.path)!r}"
        existed = self.path.exists() and self.path.stat().st_size > 0
        try:
            conn = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise SparseforgeError(f"{where} cannot be opened ({exc})") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            if existed:
                self._check_existing(conn, where)
            self._retry(lambda: self._create(conn, where), "create the tables")
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _identity(conn: sqlite3.Connection) -> tuple[int, int]:
        """``(application id, number of schema objects)``: ``(0, 0)`` is a database nobody has set up yet."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        objects = conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
        return int(app_id), int(objects)

    @staticmethod
    def _foreign(where: str, app_id: int) -> SparseforgeError:
        return SparseforgeError(
            f"{where} is a SQLite database but not a sparseforge results store (application id {app_id:#x}); "
            "it was left untouched; allowed: a store sparseforge created, or a new file name"
        )

    def _check_existing(self, conn: sqlite3.Connection, where: str) -> None:
        """Read-only checks of a file that existed: a SQLite database, ours (or still empty), intact."""
        try:  # another process may hold the lock (e.g. while it creates the tables): wait for it
            app_id, objects = self._retry(lambda: self._identity(conn), "open it")
        except sqlite3.DatabaseError as exc:
            raise SparseforgeError(
                f"{where} is not a SQLite database or is damaged ({exc}); it was left untouched"
            ) from None
        if app_id != APPLICATION_ID and (app_id != 0 or objects):
            raise self._foreign(where, app_id)
        try:
            check = self._retry(lambda: conn.execute("PRAGMA quick_check").fetchall(), "check the file")
        except sqlite3.DatabaseError as exc:
            raise SparseforgeError(f"{where} is damaged ({exc}); it was left untouched") from None
        problems = [row[0] for row in check if row[0] != "ok"]
        if problems:
            raise SparseforgeError(f"{where} is damaged ({problems[0]}); it was left untouched")
        version = self._retry(lambda: conn.execute("PRAGMA user_version").fetchone()[0], "open it")
        if version > SCHEMA_VERSION:
            raise SparseforgeError(
                f"{where} has schema version {version}, newer than this sparseforge's {SCHEMA_VERSION}; upgrade sparseforge"
            )

    def _create(self, conn: sqlite3.Connection, where: str) -> None:
        """Set up the tables once; under the write lock, so two processes creating one store agree."""
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            app_id, objects = self._identity(conn)
            if app_id != APPLICATION_ID:
                if objects:  # someone else's tables appeared since the read-only check
                    raise self._foreign(where, app_id)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------------

    def _retry(self, action: Callable[[], T], what: str) -> T:
        """Run ``action``, retrying with jittered back-off while another process holds the lock."""
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                return action()
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc):
                    raise SparseforgeError(f"results store {str(self.path)!r}: cannot {what} ({exc})") from None
                if time.monotonic() >= deadline:
                    raise SparseforgeError(
                        f"results store {str(self.path)!r} is locked by another process; waited {self.timeout:g} s "
                        f"to {what}"
                    ) from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _write(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        def attempt() -> T:
            with self._transaction() as conn:
                return fn(conn)

        return self._retry(attempt, what)

    def add_runs(self, runs: Iterable[Any], experiment: str | None = None) -> int:
        """Register runs (``Run`` objects of :func:`~.config.expand`) as pending; returns how many were new.

        A run whose key is already stored is left as it is (its status and metrics are kept).
        """
        rows = [
            (
                run.key,
                experiment or run.config.name,
                run.label,
                run.seed,
                json.dumps(run.config.model_dump(mode="json"), sort_keys=True),
                time.time(),
            )
            for run in runs
        ]

        def insert(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO runs (key, experiment, label, seed, config, created) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            return conn.total_changes - before

        return self._write("add runs", insert)

    def _require(self, conn: sqlite3.Connection, key: str) -> None:
        if conn.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone() is None:
            raise SparseforgeError(f"run {key!r} is not in results store {str(self.path)!r}; add it first")

    def start(self, key: str, *, machine: dict[str, Any] | None = None, version: str | None = None) -> int:
        """Mark a run as running (one more attempt); returns the attempt number."""

        def update(conn: sqlite3.Connection) -> int:
            self._require(conn, key)
            conn.execute(
                "UPDATE runs SET status = 'running', attempts = attempts + 1, started = ?, finished = NULL, "
                "error = NULL, machine = ?, code_version = ? WHERE key = ?",
                (time.time(), json.dumps(machine, sort_keys=True) if machine else None, version, key),
            )
            return int(conn.execute("SELECT attempts FROM runs WHERE key = ?", (key,)).fetchone()[0])

        return self._write("start a run", update)

    def log_epoch(self, key: str, epoch: int, step: int, metrics: dict[str, float | None]) -> None:
        """Store one epoch's metrics; logging the same epoch again (after a resume) replaces them."""
        rows = [
            (key, int(epoch), int(step), str(name), None if value is None else float(value))
            for name, value in metrics.items()
        ]

        def insert(conn: sqlite3.Connection) -> None:
            self._require(conn, key)
            conn.executemany(
                "INSERT INTO metrics (run_key, epoch, step, name, value) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (run_key, epoch, name) DO UPDATE SET step = excluded.step, value = excluded.value",
                rows,
            )

        self._write("log metrics", insert)

    def finish(self, key: str, summary: dict[str, Any]) -> None:
        """Mark a run as done with its final numbers (JSON-serialisable)."""
        text = json.dumps(summary, sort_keys=True)

        def update(conn: sqlite3.Connection) -> None:
            self._require(conn, key)
            conn.execute(
                "UPDATE runs SET status = 'done', finished = ?, summary = ?, error = NULL WHERE key = ?",
                (time.time(), text, key),
            )

        self._write("finish a run", update)

    def fail(self, key: str, error: str) -> None:
        """Mark a run as failed, with a one-line reason."""

        def update(conn: sqlite3.Connection) -> None:
            self._require(conn, key)
            conn.execute(
                "UPDATE runs SET status = 'failed', finished = ?, error = ? WHERE key = ?",
                (time.time(), error.splitlines()[0] if error else "", key),
            )

        self._write("mark a run failed", update)

    # -- reading ------------------------------------------------------------------------------------

    def runs(
        self, *, experiment: str | None = None, status: str | None = None, keys: Iterable[str] | None = None
    ) -> list[RunRecord]:
        """Stored runs, oldest first, filtered by experiment name, status and keys."""
        if status is not None and status not in STATUSES:
            raise SparseforgeError(f"status={status!r} is not allowed; allowed: {', '.join(STATUSES)}")
        clauses, params = [], []
        if experiment is not None:
            clauses.append("experiment = ?")
            params.append(experiment)
        if status is not None:
            clauses.append("status = ?")
            params.append(status)
        wanted = set(keys) if keys is not None else None
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._retry(
            lambda: self._conn.execute(f"SELECT * FROM runs{where} ORDER BY created, rowid", params).fetchall(),
            "read runs",
        )
        records = [self._record(row) for row in rows]
        return [r for r in records if wanted is None or r.key in wanted]

    @staticmethod
    def _record(row: tuple[Any, ...]) -> RunRecord:
        (
            key,
            experiment,
            label,
            seed,
            config,
            status,
            attempts,
            created,
            started,
            finished,
            version,
            machine,
            summary,
            error,
        ) = row
        return RunRecord(
            key,
            experiment,
            label,
            int(seed),
            json.loads(config),
            status,
            int(attempts),
            float(created),
            started,
            finished,
            version,
            json.loads(machine) if machine else None,
            json.loads(summary) if summary else None,
            error,
        )

    def metrics(self, key: str) -> dict[int, dict[str, float | None]]:
        """``{epoch: {name: value}}`` of one run, epochs in order (plus ``"step"``)."""
        rows = self._retry(
            lambda: self._conn.execute(
                "SELECT epoch, step, name, value FROM metrics WHERE run_key = ? ORDER BY epoch, name", (key,)
            ).fetchall(),
            "read metrics",
        )
        out: dict[int, dict[str, float | None]] = {}
        for epoch, step, name, value in rows:
            out.setdefault(int(epoch), {"step": float(step)})[name] = value
        return out

    def counts(self) -> dict[str, int]:
        """How many runs are in each status."""
        rows = self._retry(
            lambda: self._conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall(), "count runs"
        )
        found = dict(rows)
        return {s: int(found.get(s, 0)) for s in STATUSES}
