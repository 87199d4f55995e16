"""Experiment configs: the schema's messages (key path + reason), YAML errors, grid expansion, run keys."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparseforge.errors import SparseforgeError
from sparseforge.experiments.config import (
    ALGORITHMS,
    ExperimentConfig,
    config_key,
    expand,
    load_config,
    load_runs,
    parse_config,
)


def _error(raw: object) -> str:
    with pytest.raises(SparseforgeError) as info:
        parse_config(raw)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("raw", "path", "reason"),
    [
        ({"modle": "mlp"}, "modle", "unknown key"),
        ({"algorithm": {"name": "rigl", "every": 0}}, "algorithm.every", "greater than or equal to 1"),
        ({"algorithm": {"name": "rigl", "alpha": 1.5}}, "algorithm.alpha", "less than or equal to 1"),
        ({"algorithm": {"name": "dense", "every": 100}}, "algorithm.every", "unknown key"),
        ({"algorithm": {"name": "gmp", "start": 0.8, "end": 0.5}}, "algorithm", "start 0.8 must be before end 0.5"),
        ({"training": {"epochs": "30"}}, "training.epochs", "valid integer (got '30')"),
        ({"training": {"epochs": 2.5}}, "training.epochs", "valid integer (got 2.5)"),
        ({"training": {"epochs": 0}}, "training.epochs", "greater than or equal to 1"),
        ({"training": {"multiplier": -1}}, "training.multiplier", "greater than 0"),
        ({"training": {"batch_size": True}}, "training.batch_size", "valid integer"),
        ({"sparsity": {"target": 1.0}}, "sparsity.target", "less than 1 (got 1.0)"),
        ({"sparsity": {"target": -0.1}}, "sparsity.target", "greater than or equal to 0"),
        ({"sparsity": {"distribution": "erk2"}}, "sparsity.distribution", "'uniform', 'er', 'erk' or 'global'"),
        ({"sparsity": {"structure": "3:2"}}, "sparsity.structure", "allowed"),
        ({"sparsity": {"init": "xavier"}}, "sparsity.init", "'dense' or 'sparse'"),
        ({"optimizer": {"name": "lion"}}, "optimizer.name", "'sgd', 'adam' or 'adamw'"),
        ({"optimizer": {"lr": 0}}, "optimizer.lr", "greater than 0"),
        ({"optimizer": {"momentum": 1.0}}, "optimizer.momentum", "less than 1"),
        ({"optimizer": {"name": "adam", "nesterov": True}}, "optimizer", "nesterov needs optimizer sgd"),
        ({"schedule": {"milestones": [0.7, 0.2]}}, "schedule.milestones", "strictly increasing"),
        ({"schedule": {"milestones": [1.5]}}, "schedule.milestones[0]", "less than 1"),
        ({"schedule": {"warmup": 1}}, "schedule.warmup", "less than 1"),
        ({"evaluation": {"every": 0}}, "evaluation.every", "greater than or equal to 1"),
        ({"seeds": []}, "seeds", "at least 1 item"),
        ({"seeds": [1, 1]}, "seeds", "repeat a seed"),
        ({"seeds": [-1]}, "seeds[0]", "greater than or equal to 0"),
        ({"name": ""}, "name", "at least 1 character"),
        ({"grid": {"foo.bar": [1]}}, "grid", "'foo.bar' is not a config key"),
        ({"grid": {"sparsity.target": []}}, "grid.sparsity.target", "at least 1 item"),
        ({"grid": {"sparsity.target": 0.5}}, "grid.sparsity.target", "valid list"),
        ({"data": {"name": "imagenet"}}, "data.name", "allowed: mnist1d, digits"),
        ({"data": {"samples": 3}}, "data.samples", "greater than or equal to 10"),
    ],
)
def test_bad_values_name_the_key_path_and_the_reason(raw, path, reason):
    message = _error(raw)
    assert message.startswith(f"config: {path}: "), message
    assert reason in message


def test_unknown_names_list_the_allowed_ones():
    message = _error({"algorithm": "rigl2"})
    assert message.startswith("config: algorithm: ") and all(f"'{a}'" in message for a in ALGORITHMS)
    message = _error({"model": "resnet"})
    assert (
        "model.name: model 'resnet' is not known; allowed: mlp, cnn" in message and "package.module:factory" in message
    )


def test_many_problems_are_one_line_with_a_count():
    message = _error({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5})
    assert message.count("unknown key") == 3 and message.endswith("(and 2 more)")


def test_the_top_level_must_be_a_mapping():
    assert "top level must be a mapping" in _error([1, 2])


def test_shorthand_names_and_defaults():
    config = parse_config({"model": "cnn", "data": "digits", "algorithm": "set"})
    assert config.model.name == "cnn" and config.data.name == "digits" and config.algorithm.name == "set"
    assert config.algorithm.every == 100 and config.algorithm.alpha == 0.3  # RigL's defaults
    assert config.training.total_epochs == 30 and config.seeds == [0]
    user = parse_config({"model": "my_package.nets:build"})
    assert user.model.name == "my_package.nets:build"


def test_training_multiplier_scales_the_length():
    assert parse_config({"training": {"epochs": 30, "multiplier": 2}}).training.total_epochs == 60
    assert parse_config({"training": {"epochs": 3, "multiplier": 0.1}}).training.total_epochs == 1


def _write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_yaml_files(tmp_path):
    path = _write(tmp_path, "model: mlp\nalgorithm: {name: rigl, every: 200}\n")
    assert load_config(path).algorithm.every == 200
    with pytest.raises(SparseforgeError, match=r"line 2, column 1: not valid YAML"):
        load_config(_write(tmp_path, "model: [1\n"))
    with pytest.raises(SparseforgeError, match="is empty"):
        load_config(_write(tmp_path, "\n"))
    with pytest.raises(SparseforgeError, match="is a directory"):
        load_config(tmp_path)
    with pytest.raises(SparseforgeError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SparseforgeError, match="not UTF-8"):
        load_config(bad)
    with pytest.raises(SparseforgeError, match=r"config '.*config.yaml': training.epochs: "):
        load_config(_write(tmp_path, "training: {epochs: -1}\n"))
    # safe_load: a YAML tag that would construct a Python object is refused, not run
    with pytest.raises(SparseforgeError, match="not valid YAML"):
        load_config(_write(tmp_path, "name: !!python/object/apply:os.system ['echo hacked']\n"))


GRID = """
    name: methods
    model: mlp
    sparsity: {target: 0.9}
    algorithm: {name: rigl, every: 100}
    seeds: [0, 1]
    grid:
      algorithm: [dense, static, rigl, {name: gmp, every: 50}]
      sparsity.target: [0.8, 0.9]
      training.multiplier: [1, 2]
"""


def test_grid_expansion(tmp_path):
    config, runs = load_runs(_write(tmp_path, GRID))
    # 4 algorithms x 2 sparsities x 2 lengths x 2 seeds = 32, less the dense duplicates over sparsity (4)
    assert len(runs) == 28
    assert len({r.key for r in runs}) == 28
    dense = [r for r in runs if r.config.algorithm.name == "dense"]
    assert len(dense) == 4 and all(r.config.sparsity.target == 0.0 for r in dense)
    gmp = [r for r in runs if r.config.algorithm.name == "gmp"]
    assert len(gmp) == 8 and all(r.config.algorithm.every == 50 for r in gmp)
    assert {r.config.training.total_epochs for r in gmp} == {30, 60}
    assert {r.config.sparsity.target for r in gmp} == {0.8, 0.9}
    # the first grid key varies slowest, seeds fastest
    assert [r.label for r in runs[:2]] == [
        "algorithm=dense sparsity.target=0.8 training.multiplier=1 seed=0",
        "algorithm=dense sparsity.target=0.8 training.multiplier=1 seed=1",
    ]
    assert runs[-1].label == 'algorithm=gmp{"every": 50} sparsity.target=0.9 training.multiplier=2 seed=1'
    assert all(r.config.grid == {} for r in runs)


SUBGRIDS = """\
algorithm: static
seeds: [0, 1]
grid:
  - algorithm: [dense, static, rigl]
    sparsity.target: [0.8, 0.9]
  - algorithm: [static, {name: rigl, every: 50}]
    training.multiplier: [2]
  - algorithm: [rigl]
    sparsity.target: [0.9]
"""


def test_a_list_of_sub_grids_expands_to_the_union_of_their_runs(tmp_path):
    config, runs = load_runs(_write(tmp_path, SUBGRIDS))
    # sub-grid 1: dense once + static and rigl at 0.8 and 0.9 = 5 settings; sub-grid 2: 2 new
    # settings at 0.9 (the default target) and 2x; sub-grid 3: rigl at 0.9, already in sub-grid 1
    assert config.combinations == 6 + 2 + 1
    assert len(runs) == (5 + 2) * 2 == len({r.key for r in runs})
    long = [r for r in runs if r.config.training.multiplier == 2]
    assert sorted((r.config.algorithm.name, getattr(r.config.algorithm, "every", None)) for r in long) == [
        ("rigl", 50),
        ("rigl", 50),
        ("static", None),
        ("static", None),
    ]
    # the rigl 0.9 1x run of the third sub-grid is the first sub-grid's (same key), listed once
    rigl_1x_09 = [r for r in runs if r.config.algorithm.name == "rigl" and r.config.training.multiplier == 1]
    assert {r.config.sparsity.target for r in rigl_1x_09} == {0.8, 0.9} and len(rigl_1x_09) == 4


def test_an_unknown_key_in_a_sub_grid_is_named(tmp_path):
    with pytest.raises(SparseforgeError, match=r"grid.*'modle.width' is not a config key"):
        load_runs(_write(tmp_path, "grid:\n  - algorithm: [static]\n  - modle.width: [8]\n"))


def test_a_grid_run_that_breaks_the_schema_is_named(tmp_path):
    text = "algorithm: {name: rigl, alpha: 0.5}\ngrid:\n  algorithm.name: [rigl, gmp]\n"
    with pytest.raises(SparseforgeError) as info:
        load_runs(_write(tmp_path, text))
    assert "(grid run algorithm.name=gmp): algorithm.alpha: unknown key" in str(info.value)


def test_keys_are_stable_and_follow_the_resolved_settings():
    a = parse_config({"algorithm": "rigl", "sparsity": {"target": 0.9}})
    b = parse_config({"algorithm": {"name": "rigl", "every": 100}, "sparsity": {"target": 0.9, "distribution": "erk"}})
    assert config_key(a, 0) == config_key(b, 0)  # the same settings spelled differently
    assert config_key(a, 0) != config_key(a, 1)
    assert config_key(a, 0) != config_key(parse_config({"algorithm": "rigl", "sparsity": {"target": 0.8}}), 0)
    dense_a = parse_config({"algorithm": "dense", "sparsity": {"target": 0.5}})
    dense_b = parse_config({"algorithm": "dense", "sparsity": {"target": 0.9}})
    assert config_key(dense_a, 0) == config_key(dense_b, 0)


@given(
    sparsities=st.lists(st.sampled_from([0.5, 0.6, 0.7, 0.8, 0.9]), min_size=1, max_size=4, unique=True),
    everies=st.lists(st.integers(1, 500), min_size=1, max_size=3, unique=True),
    seeds=st.lists(st.integers(0, 10**6), min_size=1, max_size=3, unique=True),
)
def test_sparse_grids_expand_to_the_full_product_with_unique_keys(sparsities, everies, seeds):
    config = ExperimentConfig.model_validate(
        {"algorithm": "set", "seeds": seeds, "grid": {"sparsity.target": sparsities, "algorithm.every": everies}}
    )
    runs = expand(config)
    assert len(runs) == len(sparsities) * len(everies) * len(seeds)
    assert len({r.key for r in runs}) == len(runs)
    assert {(r.config.sparsity.target, r.config.algorithm.every, r.seed) for r in runs} == {
        (s, e, seed) for s in sparsities for e in everies for seed in seeds
    }


def test_cli_validate(tmp_path):
    path = _write(tmp_path, GRID)
    ok = subprocess.run(
        [sys.executable, "-c", "from sparseforge.cli import main; main()", "validate", str(path), "--runs"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "valid; 28 runs (16 grid combinations x 2 seeds; 4 duplicate runs merged" in " ".join(ok.stdout.split())
    bad = _write(tmp_path, "training: {epochs: 0}\n")
    out = subprocess.run(
        [sys.executable, "-c", "from sparseforge.cli import main; main()", "validate", str(bad)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: config") and "training.epochs" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_the_guide_config_validates_to_the_run_count_it_states(tmp_path):
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "experiments.md").read_text(encoding="utf-8")
    block = re.findall(r"```yaml\n(.*?)```", guide, re.S)[0]
    stated = re.search(r"(\d+) runs, not (\d+)", guide)
    assert stated is not None
    _, runs = load_runs(_write(tmp_path, block))
    assert len(runs) == int(stated.group(1))


def test_the_readme_config_validates_to_the_run_count_it_states(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.findall(r"```yaml\n(.*?)```", readme, re.S)[0]
    stated = re.search(r"validate exp\.yaml --runs +# (\d+) runs", readme)
    assert stated is not None
    _, runs = load_runs(_write(tmp_path, block))
    assert len(runs) == int(stated.group(1))
