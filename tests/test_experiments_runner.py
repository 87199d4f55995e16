"""The experiment runner: every algorithm of a config trains; a run killed with SIGKILL mid-epoch and
resumed from its checkpoint ends bitwise equal to one never interrupted; wrong checkpoints refused."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from sparseforge.errors import SparseforgeError
from sparseforge.experiments.config import expand, parse_config
from sparseforge.experiments.runner import build, load_checkpoint, lr_factor, run_experiment, sparse_init_
from sparseforge.experiments.store import ResultsStore

BASE = {
    "data": {"name": "mnist1d", "samples": 600},
    "model": {"name": "mlp", "width": 32},
    "training": {"epochs": 3, "batch_size": 64},
    "sparsity": {"target": 0.8},
    "algorithm": {"name": "rigl", "every": 5},
}


def _run(**changes):
    raw = {**BASE, **changes}
    runs = expand(parse_config(raw))
    assert len(runs) == 1
    return runs[0]


@pytest.mark.parametrize(
    "algorithm",
    ["dense", "static", {"name": "gmp", "every": 3}, {"name": "set", "every": 5}, {"name": "snfs", "every": 5},
     {"name": "srigl", "every": 5}, {"name": "granet", "every": 5}],
)  # fmt: skip
def test_every_algorithm_trains_to_its_target(algorithm):
    run = _run(algorithm=algorithm)
    summary = run_experiment(run)
    name = run.config.algorithm.name
    expected = 0.0 if name == "dense" else 0.8
    assert summary["sparsity"] == pytest.approx(expected, abs=0.02)
    assert summary["epochs"] == 3 and summary["steps"] == 3 * 8  # 480 training samples / 64
    assert 0.0 <= summary["accuracy"] <= 1.0 and math.isfinite(summary["train_loss"])
    assert summary["train_flops"] > 0
    if name in ("dense", "static"):
        assert summary["mask_change"] == 0.0
    elif name == "gmp":  # from all-ones masks: every pruned weight is a changed entry
        assert summary["mask_change"] == pytest.approx(summary["sparsity"], abs=1e-3)
    else:  # drop-and-grow moved some weights, far fewer than all
        assert 0.0 < summary["mask_change"] < 0.6


def test_training_flops_follow_the_kept_weights():
    dense = run_experiment(_run(algorithm="dense"))
    static = run_experiment(_run(algorithm="static"))
    # the MLP 40-32-32-10: 2 FLOPs per multiply-add, x3 for training, 480 samples x 3 epochs
    dense_forward = 2 * (40 * 32 + 32 * 32 + 32 * 10)
    assert dense["train_flops"] == pytest.approx(3 * dense_forward * 480 * 3)
    assert static["train_flops"] == pytest.approx(dense["train_flops"] * (1 - static["sparsity"]), rel=0.01)


def test_lr_schedules_by_hand():
    cosine = parse_config({"schedule": {"name": "cosine"}})
    assert lr_factor(0, 100, cosine) == 1.0 and lr_factor(50, 100, cosine) == pytest.approx(0.5)
    assert lr_factor(100, 100, cosine) == pytest.approx(0.0, abs=1e-12)
    warm = parse_config({"schedule": {"name": "constant", "warmup": 0.1}})
    assert [lr_factor(s, 100, warm) for s in (0, 4, 9, 10, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    step = parse_config({"schedule": {"name": "step", "milestones": [0.5, 0.75], "gamma": 0.1}})
    assert [lr_factor(s, 100, step) for s in (49, 50, 74, 75)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_sparse_init_gives_each_neuron_the_variance_of_its_sparse_fan_in():
    layer = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]))
    from sparseforge.masks import MaskState

    masks = MaskState({"weight": torch.tensor([[True, False, False, False], [True, True, True, True]])})
    masks.apply(layer)
    sparse_init_(layer, masks)
    # row 0 keeps 1 of 4 inputs: scaled by sqrt(4 / 1) = 2; row 1 keeps all: unchanged
    assert torch.equal(layer.weight, torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))


def test_sparse_init_option_changes_the_weights_not_the_masks():
    plain, scaled = build(_run().config, 0), build(_run(sparsity={"target": 0.8, "init": "sparse"}).config, 0)
    for (name, a), (_, b) in zip(plain.model.named_parameters(), scaled.model.named_parameters(), strict=True):
        if name.endswith("weight"):
            assert torch.equal(a != 0, b != 0)
            assert b.abs().sum() > a.abs().sum() * 1.5  # 80 % sparse: each row scaled by about sqrt(5)


CHILD = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    import sparseforge.experiments.runner as runner
    from sparseforge.experiments.config import expand, parse_config
    import json

    raw, checkpoint, marker, kill_at = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    calls = [0]
    original = runner.F.cross_entropy

    def counting(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:  # mid-epoch: tell the parent, then wait to be killed
            open(marker, "w").close()
            time.sleep(600)
        return original(*args, **kwargs)

    runner.F.cross_entropy = counting
    run = expand(parse_config(raw))[0]
    runner.run_experiment(run, checkpoint=checkpoint)
    """
)


def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(tmp_path):
    import json

    run = _run()
    reference_store = ResultsStore(tmp_path / "ref.sqlite")
    reference_store.add_runs([run])
    reference = run_experiment(run, store=reference_store)
    ref_setup_state = torch.load(_save_final(run, tmp_path / "ref.ckpt"), weights_only=True)

    checkpoint, marker = tmp_path / "run.ckpt", tmp_path / "killed-here"
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    kill_at = 8 + 3  # the 4th step of epoch 2 (8 steps per epoch)
    child = subprocess.Popen(
        [sys.executable, str(script), json.dumps(BASE), str(checkpoint), str(marker), str(kill_at)]
    )
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert child.poll() is None, "the child ended before reaching the kill point"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    state = load_checkpoint(checkpoint, run)
    assert state["epoch"] == 1 and state["step"] == 8  # the last complete epoch

    store = ResultsStore(tmp_path / "resumed.sqlite")
    store.add_runs([run])
    resumed = run_experiment(run, checkpoint=checkpoint, resume=True, store=store)
    final = torch.load(checkpoint, weights_only=True)
    for key, value in ref_setup_state["model"].items():
        assert torch.equal(value, final["model"][key]), key
    ref_masks, masks = ref_setup_state["sparsifier"]["masks"]["masks"], final["sparsifier"]["masks"]["masks"]
    assert ref_masks.keys() == masks.keys() and all(torch.equal(ref_masks[k], masks[k]) for k in masks)
    assert final["history"] == ref_setup_state["history"]
    for key in ("accuracy", "test_loss", "train_loss", "sparsity", "train_flops", "steps"):
        assert resumed[key] == reference[key], key
    assert store.metrics(run.key) == reference_store.metrics(run.key)
    assert store.runs()[0].status == "done"


def _save_final(run, path):
    """Run uninterrupted with a checkpoint, to compare final states (the checkpoint after the last epoch)."""
    run_experiment(run, checkpoint=path)
    return path


def test_a_checkpoint_of_another_config_is_refused_naming_the_keys(tmp_path):
    path = tmp_path / "a.ckpt"
    run_experiment(_run(training={"epochs": 1, "batch_size": 64}), checkpoint=path)
    other = _run(training={"epochs": 1, "batch_size": 32}, optimizer={"name": "sgd", "lr": 0.05})
    with pytest.raises(
        SparseforgeError, match=r"belongs to another config; keys that differ: optimizer.lr, training.batch_size"
    ):
        run_experiment(other, checkpoint=path)
    garbage = tmp_path / "junk.ckpt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(SparseforgeError, match="cannot be read"):
        run_experiment(other, checkpoint=garbage)
    # resume=False starts again and replaces the file
    summary = run_experiment(other, checkpoint=path, resume=False)
    assert load_checkpoint(path, other)["epoch"] == 1 and summary["epochs"] == 1


def _image_folder(root):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(8):
            pixels = (torch.rand(12, 12, 3, generator=generator) * 255).to(torch.uint8).numpy()
            if label == "dogs":
                pixels[:, :6] = 255  # something to learn
            Image.fromarray(pixels).save(root / label / f"{i}.png")


@pytest.mark.parametrize("model", ["lenet5", "resnet20", "vit"])
def test_image_models_train_on_a_folder_of_images(tmp_path, model):
    _image_folder(tmp_path / "images")
    raw = {
        "data": {"name": "folder", "root": str(tmp_path / "images"), "image_size": 16},
        "model": {"name": model, "width": 8},
        "training": {"epochs": 1, "batch_size": 4},
        "sparsity": {"target": 0.5},
        "algorithm": "static",
    }
    summary = run_experiment(expand(parse_config(raw))[0])
    assert summary["steps"] == 3  # 2 classes x 8 images, 2 of each held out: 12 for training, batches of 4
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.02) and 0.0 <= summary["accuracy"] <= 1.0


def test_local_data_needs_a_root_and_says_where_it_looked(tmp_path):
    with pytest.raises(SparseforgeError, match=r"data: data 'cifar10' is read from a local folder: set data.root"):
        parse_config({"data": "cifar10"})
    with pytest.raises(SparseforgeError, match=r"data.root applies to cifar10, cifar100, folder, not to 'mnist1d'"):
        parse_config({"data": {"name": "mnist1d", "root": "x"}})
    run = expand(parse_config({"data": {"name": "cifar10", "root": str(tmp_path / "nope")}}))[0]
    with pytest.raises(SparseforgeError, match="nope"):
        run_experiment(run)


@pytest.mark.parametrize(
    ("model", "kind"),
    [("mlp", "parallel"), ("mlp", "factorized"), ("mlp", "doped"), ("mlp", "wide"), ("cnn", "wide"), ("cnn", "doped")],
)
def test_a_sparse_ift_run_trains_at_the_dense_runs_flops(model, kind):
    from torch import nn

    from sparseforge.layers import SparseDoped, SparseFactorized, SparseParallel

    spec = {"name": model, "width": 16}
    sparse = _run(model={**spec, "sparse_ift": kind}, algorithm={"name": "rigl", "every": 4})
    setup = build(sparse.config, sparse.seed)
    layers = 3 if model == "mlp" else 4
    if kind == "wide":  # 16 x 1 / sqrt(1 - 0.8) = 35.8: every hidden width is 36, the layers stay plain
        widths = [m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in setup.model.modules()
                  if isinstance(m, (nn.Linear, nn.Conv1d))]  # fmt: skip
        assert widths == [36] * (layers - 1) + [10]
    else:
        expected = {"parallel": SparseParallel, "factorized": SparseFactorized, "doped": SparseDoped}[kind]
        assert sum(isinstance(m, expected) for m in setup.model.modules()) == layers  # every layer, head included
    # the optimizer holds the new layers' parameters, not the replaced ones
    held = {id(p) for group in setup.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in setup.model.parameters()}
    dense = _run(model=spec, algorithm="dense")
    got, reference = run_experiment(sparse), run_experiment(dense)
    assert got["train_flops"] == reference["train_flops"]  # iso-FLOP, counted from the masks every step
    assert math.isfinite(got["accuracy"])


def test_sparse_ift_is_refused_with_an_algorithm_that_moves_weights_between_layers():
    with pytest.raises(SparseforgeError, match=r"model.sparse_ift trains with algorithm static, set or rigl.*'snfs'"):
        _run(model={"name": "mlp", "sparse_ift": "parallel"}, algorithm="snfs")
    with pytest.raises(SparseforgeError, match=r"model.sparse_ift.kind"):
        _run(model={"name": "mlp", "sparse_ift": "wider"})
