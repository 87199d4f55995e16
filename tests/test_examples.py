"""Every script in examples/ runs at its ``--tiny`` size and prints what it claims to show.

Each script runs in its own process, as a user would run it (``python examples/X.py --tiny
--out DIR``); the checks read its output and the files it wrote.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparseforge.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["prune_and_finetune.py", "rigl_training_loop.py", "convert_and_benchmark.py"]


def run_example(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        f"{script} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    )
    return proc.stdout


def test_every_example_is_tested():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = run_example(script, "--help")
    assert "--tiny" in out and "--out" in out


def test_prune_and_finetune(tmp_path):
    out = run_example("prune_and_finetune.py", "--tiny", "--out", str(tmp_path / "new" / "folder"))
    assert "zero_state='grads' (auto: exact for AdamW)" in out
    assert "pruned weights that are not exactly 0: 0\n" in out
    assert "sparsity over the pruned layers: 0.8000 (target 0.8000)" in out
    assert "reloaded weights and masks identical: True" in out
    dense, pruned, tuned = map(
        float, re.search(r"dense ([\d.]+) -> pruned ([\d.]+) -> fine-tuned ([\d.]+)", out).groups()
    )
    assert dense > 0.5 and tuned > 0.5 and 0.0 <= pruned <= 1.0  # 10 classes: chance is 0.1
    # the checkpoint, read back here without the script's model class
    weights, masks = read_checkpoint(tmp_path / "new" / "folder" / "digits_mlp_sparse.safetensors")
    assert sorted(masks.names()) == ["fc1.weight", "fc2.weight"]  # the classifier was excluded
    assert masks.nnz() == round(0.2 * masks.numel())
    assert all(int(torch.count_nonzero(weights[n][~m])) == 0 for n, m in masks.items())
    assert int(torch.count_nonzero(weights["classifier.weight"])) == weights["classifier.weight"].numel()


def test_rigl_training_loop(tmp_path):
    out = run_example("rigl_training_loop.py", "--tiny", "--out", str(tmp_path))
    assert "zero_state='grads' (auto: exact for SGD), algorithm=RigL, attached)" in out
    assert "algorithm=RigL, finalized)" in out
    epochs = re.findall(r"epoch +\d+: step +(\d+), (\d+) mask updates, +(\d+) weights moved, sparsity ([\d.]+)", out)
    assert len(epochs) == 3
    assert all(sparsity == "0.9000" for *_, sparsity in epochs)  # RigL moves weights, never changes the count
    assert sum(int(moved) for _, _, moved, _ in epochs) > 0 and sum(int(n) for _, n, _, _ in epochs) > 0
    assert "final sparsity 0.9000 (target 0.9000)" in out
    weights, masks = read_checkpoint(tmp_path / "mnist1d_rigl.safetensors")
    assert masks.step == int(epochs[-1][0]) and abs(masks.sparsity() - 0.9) < 1e-3
    assert all(int(torch.count_nonzero(weights[n][~m])) == 0 for n, m in masks.items())


def test_convert_and_benchmark(tmp_path):
    out = run_example("convert_and_benchmark.py", "--tiny", "--out", str(tmp_path))
    assert "sparseforge.convert:" in out  # the conversion report
    timings = re.findall(
        r"batch +(\d+): dense ([\d.e+-]+) ms, converted ([\d.e+-]+) ms -> measured speedup ([\d.]+)x: (.+) in this run",
        out,
    )
    assert [int(t[0]) for t in timings] == [1, 16]
    for _, dense, converted, ratio, verdict in timings:  # the claim is the measurement, nothing more
        assert float(ratio) == pytest.approx(float(dense) / float(converted), abs=0.006 + 0.002 * float(ratio))
        expected = "faster" if float(ratio) >= 1.1 else "slower" if float(ratio) <= 0.9 else "about the same"
        assert verdict.startswith(expected)
    if re.search(r"sparseforge\.convert: 0 of", out):  # no kernel won on this machine: nothing to save
        assert "nothing for save_converted to store" in out
        return
    assert (tmp_path / "linear_stack.sf.safetensors").stat().st_size > 0
    diff_dense = float(re.search(r"max abs diff converted vs dense: (\S+)", out).group(1))
    diff_loaded = float(re.search(r"max abs diff loaded vs converted: (\S+)", out).group(1))
    assert diff_dense < 1e-4 and diff_loaded < 1e-6
