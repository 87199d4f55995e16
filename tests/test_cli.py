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
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_every_command(capsys) -> None:
    main(["--help"])
    text = capsys.readouterr().out
    for command in ("demo", "essential", "prune", "report", "bench", "validate", "run", "results"):
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
        (["prune", "x.pt", "--sparsity", "0.5"], "prune needs the model to prune: --model"),
        (["prune", "x.pt", "--model", "mlp", "--sparsity", "0.9", "--structure", "2:4"], "omit --sparsity"),
        (["prune", "x.pt", "--model", "mlp"], "--structure unstructured needs --sparsity"),
        (["prune", "x.pt", "--model", "mlp", "--sparsity", "0.5", "--method", "snip"], "--method snip needs --data"),
        (
            ["prune", "x.pt", "--model", "no_such_module_xyz:build", "--sparsity", "0.5"],
            "cannot import module 'no_such_module_xyz'",
        ),
        (["prune", "x.pt", "--model", "resnet", "--sparsity", "0.5"], "neither a built-in model"),
        (["prune", "x.pt", "--model", "mlp", "--sparsity", "0.5", "--input-shape", "3,x"], "--input-shape '3,x'"),
        (
            ["prune", "x.pt", "--model", "mlp", "--sparsity", "0.5", "--checkpoint", "missing.pt"],
            "'missing.pt' does not exist",
        ),
        (
            ["prune", "x.pt", "--model", "mlp", "--sparsity", "0.5", "--exclude", "nothing_here"],
            "'nothing_here' matches no prunable layer",
        ),
        (["prune", "x.pt", "--model", "cnn", "--structure", "1:8"], "cannot split into groups of m=8"),
        (["essential", "--epochs", "0"], "epochs=0"),
        (["essential", "--model", "resnet"], "--model 'resnet'"),
        (["report", "missing.safetensors"], "'missing.safetensors' does not exist"),
        (["essential", "--sparsities", "0.1,abc"], "sparsities='0.1,abc'"),
        (["essential", "--methods", "magnitude,psychic"], "method='psychic'"),
        (["bench", "--batches", "0,1"], "batches='0,1'"),
        (["bench", "--batches", "99999999999999999999"], "allowed: comma-separated integers in [1, 65536]"),
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
    main(
        ["prune", str(path), "--model", "mlp", "--sparsity", "0.75", "--checkpoint", str(tmp_path / "init.safetensors")]
    )
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
    cfg = EssentialConfig(
        model="mlp",
        width=64,
        epochs=3,
        sparsities=(0.0, 0.5, 0.9),
        methods=("magnitude", "random"),
        nm_patterns=((2, 4),),
    )
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


def test_essential_keeps_layers_dense_that_some_nm_pattern_cannot_tile() -> None:
    from sparseforge.experiments.essential import _untileable_layers
    from sparseforge.experiments.models import build_model
    from sparseforge.structures import NM

    cnn = build_model("cnn", 40, 10, width=8)  # first conv: fan-in 1 * 4 = 4
    assert _untileable_layers(cnn, [NM(2, 4), NM(1, 4)]) == []
    assert _untileable_layers(cnn, [NM(2, 4), NM(1, 8)]) == ["features.0"]


# -- file-system errors, validation before work, the user's own model ---------------------------


def _exit_line(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return int(exit_info.value.code), lines[0]


def test_output_path_errors_name_the_path_and_the_problem(tmp_path, capsys) -> None:
    code, line = _exit_line(["prune", str(tmp_path), "--model", "mlp", "--sparsity", "0.5"], capsys)
    assert code == 2 and "is a directory" in line and str(tmp_path) in line
    code, line = _exit_line(["prune", str(tmp_path / "no" / "x.pt"), "--model", "mlp", "--sparsity", "0.5"], capsys)
    assert code == 2 and "no such directory" in line
    code, line = _exit_line(["report", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in line and "does not exist" not in line
    code, line = (
        _exit_line(["essential", "--out", str(tmp_path / "f.txt"), "--epochs", "1"], capsys)
        if (tmp_path / "f.txt").write_text("x")
        else (0, "")
    )
    assert code == 2 and "is a file" in line


def test_problems_are_reported_before_any_data_is_read(monkeypatch, tmp_path, capsys) -> None:
    """An N:M pattern that does not fit, an exclude typo or a checkpoint of another model is found
    before the data for the scores is loaded (which used to come after 10-53 s of training)."""
    from sparseforge.checkpoint import save
    from sparseforge.experiments import datasets
    from sparseforge.experiments.models import build_model

    def boom(*args, **kwargs):
        raise AssertionError("data was loaded before the options were checked")

    monkeypatch.setattr(datasets, "load_batch", boom)
    save(tmp_path / "other.safetensors", build_model("mlp", 40, 10, width=8))
    base = ["prune", str(tmp_path / "o.pt"), "--method", "snip", "--data", "mnist1d"]
    for extra, needle in [
        (["--model", "cnn", "--structure", "1:8"], "groups of m=8"),
        (["--model", "mlp", "--sparsity", "0.5", "--exclude", "classifer"], "'classifer' matches no prunable layer"),
        (["--model", "mlp", "--sparsity", "0.5", "--checkpoint", str(tmp_path / "other.safetensors")], "shape"),
    ]:
        code, line = _exit_line(base + extra, capsys)
        assert code == 2 and needle in line, line
    assert not (tmp_path / "o.pt").exists()


def _write_factory(folder) -> str:
    (folder / "my_models.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(3)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))\n"
        "NOT_A_MODEL = 42\n"
    )
    return "my_models"


def test_prune_the_users_model_by_import_path(tmp_path, monkeypatch, capsys) -> None:
    import torch

    from sparseforge.checkpoint import load, save

    module = _write_factory(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    trained = importlib.import_module(module).build()
    with torch.no_grad():
        trained[0].weight.mul_(10)  # "trained" weights differ from the factory's
    save(tmp_path / "trained.safetensors", trained)
    out = tmp_path / "pruned.safetensors"
    main(
        [
            "prune",
            str(out),
            "--model",
            f"{module}:build",
            "--checkpoint",
            str(tmp_path / "trained.safetensors"),
            "--sparsity",
            "0.75",
            "--exclude",
            "2",
        ]
    )
    fresh = importlib.import_module(module).build()
    masks = load(out, fresh)
    assert masks is not None and masks.names() == ["0.weight"] and masks.sparsity() == pytest.approx(0.75)
    kept = masks["0.weight"]
    # magnitude pruning of the loaded (x10) weights: the kept ones are exactly the trained ones
    assert torch.equal(fresh[0].weight[kept], trained[0].weight[kept])
    assert int((fresh[0].weight != 0).sum()) == int(kept.sum()) == 48
    assert "dense before" in capsys.readouterr().out
    # the same model as a file path; and a name that is not a factory
    main(["prune", str(out), "--model", f"{tmp_path / 'my_models.py'}:build", "--structure", "2:4"])
    capsys.readouterr()
    code, line = _exit_line(["prune", str(out), "--model", f"{module}:NOT_A_MODEL", "--sparsity", "0.5"], capsys)
    assert code == 2 and "names a int" in line


def test_prune_with_data_file_and_already_sparse_checkpoint(tmp_path, capsys) -> None:
    import torch
    from safetensors.torch import save_file

    from sparseforge.checkpoint import load
    from sparseforge.experiments.models import build_model

    save_file({"inputs": torch.randn(64, 40), "targets": torch.randint(0, 10, (64,))}, str(tmp_path / "d.safetensors"))
    first = tmp_path / "p50.safetensors"
    main(
        [
            "prune",
            str(first),
            "--model",
            "mlp",
            "--sparsity",
            "0.5",
            "--method",
            "snip",
            "--data",
            str(tmp_path / "d.safetensors"),
            "--samples",
            "32",
        ]
    )
    capsys.readouterr()
    second = tmp_path / "p80.pt"
    main(["prune", str(second), "--model", "mlp", "--checkpoint", str(first), "--sparsity", "0.8"])
    out = capsys.readouterr().out
    assert "masks of sparsity 0.5000 before" in out and "dense before" not in out
    masks = load(second, build_model("mlp", 40, 10))
    assert masks is not None and masks.sparsity() == pytest.approx(0.8, abs=1e-3)


def test_interrupt_in_a_real_process_exits_130_with_one_line(tmp_path) -> None:
    """Ctrl-C (SIGINT) at any moment: one line on stderr, exit 130, no file and no temp file."""
    import os
    import signal
    import time

    out_dir = tmp_path / "demo"
    for delay in (0.6, 5.0):  # during start-up (importing torch) and during training
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from sparseforge.cli import main; main()",
                "essential",
                "--out",
                str(out_dir),
                "--epochs",
                "500",
                "--no-progress",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (delay, err)
        assert err.strip() == "interrupted; nothing was written", (delay, err)
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_interrupt_after_a_file_was_written_says_what_was_kept(tmp_path, monkeypatch, capsys) -> None:
    from sparseforge.experiments import essential

    def interrupted_plot(result, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(essential, "plot", interrupted_plot)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "essential",
                "--out",
                str(tmp_path),
                "--model",
                "mlp",
                "--width",
                "8",
                "--epochs",
                "1",
                "--sparsities",
                "0,0.5",
                "--methods",
                "magnitude",
                "--no-progress",
            ]
        )
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err == f"interrupted; kept (complete): {tmp_path / 'essential_sparsity.json'}; nothing else was written"
    assert json.loads((tmp_path / "essential_sparsity.json").read_text())["results"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["essential_sparsity.json"]


def test_readme_command_lines_run_as_written(tmp_path, monkeypatch, capsys) -> None:
    """The README's command-line examples run as written: prune and report lines for real (in a
    scratch folder), the long ones (demo, bench) and those naming the user's own files through the
    parser only (--help appended, so every option name is checked)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1]
    lines = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip().startswith("sparseforge ")]
    assert len(lines) >= 5
    monkeypatch.chdir(tmp_path)
    ran = 0
    for line in lines:
        args = line.split()[1:]
        if args[0] in ("demo", "essential", "bench", "llm", "run") or "mypkg" in line:
            main([*args, "--help"])  # exits by returning (status 0), or raises on an unknown option
            assert "Usage" in capsys.readouterr().out, line
        else:
            main(args)
            ran += 1
            capsys.readouterr()
    assert ran >= 3


def test_import_is_lazy_and_the_prune_function_wins_over_its_module() -> None:
    """`import sparseforge` does not import torch (so the command line handles Ctrl-C from its
    first moment), and `sparseforge.prune` stays the function whatever was imported before."""
    code = (
        "import sys, sparseforge\n"
        "assert 'torch' not in sys.modules, 'torch imported by import sparseforge'\n"
        "import sparseforge.pruning, sparseforge.cli.prune\n"
        "from sparseforge import prune, NM, Sparsifier\n"
        "assert callable(prune) and prune.__module__ == 'sparseforge.pruning', prune\n"
        "assert sparseforge.prune is prune and NM(2, 4).n_keep == 2\n"
        "assert set(sparseforge.__all__) <= set(dir(sparseforge))\n"
        "try:\n"
        "    sparseforge.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_builtin_model_takes_the_datas_features_and_a_mismatch_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    import torch
    from safetensors.torch import save_file

    from sparseforge.checkpoint import load
    from sparseforge.experiments.models import build_model

    out = tmp_path / "digits.safetensors"
    main(
        [
            "prune",
            str(out),
            "--model",
            "mlp",
            "--sparsity",
            "0.5",
            "--method",
            "snip",
            "--data",
            "digits",
            "--samples",
            "64",
        ]
    )
    masks = load(out, build_model("mlp", 64, 10))  # built for digits' 64 features
    assert masks is not None and masks.sparsity() == pytest.approx(0.5)
    capsys.readouterr()
    # a user's model that cannot take the data: one line, before any scoring, nothing written
    (tmp_path / "net.py").write_text("import torch\ndef build():\n    return torch.nn.Linear(5, 3)\n")
    save_file(
        {"inputs": torch.randn(8, 7), "targets": torch.zeros(8, dtype=torch.long)}, str(tmp_path / "d.safetensors")
    )
    code, line = _exit_line(
        [
            "prune",
            str(tmp_path / "x.pt"),
            "--model",
            f"{tmp_path / 'net.py'}:build",
            "--sparsity",
            "0.5",
            "--method",
            "snip",
            "--data",
            str(tmp_path / "d.safetensors"),
        ],
        capsys,
    )
    assert code == 2 and "cannot run on" in line and "inputs of shape (7,)" in line and "RuntimeError" in line
    assert not (tmp_path / "x.pt").exists()
