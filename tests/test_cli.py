"""The command line: help for every command, one-line errors with exit status 2, the demo's outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparseforge.cli import main
from sparseforge.experiments.essential import EssentialConfig, dropping_point, run_essential_sparsity


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from sparseforge.cli import main; main()", *args],
        capture_output=True, text=True, timeout=120,
    )


def test_help_lists_every_command(capsys) -> None:
    main(["--help"])
    text = capsys.readouterr().out
    for command in ("demo", "prune", "report", "bench"):
        assert command in text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["prune", "x.pt", "--sparsity", "1.5"], "sparsity=1.5"),
        (["prune", "x.pt", "--structure", "5:4"], "n_keep=5"),
        (["prune", "x.pt", "--method", "foo"], "method='foo'"),
        (["prune", "x.pt", "--distribution", "zipf"], "distribution='zipf'"),
        (["prune", "x.pt", "--structure", "hexagonal"], "structure='hexagonal'"),
        (["prune", "x.txt", "--sparsity", "0.5"], "'.txt'"),
        (["demo", "--sparsities", "0.1,abc"], "sparsities='0.1,abc'"),
        (["demo", "--methods", "magnitude,psychic"], "method='psychic'"),
        (["bench", "--batches", "0,1"], "batches='0,1'"),
        (["bench", "--sparsities", "0.9,3:2"], "n_keep=3"),
        (["bench", "--sparsities", "1.2"], "1.2"),
        (["bench", "--sparsities", "0.9,abc"], "pattern='abc' is not allowed; allowed: a fraction of zeros"),
        (["bench", "--sparsities", "block:8x8"], "pattern='block:8x8' is not allowed"),
        (["bench", "--sparsities", "block:0x8:0.5"], "Block(rows=0"),
        (["bench", "--sparsities", "block:8x8:1.5"], "sparsity=1.5"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_bad_input_in_a_real_process_has_no_traceback() -> None:
    out = run_cli("prune", "x.pt", "--sparsity", "1.5")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: sparsity=1.5 is outside the allowed range [0, 1)"


def test_unknown_option_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "no-such-option" in capsys.readouterr().err


def test_report_of_corrupted_checkpoint(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(bad)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "bad.safetensors" in err


def test_prune_then_report_roundtrip(tmp_path, capsys) -> None:
    """`prune` writes a checkpoint whose masks `report` reads back (in-process, tiny settings)."""
    path = tmp_path / "mlp.safetensors"
    from sparseforge.checkpoint import save
    from sparseforge.experiments.models import build_model

    save(tmp_path / "init.safetensors", build_model("mlp", 40, 10))
    main(["prune", str(path), "--model", "mlp", "--sparsity", "0.75", "--checkpoint", str(tmp_path / "init.safetensors")])
    assert path.exists()
    capsys.readouterr()
    main(["report", str(path), "--model", "mlp"])
    text = capsys.readouterr().out
    assert "0.7500" in text  # prunable-total sparsity row


def test_dropping_point_by_hand() -> None:
    curve = [(0.0, 0.90), (0.5, 0.895), (0.7, 0.885), (0.8, 0.86), (0.9, 0.95)]
    # within 0.01 of 0.90 up to 0.5; 0.7 is 0.015 below -> the dropping point is 0.5, and a
    # later recovery (0.9) does not move it.
    assert dropping_point(curve, 0.90, 0.01) == 0.5
    assert dropping_point(curve, 0.90, 0.02) == 0.7


def test_essential_sweep_small(tmp_path) -> None:
    cfg = EssentialConfig(model="mlp", width=64, epochs=3, sparsities=(0.0, 0.5, 0.9),
                          methods=("magnitude", "random"), nm_patterns=((2, 4),))
    result = run_essential_sparsity(cfg, progress=False)
    rows = result["results"]
    assert len(rows) == 2 * 3 + 2
    by = {(r["method"], r["structure"], r["sparsity"]): r["accuracy"] for r in rows}
    # sparsity 0 leaves the trained model unchanged
    assert by[("magnitude", "unstructured", 0.0)] == pytest.approx(result["dense_accuracy"])
    assert result["dense_accuracy"] > 0.3  # trained well above chance (0.1)
    assert {r["sparsity"] for r in rows if r["structure"] == "2:4"} == {0.5}
    from sparseforge.experiments.essential import plot, save_json

    png = plot(result, tmp_path / "curve.png")
    js = save_json(result, tmp_path / "curve.json")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(js.read_text())["results"] == json.loads(json.dumps(rows))
    assert not list(tmp_path.glob(".*.tmp"))


def test_demo_keeps_layers_dense_that_some_nm_pattern_cannot_tile() -> None:
    from sparseforge.experiments.essential import _untileable_layers
    from sparseforge.experiments.models import build_model
    from sparseforge.structures import NM

    cnn = build_model("cnn", 40, 10, width=8)  # first conv: fan-in 1 * 4 = 4
    assert _untileable_layers(cnn, [NM(2, 4), NM(1, 4)]) == []
    assert _untileable_layers(cnn, [NM(2, 4), NM(1, 8)]) == ["features.0"]
