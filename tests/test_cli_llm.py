"""``sparseforge llm prune`` and ``sparseforge llm eval`` on tiny random transformers, offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import requires
from sparseforge.cli import main
from test_oneshot_io import HAS_TRANSFORMERS, make_bert, make_llama, make_text, make_tokenizer

pytestmark = requires(HAS_TRANSFORMERS, "transformers (the [llm] extra) is not installed")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_llm")
    text = make_text(1200)
    tokenizer = make_tokenizer(text)
    (root / "calib.txt").write_text(text, encoding="utf-8")
    (root / "short.txt").write_text(make_text(50, seed=1), encoding="utf-8")
    return {
        "llama": make_llama(root / "llama", tokenizer),
        "bert": make_bert(root / "bert", tokenizer),
        "text": root / "calib.txt",
        "short": root / "short.txt",
    }


def cli(*args: object) -> int:
    """Run the command line in-process; its exit status (0 when it returns)."""
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_llm_help_lists_prune_and_eval(capsys: pytest.CaptureFixture[str]) -> None:
    cli("--help")
    assert "llm" in capsys.readouterr().out
    cli("llm", "--help")
    text = capsys.readouterr().out
    assert "prune" in text and "eval" in text


def test_llm_prune_writes_a_folder_that_loads_with_the_same_logits(
    tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    from sparseforge.oneshot import prune_model
    from sparseforge.oneshot.io import REPORT_FILE, calibration_ids, load_masks, load_transformer

    out = tmp_path / "pruned"
    args = ["--method", "wanda", "--sparsity", "0.5", "--structure", "2:4", "--samples", "4", "--seqlen", "32"]
    status = cli("llm", "prune", models["llama"], *args, "--calibration", models["text"], "--seed", "3", "--out", out)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "model.layers.0" in captured.out and "model.layers.1" in captured.out
    assert "sparsity 0.5000 over 14 pruned layers" in captured.out

    # the same pruning in-process, from the same seed
    model, tokenizer, _ = load_transformer(models["llama"])
    ids = calibration_ids(tokenizer, models["text"], 4, 32, seed=3)
    report = prune_model(model, ids, method="wanda", structure="2:4", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

    masks = load_masks(out)
    assert masks.sparsity() == 0.5 and len(masks) == 14
    for name, mask in masks.items():
        assert torch.equal(mask, report.masks[name])
        assert bool((mask.reshape(-1, 4).sum(dim=1) == 2).all())  # 2 of every 4 inputs kept
    data = json.loads((out / REPORT_FILE).read_text())
    assert data["method"] == "wanda" and data["structure"] == "2:4" and data["pruned_sparsity"] == 0.5
    assert data["samples"] == 4 and data["seqlen"] == 32 and len(data["block_errors"]) == 2
    assert data["dense"] == ["lm_head.weight"] and "model.safetensors" in data["files"]
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]

    # once more: refused without --overwrite, replaced with it
    assert cli("llm", "prune", models["llama"], *args, "--calibration", models["text"], "--out", out) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    status = cli("llm", "prune", models["llama"], *args, "--calibration", models["text"], "--out", out, "--overwrite")
    assert status == 0 and [p.name for p in tmp_path.iterdir()] == ["pruned"]


def test_llm_eval_perplexity_of_dense_and_pruned_decoder(
    tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pruned"
    prune = ["--method", "magnitude", "--sparsity", "0.6", "--samples", "2", "--seqlen", "16"]
    assert cli("llm", "prune", models["llama"], *prune, "--calibration", models["text"], "--out", out) == 0
    dense_json = tmp_path / "dense.json"
    evaluate = ["--text", models["text"], "--samples", "4", "--seqlen", "32"]
    assert cli("llm", "eval", models["llama"], *evaluate, "--json", dense_json) == 0
    assert cli("llm", "eval", out, *evaluate, "--reference", models["llama"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed
    dense = json.loads(dense_json.read_text())
    pruned = json.loads((out / "eval.json").read_text())  # the default: beside the model
    assert dense["kind"] == "decoder" and dense["tokens"] == 4 * 31
    assert math.isfinite(dense["perplexity"]) and math.isfinite(pruned["perplexity"])
    assert math.isclose(dense["perplexity"], math.exp(dense["nll"]))
    assert pruned["perplexity"] != dense["perplexity"]
    assert math.isclose(pruned["reference"]["perplexity"], dense["perplexity"], rel_tol=1e-9)
    assert f"{pruned['perplexity']:.4f}" in printed
    # latency of both, the pruned folder without packed layers timed as it is
    assert pruned["layers"] == "dense" and "latency" in printed
    for role in ("model", "reference"):
        rate = pruned["latency"][role]["generate tokens/s (batch 1)"]
        assert math.isfinite(rate) and rate > 0


def test_llm_eval_runs_the_packed_layers(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    out = tmp_path / "packed"
    prune = ["--method", "magnitude", "--sparsity", "0.8", "--samples", "2", "--seqlen", "16", "--packed"]
    prune += ["--batch-sizes", "1,16", "--no-autotune"]
    assert cli("llm", "prune", models["llama"], *prune, "--calibration", models["text"], "--out", out) == 0
    evaluate = ["--text", models["text"], "--samples", "2", "--seqlen", "32", "--reference", models["llama"]]
    assert cli("llm", "eval", out, *evaluate) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["layers"] == "packed" and "packed layers" in capsys.readouterr().out
    assert result["latency"]["model"]["generate tokens/s (batch 1)"] > 0
    assert math.isfinite(result["perplexity"])


def test_llm_eval_encoder_cosine_to_the_dense_model(
    tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bert-pruned"
    prune = ["--method", "wanda", "--sparsity", "0.5", "--samples", "2", "--seqlen", "16"]
    assert cli("llm", "prune", models["bert"], *prune, "--calibration", models["text"], "--out", out) == 0
    evaluate = ["--text", models["text"], "--samples", "12", "--seqlen", "16"]
    same = tmp_path / "same.json"
    assert cli("llm", "eval", models["bert"], *evaluate, "--reference", models["bert"], "--json", same) == 0
    assert cli("llm", "eval", out, *evaluate, "--reference", models["bert"]) == 0
    assert "mean cosine" in capsys.readouterr().out
    itself = json.loads(same.read_text())
    result = json.loads((out / "eval.json").read_text())
    assert itself["kind"] == "encoder" and itself["sentences"] == 12
    assert itself["cosine_mean"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= result["cosine_min"] <= result["cosine_mean"] < 0.99999
    assert set(result["latency"]["model"]) == {"embed 1 ms", "embed 32 ms"}
    assert all(v > 0 for v in result["latency"]["reference"].values())


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("not a transformer", "has no config.json; expected a transformer folder as save_pretrained writes it"),
        ("missing calibration", "calibration text 'missing.txt' does not exist"),
        ("text too short", "has {n} tokens; samples x seqlen = 4 x 32 = 128 needed"),
        ("existing out", "already exists; pass --overwrite to replace it"),
        ("N:M not dividing", "cannot split into groups of m=3"),
        ("unknown method", "--method 'foo' is not known; allowed: magnitude"),
        ("sparsity conflicts with N:M", "conflicts with --structure 2:4"),
        ("seqlen too long", "--seqlen 1000 exceeds the max_position_embeddings=128"),
        ("eval of a folder that is not a transformer", "model folder"),
        ("eval of an encoder without reference", "pass --reference"),
        ("eval text too short", "text"),
    ],
)
def test_bad_inputs_are_one_line_errors_and_write_nothing(
    case: str,
    needle: str,
    tmp_path: Path,
    models: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    (tmp_path / "taken").mkdir()
    prune = ["llm", "prune", models["llama"], "--calibration", models["text"], "--samples", "4", "--seqlen", "32"]
    args = {
        "not a transformer": ["llm", "prune", "notes", "--calibration", models["text"], "--out", "o"],
        "missing calibration": ["llm", "prune", models["llama"], "--calibration", "missing.txt", "--out", "o"],
        "text too short": [*prune[:4], models["short"], *prune[5:], "--out", "o"],
        "existing out": [*prune, "--out", "taken"],
        "N:M not dividing": [*prune, "--structure", "1:3", "--out", "o"],
        "unknown method": [*prune, "--method", "foo", "--out", "o"],
        "sparsity conflicts with N:M": [*prune, "--structure", "2:4", "--sparsity", "0.7", "--out", "o"],
        "seqlen too long": [*prune[:-1], "1000", "--out", "o"],
        "eval of a folder that is not a transformer": ["llm", "eval", "notes", "--text", models["text"]],
        "eval of an encoder without reference": ["llm", "eval", models["bert"], "--text", models["text"]],
        "eval text too short": [
            "llm",
            "eval",
            models["llama"],
            "--text",
            models["short"],
            "--samples",
            "4",
            "--seqlen",
            "32",
        ],
    }[case]
    before = _listing(tmp_path), _listing(models["llama"].parent)
    assert cli(*args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if "{n}" in needle:
        from sparseforge.oneshot.io import load_transformer

        _, tokenizer, _ = load_transformer(models["llama"])
        needle = needle.format(n=len(tokenizer(models["short"].read_text(), add_special_tokens=False)["input_ids"]))
        assert f"calibration text {str(models['short'])!r}" in lines[0]
    assert needle in lines[0]
    assert (_listing(tmp_path), _listing(models["llama"].parent)) == before


def test_ctrl_c_during_prune_exits_130_and_leaves_no_folder(tmp_path: Path, models: dict[str, Path]) -> None:
    """SIGINT once the first block is done: status 130, one line, no output folder, no temporary folder."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "pruned"
    command = [sys.executable, "-c", "from sparseforge.cli import main; main()", "llm", "prune", str(models["llama"])]
    command += ["--method", "sparsegpt", "--calibration", str(models["text"]), "--samples", "16", "--seqlen", "64"]
    command += ["--batch-size", "1", "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("block 1/2"):
            proc.send_signal(signal.SIGINT)
            break
    _, rest = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the command finished before the interrupt arrived (a very fast machine)")
    lines = [ln for ln in rest.splitlines() if ln.strip() and not ln.startswith("block ")]
    assert proc.returncode == 130, "".join(seen) + rest
    assert lines[-1] == "interrupted; nothing was written"
    assert list(tmp_path.iterdir()) == []
