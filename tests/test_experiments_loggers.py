"""Optional loggers: TensorBoard event files and MLflow runs carry each epoch's metrics; a missing
package or an unknown kind is refused before any run starts."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import requires
from sparseforge.errors import SparseforgeError
from sparseforge.experiments.config import expand, parse_config
from sparseforge.experiments.loggers import LoggerSpec, MLflowLogger, TensorBoardLogger, check_available
from sparseforge.experiments.runner import run_experiment

RUN = {
    "name": "logged",
    "data": {"name": "mnist1d", "samples": 300},
    "model": {"name": "mlp", "width": 8},
    "training": {"epochs": 2, "batch_size": 64},
    "algorithm": "static",
}


def _run():
    return expand(parse_config(RUN))[0]


@requires(importlib.util.find_spec("tensorboard") is not None, "needs the [loggers] extra (tensorboard)")
def test_tensorboard_gets_every_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _run()
    summary = run_experiment(run, loggers=[TensorBoardLogger(tmp_path / "tb")])
    events = EventAccumulator(str(tmp_path / "tb" / run.key))
    events.Reload()
    accuracy = events.Scalars("accuracy")
    assert [e.step for e in accuracy] == [4, 8]  # 240 training samples / 64 = 4 steps per epoch
    assert accuracy[-1].value == pytest.approx(summary["accuracy"])
    assert {"train_loss", "sparsity", "mask_change", "train_flops", "lr"} <= set(events.Tags()["scalars"])


@requires(importlib.util.find_spec("mlflow") is not None, "needs the [loggers] extra (mlflow)")
def test_mlflow_gets_params_and_metrics(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local folder store, as in a quick test
    uri = (tmp_path / "mlruns").as_uri()
    run = _run()
    summary = run_experiment(run, loggers=[MLflowLogger(uri, "logged")])
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("logged")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.data.tags["sparseforge.key"] == run.key and found.info.status == "FINISHED"
    assert found.data.params["algorithm.name"] == "static" and found.data.params["training.epochs"] == "2"
    history = client.get_metric_history(found.info.run_id, "accuracy")
    assert [m.step for m in history] == [4, 8] and history[-1].value == pytest.approx(summary["accuracy"])


def test_unknown_or_missing_loggers_are_refused(monkeypatch):
    with pytest.raises(SparseforgeError, match="logger 'wandb' is not known; allowed: tensorboard, mlflow"):
        check_available([LoggerSpec("wandb", "x")])
    import sparseforge.experiments.loggers as loggers

    def missing(name):
        raise ImportError(name)

    monkeypatch.setattr(loggers.importlib, "import_module", missing)
    with pytest.raises(
        SparseforgeError, match=r"needs the mlflow package; install it with: pip install 'sparseforge\[loggers\]'"
    ):
        check_available([LoggerSpec("mlflow", "file:./mlruns")])
