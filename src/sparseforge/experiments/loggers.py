"""Optional experiment loggers (TensorBoard, MLflow) behind one small interface.

Loggers are an output of a sweep, not part of an experiment: they are chosen on the command line
(``sparseforge run --tensorboard DIR --mlflow URI``) or passed to
:func:`~sparseforge.experiments.runner.run_experiment`, so they never change a run's key. Each is
an optional extra (``pip install "sparseforge[loggers]"``); asking for one that is not installed
is a one-line error before any run starts.

A logger receives, per run: :meth:`Logger.start` (the run's key, label and flattened config),
:meth:`Logger.log` (one epoch's metrics, at the run's optimizer step) and :meth:`Logger.finish`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import SparseforgeError
from .config import flatten

__all__ = ["KINDS", "Logger", "LoggerSpec", "MLflowLogger", "TensorBoardLogger", "check_available", "open_loggers"]

#: Logger kinds and the module each needs.
KINDS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


class Logger(Protocol):
    def start(self, key: str, label: str, params: dict[str, Any]) -> None: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class LoggerSpec:
    """What to log to: ``kind`` (``tensorboard`` or ``mlflow``) and ``target`` (a folder / a tracking URI)."""

    kind: str
    target: str


def check_available(specs: list[LoggerSpec]) -> None:
    """Refuse unknown kinds and kinds whose package is not installed (before any run starts)."""
    for spec in specs:
        if spec.kind not in KINDS:
            raise SparseforgeError(f"logger {spec.kind!r} is not known; allowed: {', '.join(KINDS)}")
        try:
            importlib.import_module(KINDS[spec.kind])
        except ImportError:
            raise SparseforgeError(
                f"the {spec.kind} logger needs the {KINDS[spec.kind]} package; install it with: "
                "pip install 'sparseforge[loggers]'"
            ) from None
        if spec.kind == "tensorboard" and Path(spec.target).exists() and not Path(spec.target).is_dir():
            raise SparseforgeError(f"TensorBoard folder {spec.target!r} is a file; allowed: a folder")


class TensorBoardLogger:
    """One event folder per run, ``DIR/<label or key>``: scalars per epoch, the config as text."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._writer: Any = None

    def start(self, key: str, label: str, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self.folder / key))
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(flatten(params).items()))
        self._writer.add_text("run", f"{label}\n\n{text}")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MLflowLogger:
    """One MLflow run per sparseforge run (named by its label, tagged with its key) in experiment ``name``."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.uri, self.experiment = tracking_uri, experiment
        self._client: Any = None
        self._run_id: str | None = None

    def start(self, key: str, label: str, params: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        found = self._client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found is not None else self._client.create_experiment(self.experiment)
        run = self._client.create_run(experiment_id, run_name=label, tags={"sparseforge.key": key})
        self._run_id = run.info.run_id
        for name, value in sorted(flatten(params).items()):
            self._client.log_param(self._run_id, name, str(value)[:500])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self._client.log_metric(self._run_id, name, float(value), step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        if self._client is not None and self._run_id is not None:
            self._client.set_terminated(self._run_id)
            self._run_id = None


def open_loggers(specs: list[LoggerSpec], experiment: str) -> list[Logger]:
    """The loggers of ``specs`` for one run of ``experiment`` (checked with :func:`check_available`)."""
    check_available(specs)
    loggers: list[Logger] = []
    for spec in specs:
        if spec.kind == "tensorboard":
            loggers.append(TensorBoardLogger(spec.target))
        else:
            loggers.append(MLflowLogger(spec.target, experiment))
    return loggers
