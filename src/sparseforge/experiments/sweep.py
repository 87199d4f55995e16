"""Sweeps: every run of a config on local worker processes or a Ray cluster, into one results store.

* Before any training, every run is built once (model, data, masks, algorithm): a setting that
  cannot work (an update interval longer than the run, a structure a layer cannot take) stops
  the sweep with one line before anything is written.
* Runs already ``done`` in the store are skipped. With ``resume=True`` an unfinished run
  continues from its last epoch checkpoint (``CHECKPOINTS/KEY.ckpt``, beside the store);
  without it, it starts again.
* ``backend="local"``: up to ``workers`` runs at once, each in its own process (started from a
  fork server that has torch imported), with ``threads`` torch threads each. A worker that dies
  (killed, out of memory) is retried once, from its checkpoint; a run that raises an error is
  marked ``failed`` with the message and not retried (it would fail again).
* ``backend="ray"``: one Ray task per run (``ray.init(address=...)``; a local Ray instance when no
  address is given), ``max_retries=1`` for dead workers. The store and checkpoint paths must be
  reachable from every node (a shared file system).

Progress (rich) shows the sweep and one bar per running run with its epochs and ETA; it is read
from the store, so it works the same for both backends.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SparseforgeError
from .config import Run
from .store import ResultsStore

__all__ = ["SweepResult", "checkpoint_path", "preflight", "run_sweep"]

BACKENDS = ("local", "ray")
#: Exit status of a worker that recorded its run as failed (an error, not a death: not retried).
_FAILED = 3


@dataclass
class SweepResult:
    """What a sweep did: run keys per outcome, and the deaths it retried."""

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    seconds: float = 0.0


def checkpoint_path(store: str | os.PathLike[str], key: str) -> Path:
    """Where a run's epoch checkpoint lives: ``<store folder>/checkpoints/<store name>/<key>.ckpt``."""
    store = Path(store)
    return store.parent / "checkpoints" / store.stem / f"{key}.ckpt"


def preflight(runs: Sequence[Run]) -> dict[str, Any]:
    """Build every distinct config once (its first seed): errors before any training.

    Each data set is built once; the generated ones (MNIST-1D, digits: seconds to make, small to
    send) are returned by :func:`~.runner.data_key` so that workers receive them instead of
    generating them again for every run. Data read from a folder is left to each worker.
    """
    from .datasets import LOCAL_DATASETS
    from .runner import build, data_key, load_data

    seen: set[str] = set()
    built: dict[str, Any] = {}
    for run in runs:
        text = run.config.model_dump_json()
        if text in seen:
            continue
        seen.add(text)
        key = data_key(run.config)
        try:
            if key not in built:
                built[key] = load_data(run.config)
            build(run.config, run.seed, built[key])
        except SparseforgeError as exc:
            raise SparseforgeError(f"run {run.label}: {exc}") from None
    return {k: d for k, d in built.items() if json.loads(k)["name"] not in LOCAL_DATASETS}


def _worker(
    run: Run,
    store_path: str,
    checkpoint: str,
    resume: bool,
    threads: int,
    loggers: tuple[Any, ...],
    data: Any | None = None,
) -> None:
    """One run in a worker process; exit status 3 when it recorded a failure."""
    import torch

    torch.set_num_threads(threads)
    from .loggers import open_loggers
    from .runner import run_experiment

    store = ResultsStore(store_path)
    try:
        opened = open_loggers(list(loggers), run.config.name)
        run_experiment(run, checkpoint=checkpoint, resume=resume, store=store, loggers=opened, data=data)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent says what was kept
        os._exit(130)
    except Exception as exc:  # noqa: BLE001  # recorded in the store with its message
        store.fail(run.key, f"{type(exc).__name__}: {exc}")
        os._exit(_FAILED)
    finally:
        store.close()


def _context() -> Any:
    """A fork server with torch imported: workers start in milliseconds and never inherit OpenMP state."""
    try:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "sparseforge.experiments.runner"])
        return ctx
    except ValueError:  # no fork server on this platform
        return multiprocessing.get_context("spawn")


def _local(
    todo: list[Run],
    store: ResultsStore,
    resume: bool,
    workers: int,
    threads: int,
    loggers: tuple[Any, ...],
    progress: Any,
    result: SweepResult,
    datasets: dict[str, Any],
) -> None:
    ctx = _context()
    queue = list(todo)
    attempts: dict[str, int] = {}
    running: dict[str, tuple[Any, Run]] = {}
    try:
        _drive(ctx, queue, attempts, running, store, resume, threads, loggers, progress, result, workers, datasets)
    finally:  # an interrupt (or any error) here: no worker is left running on its own
        for process, _ in running.values():
            if process.is_alive():
                process.terminate()
        for process, _ in running.values():
            process.join(10)


def _drive(
    ctx: Any,
    queue: list[Run],
    attempts: dict[str, int],
    running: dict[str, tuple[Any, Run]],
    store: ResultsStore,
    resume: bool,
    threads: int,
    loggers: tuple[Any, ...],
    progress: Any,
    result: SweepResult,
    workers: int,
    datasets: dict[str, Any],
) -> None:
    from .runner import data_key

    while queue or running:
        while queue and len(running) < workers:
            run = queue.pop(0)
            attempts[run.key] = attempts.get(run.key, 0) + 1
            retry = attempts[run.key] > 1
            process = ctx.Process(
                target=_worker,
                args=(
                    run,
                    str(store.path),
                    str(checkpoint_path(store.path, run.key)),
                    resume or retry,
                    threads,
                    loggers,
                    datasets.get(data_key(run.config)),
                ),
                name=f"sparseforge-run-{run.key}",
            )
            process.start()
            running[run.key] = (process, run)
        time.sleep(0.2)
        progress.update()
        for key, (process, run) in list(running.items()):
            if process.is_alive():
                continue
            process.join()
            del running[key]
            code = process.exitcode
            status = store.runs(keys=[key])[0].status
            if code == 0 and status == "done":
                result.done.append(key)
            elif code == _FAILED:
                result.failed.append(key)
            elif attempts[key] < 2:  # died: killed, out of memory, crashed; once more from the checkpoint
                result.retried.append(key)
                progress.note(f"run {run.label} died (exit status {code}); retrying it from its checkpoint")
                queue.insert(0, run)
            else:
                store.fail(key, f"worker died twice (last exit status {code})")
                result.failed.append(key)
            progress.update()


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) where nothing accepts a connection within
    ``timeout`` seconds, instead of letting Ray retry for minutes; ``auto`` and ``local`` pass."""
    text = address.removeprefix("ray://")
    host, _, port = text.rpartition(":")
    if text in ("auto", "local") or not host or not port.isdigit():
        if text in ("auto", "local"):
            return
        raise SparseforgeError(
            f"address={address!r} is not allowed; allowed: host:port or ray://host:port of a Ray cluster's head, or auto"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise SparseforgeError(
            f"the Ray cluster at {address!r} is not reachable ({why}); allowed: the address of a running cluster's "
            "head, or no address for a local Ray instance"
        ) from None


def _ray(
    todo: list[Run],
    store: ResultsStore,
    resume: bool,
    address: str | None,
    threads: int,
    logger_specs: tuple[Any, ...],
    progress: Any,
    result: SweepResult,
    datasets: dict[str, Any],
) -> None:
    try:
        import ray
    except ImportError:
        raise SparseforgeError("--backend ray needs Ray; install it with: pip install 'sparseforge[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as exc:  # noqa: BLE001  # connection problems are one line
            where = address or "a local instance"
            raise SparseforgeError(f"Ray could not start or connect to {where}: {str(exc).splitlines()[0]}") from None
    remote = ray.remote(num_cpus=threads, max_retries=1)(_ray_task)
    from .runner import data_key

    try:
        shared = {key: ray.put(data) for key, data in datasets.items()}  # one copy in Ray's object store
        pending = {
            remote.remote(
                run,
                str(store.path),
                str(checkpoint_path(store.path, run.key)),
                resume,
                threads,
                logger_specs,
                shared.get(data_key(run.config)),
            ): run
            for run in todo
        }
        while pending:
            ready, _ = ray.wait(list(pending), timeout=0.5)
            progress.update()
            for ref in ready:
                run = pending.pop(ref)
                try:
                    ok = ray.get(ref)
                except Exception as exc:  # noqa: BLE001  # a task that died twice
                    store.fail(run.key, f"Ray task died: {str(exc).splitlines()[0]}")
                    ok = False
                (result.done if ok else result.failed).append(run.key)
            progress.update()
    finally:
        if started_here:
            ray.shutdown()


def _ray_task(
    run: Run,
    store_path: str,
    checkpoint: str,
    resume: bool,
    threads: int,
    loggers: tuple[Any, ...],
    data: Any | None = None,
) -> bool:
    """A Ray task: one run; ``False`` when it recorded a failure. A retried task resumes from its checkpoint."""
    import torch

    torch.set_num_threads(threads)
    from .loggers import open_loggers
    from .runner import run_experiment

    store = ResultsStore(store_path)
    try:
        previous = store.runs(keys=[run.key])[0].attempts
        opened = open_loggers(list(loggers), run.config.name)
        run_experiment(
            run, checkpoint=checkpoint, resume=resume or previous > 0, store=store, loggers=opened, data=data
        )
        return True
    except Exception as exc:  # noqa: BLE001  # recorded in the store
        store.fail(run.key, f"{type(exc).__name__}: {exc}")
        return False
    finally:
        store.close()


class _Progress:
    """The sweep's bar and one bar per running run, read from the store; silent when disabled."""

    def __init__(self, enabled: bool, store: ResultsStore, todo: list[Run]) -> None:
        self.enabled, self.store, self.todo = enabled, store, {r.key: r for r in todo}
        self.bars: dict[str, Any] = {}
        self._progress: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._progress.__enter__()
            self.sweep = self._progress.add_task("sweep (runs)", total=len(self.todo))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def note(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)

    def update(self) -> None:
        if self._progress is None:
            return
        records = self.store.runs(keys=list(self.todo))
        finished = sum(r.status in ("done", "failed") for r in records)
        self._progress.update(self.sweep, completed=finished)
        for record in records:
            run = self.todo[record.key]
            bar = self.bars.get(record.key)
            if record.status == "running" and bar is None:
                epochs = run.config.training.total_epochs
                self.bars[record.key] = self._progress.add_task(f"  {run.label}", total=epochs)
            elif record.status in ("done", "failed") and bar is not None:
                self._progress.remove_task(bar)
                del self.bars[record.key]
            elif bar is not None:
                self._progress.update(bar, completed=len(self.store.metrics(record.key)))


def run_sweep(
    runs: Sequence[Run],
    store_path: str | os.PathLike[str],
    *,
    workers: int = 1,
    threads: int | None = None,
    backend: str = "local",
    address: str | None = None,
    resume: bool = False,
    progress: bool = True,
    check: bool = True,
    loggers: Sequence[Any] = (),
) -> SweepResult:
    """Run every run not yet done into the store at ``store_path``; returns what happened.

    Args:
        workers: runs at once (local backend).
        threads: torch threads per run; default ``cores // workers`` (at least 1). Results are
            bitwise reproducible for the same thread count.
        backend: ``local`` or ``ray``.
        address: the Ray cluster (``ray``); default a local Ray instance.
        resume: continue unfinished runs from their checkpoints.
        check: build every run before training (see :func:`preflight`).
        loggers: :class:`~.loggers.LoggerSpec` entries (TensorBoard folder, MLflow URI); each
            run opens its own loggers in its worker.
    """
    from ..errors import check_int

    workers = check_int(workers, "workers", 1)
    if workers > 256:
        raise SparseforgeError(f"workers={workers} is not allowed; allowed: 1 to 256")
    if backend not in BACKENDS:
        raise SparseforgeError(f"backend={backend!r} is not allowed; allowed: {', '.join(BACKENDS)}")
    if address is not None and backend != "ray":
        raise SparseforgeError(f"address={address!r} applies to backend ray only")
    if address is not None:
        check_ray_address(address)
    cores = os.cpu_count() or 1
    threads = check_int(threads, "threads", 1) if threads is not None else max(1, cores // workers)
    from .loggers import check_available

    specs = tuple(loggers)
    check_available(list(specs))
    started = time.perf_counter()
    datasets = preflight(runs) if check else {}  # before the store is even created
    store = ResultsStore(store_path)
    result = SweepResult()
    try:
        store.add_runs(runs)
        status = {r.key: r.status for r in store.runs(keys=[r.key for r in runs])}
        todo = [r for r in runs if status.get(r.key) != "done"]
        result.skipped = [r.key for r in runs if status.get(r.key) == "done"]
        if todo:
            (checkpoint_path(store.path, "x").parent).mkdir(parents=True, exist_ok=True)
        with _Progress(progress, store, todo) as bars:
            if not todo:
                pass
            elif backend == "local":
                _local(todo, store, resume, workers, threads, specs, bars, result, datasets)
            else:
                _ray(todo, store, resume, address, threads, specs, bars, result, datasets)
    finally:
        store.close()
    result.seconds = time.perf_counter() - started
    return result
