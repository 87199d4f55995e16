"""The standard-library decoder LM: trains offline, learns, saves a normal transformer folder, prunes."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from sparseforge.errors import SparseforgeError  # noqa: E402
from sparseforge.experiments import stdlib_lm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model trained once, in memory and saved."""
    trained = stdlib_lm.build("tiny", seed=0)
    folder = stdlib_lm.save(trained, tmp_path_factory.mktemp("lm") / "tiny")
    return trained, folder


def test_tiny_model_learns(tiny):
    trained, _ = tiny
    size = stdlib_lm.SIZES["tiny"]
    ppl, windows = stdlib_lm.heldout_perplexity(trained.model, trained.heldout_ids, size.seqlen)
    untrained = stdlib_lm.new_model(trained.model.config, seed=0).eval()
    ppl0, _ = stdlib_lm.heldout_perplexity(untrained, trained.heldout_ids, size.seqlen)
    assert windows == 64
    assert ppl < size.vocab / 4, ppl
    assert ppl < ppl0 / 4, (ppl, ppl0)
    assert ppl0 > size.vocab / 2  # an untrained model is close to uniform over the vocabulary
    assert math.isclose(trained.info["heldout_perplexity"], ppl, rel_tol=1e-9)


def test_saved_folder_loads_and_gives_the_same_logits(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparseforge.oneshot.io import load_transformer

    trained, folder = tiny
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "heldout.txt", "calibration.txt"} <= names
    assert stdlib_lm.INFO_FILE in names and not any(".sftmp-" in p.name for p in folder.parent.iterdir())
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "def add(a, b):\n    return a + b\n"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == trained.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].tolist()
    assert tokenizer.decode(ids[0]) == text
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, trained.model(input_ids=ids).logits)
        loaded, _, kind = load_transformer(folder)
        assert kind == "decoder"
        assert torch.equal(loaded(input_ids=ids).logits, trained.model(input_ids=ids).logits)


def test_training_is_deterministic_with_a_seed():
    data = stdlib_lm.corpus(60_000, 10_000)
    tok_a = stdlib_lm.train_tokenizer(data.train_texts, 400)
    tok_b = stdlib_lm.train_tokenizer(data.train_texts, 400)
    assert tok_a.backend_tokenizer.to_str() == tok_b.backend_tokenizer.to_str()
    ids = stdlib_lm.encode_files(tok_a, data.train_texts)
    config = stdlib_lm.config_for("tiny", len(tok_a))
    states = []
    for seed in (3, 3, 4):
        model = stdlib_lm.new_model(config, seed)
        stdlib_lm.fit(model, ids, steps=6, batch=4, seqlen=32, lr=3e-3, seed=seed)
        states.append(model.state_dict())
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
    assert any(not torch.equal(value, states[2][name]) for name, value in states[0].items())


def test_train_and_heldout_files_are_disjoint(tiny):
    trained, folder = tiny
    info = json.loads((folder / stdlib_lm.INFO_FILE).read_text(encoding="utf-8"))
    train_files, heldout_files = set(info["train_files"]), set(info["heldout_files"])
    assert train_files and heldout_files and not train_files & heldout_files
    assert all(stdlib_lm.is_heldout(f) for f in heldout_files)
    assert not any(stdlib_lm.is_heldout(f) for f in train_files)
    heldout_text = (folder / stdlib_lm.HELDOUT_FILE).read_text(encoding="utf-8")
    calibration_text = (folder / stdlib_lm.CALIBRATION_FILE).read_text(encoding="utf-8")
    for text in trained.data.heldout_texts:
        assert text.rstrip("\n") in heldout_text and text.rstrip("\n") not in calibration_text
    assert trained.data.train_texts[0].rstrip("\n") in calibration_text


def test_one_shot_prunes_the_tiny_model_to_the_exact_sparsity(tiny):
    from sparseforge.oneshot import prune_model
    from sparseforge.oneshot.io import calibration_ids, load_transformer

    _, folder = tiny
    for method, sparsity, structure in (("wanda", 0.5, "unstructured"), ("sparsegpt", None, "2:4")):
        model, tokenizer, _ = load_transformer(folder)
        ids = calibration_ids(tokenizer, folder / stdlib_lm.CALIBRATION_FILE, 8, 64, seed=1)
        report = prune_model(model, ids, method=method, sparsity=sparsity, structure=structure, progress=False)
        assert len(report.layers) == 2 * 7  # q, k, v, o, gate, up, down per block
        params = dict(model.named_parameters())
        for layer in report.layers:
            name = layer.name
            weight = params[name]
            assert (weight == 0).sum().item() == weight.numel() // 2, name
            if structure == "2:4":
                assert ((weight.reshape(-1, 4) != 0).sum(1) == 2).all(), name
        assert (model.lm_head.weight != 0).all()


def _cli(*args: object) -> int:
    from sparseforge.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_llm_cli_prunes_and_evaluates_the_tiny_model(tiny, tmp_path, capsys):
    _, folder = tiny
    out = tmp_path / "pruned"
    common = ["--seqlen", "64", "--samples", "8"]
    assert _cli("llm", "prune", folder, "--calibration", folder / "calibration.txt", "--out", out, *common) == 0
    report = tmp_path / "eval.json"
    text = folder / "heldout.txt"
    assert _cli("llm", "eval", out, "--text", text, "--reference", folder, "--json", report, *common) == 0
    scores = json.loads(report.read_text())
    assert scores["kind"] == "decoder"
    assert scores["perplexity"] > scores["reference"]["perplexity"] > 1.0


@functools.cache
def _bench():
    spec = importlib.util.spec_from_file_location("bench_decoder", ROOT / "benchmarks" / "bench_decoder.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_decoder"] = module
    spec.loader.exec_module(module)
    return module


def test_bench_decoder_quick_writes_a_well_formed_table(tiny, tmp_path, capsys):
    from sparseforge.oneshot.evaluate import perplexity
    from sparseforge.oneshot.io import load_transformer, text_windows

    _, folder = tiny
    bench = _bench()
    args = ["--quick", "--model-dir", str(folder), "--out-dir", str(tmp_path), "--windows", "4"]
    result = bench.main(args)
    methods = list(bench.METHODS)
    assert result["settings"]["seqlen"] == stdlib_lm.SIZES["tiny"].seqlen
    assert list(result["cells"]) == ["50%", "2:4"]
    model, tokenizer, _ = load_transformer(folder)
    nll, _ = perplexity(model, text_windows(tokenizer, folder / "heldout.txt", 4, 64))
    assert math.isclose(result["dense"]["perplexity"], math.exp(nll), rel_tol=1e-6)
    for label, cells in result["cells"].items():
        assert list(cells) == methods
        for method, cell in cells.items():
            values = cell["perplexity"]["values"]
            assert len(values) == 1 and all(math.isfinite(v) and v > 1.0 for v in values)
            assert all(abs(run["sparsity"] - 0.5) < 1e-9 for run in cell["runs"]), (label, method)
        assert set(result["ordering"][label]) == {"sparsegpt_le_wanda", "wanda_lt_magnitude", "holds"}
    saved = json.loads((tmp_path / "decoder.json").read_text())
    assert saved["cells"].keys() == result["cells"].keys()
    table = (tmp_path / "decoder.md").read_text().splitlines()
    assert table[0] == "| sparsity | " + " | ".join(methods) + " | SparseGPT ≤ Wanda < magnitude |"
    rows = [line for line in table[2:] if line.startswith("| ")][:3]
    assert [r.split(" | ")[0] for r in rows] == ["| dense", "| 50%", "| 2:4"]
    assert all(r.count("|") == len(methods) + 3 for r in rows)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(SparseforgeError, match="size 'huge' is not known; allowed: tiny, small"):
        stdlib_lm.config_for("huge")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(SparseforgeError, match="already exists"):
        stdlib_lm.train(tmp_path / "other", "tiny")
    with pytest.raises(SparseforgeError, match="never replaced"):
        stdlib_lm.train(tmp_path / "other", "tiny", overwrite=True)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    with pytest.raises(SparseforgeError, match="steps=0 is not allowed"):
        stdlib_lm.build("tiny", steps=0)
