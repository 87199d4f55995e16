"""Experiment configs: a YAML file validated by a typed schema, and its grid expanded into runs.

A config names one training setup (model, data, optimizer, learning-rate schedule, training
length, sparsity, algorithm, evaluation) and the seeds to run it with. Lists under ``grid:`` map a
dotted key path to the values it takes; every combination of them, times every seed, is one run::

    name: mnist1d-methods
    model: mlp
    data: mnist1d
    training: {epochs: 30}
    sparsity: {target: 0.9, distribution: erk}
    algorithm: {name: rigl, every: 100}
    seeds: [0, 1, 2]
    grid:
      algorithm: [dense, static, set, rigl, {name: gmp, every: 100}]
      sparsity.target: [0.8, 0.9]
      training.multiplier: [1, 2]

Units: ``training.epochs`` is the base length in epochs and ``training.multiplier`` scales it
(1x, 2x, 5x, as the RigL paper compares); the algorithms' ``start`` / ``end`` are *fractions of
the run's optimizer steps*; ``every`` counts optimizer steps; sparsity is the fraction of zeros.

Every mapping rejects unknown keys; a bad value is reported with its key path and the reason
(:class:`~sparseforge.errors.SparseforgeError`, one line). A dense run ignores the sparsity
settings, so the grid above gives one dense run per seed and length, not one per sparsity.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from ..errors import SparseforgeError
from . import datasets as _datasets
from . import models as _models

try:
    import yaml
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
except ImportError as _exc:  # the [experiments] extra
    raise SparseforgeError(
        f"experiment configs need pydantic and PyYAML ({_exc.name} is missing); "
        "install them with: pip install 'sparseforge[experiments]'"
    ) from None

__all__ = [
    "ALGORITHMS",
    "DATASETS",
    "MODELS",
    "AlgorithmSpec",
    "DataSpec",
    "EvaluationSpec",
    "ExperimentConfig",
    "ModelSpec",
    "OptimizerSpec",
    "Run",
    "ScheduleSpec",
    "SparsitySpec",
    "TrainingSpec",
    "config_key",
    "expand",
    "load_config",
    "parse_config",
]

#: Built-in models (or ``package.module:factory`` / ``file.py:factory`` for your own).
MODELS: tuple[str, ...] = _models.MODELS
#: Built-in data sets (generated or shipped with a package).
DATASETS: tuple[str, ...] = tuple(_datasets.DATASETS)
#: Training algorithms a config can name.
ALGORITHMS = ("dense", "static", "gmp", "set", "rigl", "snfs", "granet", "srigl")


class _Strict(BaseModel):
    """Unknown keys are errors; values are checked strictly (no "3" for 3); frozen after checking."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _by_name(value: Any) -> Any:
    """``model: mlp`` is short for ``model: {name: mlp}`` (the same for data and algorithm)."""
    return {"name": value} if isinstance(value, str) else value


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]


class SparseIFTSpec(_Strict):
    """A Sparse-IFT transformation of the model's Linear and Conv1d/Conv2d layers
    (:func:`sparseforge.layers.transform`), sized for ``sparsity.target``; ``exclude``: glob
    patterns of layers left dense (for ``wide``, also left at their widths)."""

    kind: Literal["wide", "parallel", "factorized", "doped"]
    exclude: list[str] = []


class ModelSpec(_Strict):
    """``name``: a built-in model or ``package.module:factory`` / ``path/file.py:factory``;
    ``sparse_ift``: its layers replaced by iso-FLOP sparse ones (a kind or a mapping)."""

    name: str = "mlp"
    width: Annotated[int, Field(ge=1)] | None = None
    sparse_ift: SparseIFTSpec | None = None

    @field_validator("sparse_ift", mode="before")
    @classmethod
    def _kind(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in MODELS and ":" not in name:
            raise ValueError(
                f"model {name!r} is not known; allowed: {', '.join(MODELS)}, or package.module:factory / file.py:factory"
            )
        return name


class DataSpec(_Strict):
    """``samples`` (MNIST-1D: train + test) and ``seed`` make the generated data; ``root`` is the
    local folder of ``cifar10``, ``cifar100`` and ``folder`` (class sub-folders of images, resized
    to ``image_size``)."""

    name: str = "mnist1d"
    samples: Annotated[int, Field(ge=10)] = 5000
    seed: Annotated[int, Field(ge=0)] = 42
    root: Annotated[str, Field(min_length=1)] | None = None
    image_size: Annotated[int, Field(ge=4, le=1024)] | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in DATASETS:
            raise ValueError(f"data {name!r} is not known; allowed: {', '.join(DATASETS)}")
        return name

    @model_validator(mode="after")
    def _local(self) -> DataSpec:
        local = _datasets.LOCAL_DATASETS
        if self.name in local and self.root is None:
            raise ValueError(f"data {self.name!r} is read from a local folder: set data.root")
        if self.name not in local and self.root is not None:
            raise ValueError(f"data.root applies to {', '.join(local)}, not to {self.name!r}")
        if self.image_size is not None and self.name != "folder":
            raise ValueError(f"data.image_size applies to folder, not to {self.name!r}")
        return self


class OptimizerSpec(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: PositiveFloat = 0.1
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    nesterov: bool = False

    @model_validator(mode="after")
    def _nesterov(self) -> OptimizerSpec:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0.0):
            raise ValueError("nesterov needs optimizer sgd with momentum > 0")
        return self


class ScheduleSpec(_Strict):
    """Learning rate over the run: ``constant``, ``cosine`` (to 0) or ``step`` (times ``gamma`` at
    each milestone, a fraction of the run); ``warmup`` is a fraction of the run (linear from 0)."""

    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    milestones: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = [0.5, 0.75]
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, milestones: list[float]) -> list[float]:
        if list(milestones) != sorted(set(milestones)):
            raise ValueError(f"milestones {list(milestones)} must be strictly increasing")
        return milestones


class TrainingSpec(_Strict):
    """``epochs`` x ``multiplier`` epochs of ``batch_size`` samples (the multiplier compares lengths)."""

    epochs: Annotated[int, Field(ge=1, le=100_000)] = 30
    multiplier: Annotated[float, Field(gt=0.0, le=1000.0)] = 1.0
    batch_size: Annotated[int, Field(ge=1)] = 128

    @property
    def total_epochs(self) -> int:
        """The run's length in epochs: ``epochs * multiplier`` rounded, at least 1."""
        return max(1, round(self.epochs * self.multiplier))


class SparsitySpec(_Strict):
    """``target``: final fraction of zeros of the pruned layers; ``distribution`` over layers;
    ``structure``: ``unstructured``, ``N:M``, ``block:RxC``, ``channel``, ``fanin``; ``init``:
    ``dense`` keeps the model's initialisation, ``sparse`` rescales each neuron's weights to its
    sparse fan-in (the "sparse init" of Evci et al.)."""

    target: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    distribution: Literal["uniform", "er", "erk", "global"] = "erk"
    structure: str = "unstructured"
    init: Literal["dense", "sparse"] = "dense"

    @field_validator("structure")
    @classmethod
    def _structure(cls, text: str) -> str:
        from ..structures import parse_structure

        try:
            parse_structure(text)
        except SparseforgeError as exc:
            raise ValueError(str(exc)) from None
        return text


class _Dense(_Strict):
    name: Literal["dense"]


class _Static(_Strict):
    name: Literal["static"]


class _GMP(_Strict):
    """Gradual magnitude pruning from dense: cubic schedule between ``start`` and ``end``."""

    name: Literal["gmp"]
    start: Fraction = 0.25
    end: Fraction = 0.75
    every: Annotated[int, Field(ge=1)] = 100

    @model_validator(mode="after")
    def _order(self) -> _GMP:
        if self.start >= self.end:
            raise ValueError(f"start {self.start} must be before end {self.end} (fractions of the run)")
        return self


class _DST(_Strict):
    """Drop and grow ``alpha`` (cosine-decayed) of the kept weights every ``every`` steps until ``end``."""

    name: Literal["set", "rigl", "snfs"]
    every: Annotated[int, Field(ge=1)] = 100
    alpha: Annotated[float, Field(gt=0.0, le=1.0)] = 0.3
    end: Annotated[float, Field(gt=0.0, le=1.0)] = 0.75


class _SRigL(_DST):
    name: Literal["srigl"]  # type: ignore[assignment]
    gamma_sal: Fraction = 0.3


class _GraNet(_DST):
    """Start at ``initial_sparsity`` and prune gradually to the target until ``prune_end``, with RigL's regrowth."""

    name: Literal["granet"]  # type: ignore[assignment]
    initial_sparsity: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    prune_end: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5


AlgorithmSpec = Annotated[_Dense | _Static | _GMP | _DST | _SRigL | _GraNet, Field(discriminator="name")]


class EvaluationSpec(_Strict):
    """Test loss and accuracy every ``every`` epochs (and always after the last)."""

    every: Annotated[int, Field(ge=1)] = 1


#: One grid: dotted key paths -> the values each takes (every combination is a run).
GridSpec = dict[str, Annotated[list[Any], Field(min_length=1)]]


class ExperimentConfig(_Strict):
    """One validated config; ``grid`` maps dotted key paths to the values they take, or is a list
    of such mappings (sub-grids: the runs are the union of each one's combinations, a run that
    two sub-grids share listed once)."""

    name: Annotated[str, Field(min_length=1, max_length=200)] = "experiment"
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    training: TrainingSpec = TrainingSpec()
    sparsity: SparsitySpec = SparsitySpec()
    algorithm: AlgorithmSpec = _Static(name="static")
    evaluation: EvaluationSpec = EvaluationSpec()
    seeds: Annotated[list[Annotated[int, Field(ge=0, le=2**63 - 1)]], Field(min_length=1, max_length=1000)] = [0]
    grid: GridSpec | Annotated[list[GridSpec], Field(min_length=1)] = {}

    @field_validator("model", "data", "algorithm", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _by_name(value)

    @model_validator(mode="after")
    def _sparse_ift(self) -> ExperimentConfig:
        if self.model.sparse_ift is not None:
            if self.algorithm.name not in ("static", "set", "rigl"):
                raise ValueError(
                    f"model.sparse_ift trains with algorithm static, set or rigl (each layer keeps its count of "
                    f"weights, so its FLOPs), not {self.algorithm.name!r}"
                )
            if self.sparsity.structure != "unstructured":
                raise ValueError(
                    f"model.sparse_ift needs sparsity.structure unstructured, not {self.sparsity.structure!r}"
                )
        return self

    @field_validator("seeds")
    @classmethod
    def _unique(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds {seeds} repeat a seed")
        return seeds

    @field_validator("grid")
    @classmethod
    def _grid_paths(cls, grid: GridSpec | list[GridSpec]) -> GridSpec | list[GridSpec]:
        for part in grid if isinstance(grid, list) else [grid]:
            for path in part:
                head = path.split(".")[0]
                if head not in _GRID_FIELDS:
                    raise ValueError(
                        f"grid key {path!r} is not a config key; allowed: {', '.join(_GRID_FIELDS)} (dotted)"
                    )
        return grid

    @property
    def grids(self) -> list[GridSpec]:
        """The grid as a list of sub-grids (a single mapping is a list of one)."""
        return list(self.grid) if isinstance(self.grid, list) else [self.grid]

    @property
    def combinations(self) -> int:
        """Grid combinations over all sub-grids, before duplicates are merged (seeds not counted)."""
        return sum(math.prod(len(values) for values in part.values()) for part in self.grids)


_GRID_FIELDS = ("model", "data", "optimizer", "schedule", "training", "sparsity", "algorithm", "evaluation")


# -- messages -------------------------------------------------------------------------------------------


def _path(loc: tuple[int | str, ...]) -> str:
    """``('algorithm', 'rigl', 'every')`` -> ``algorithm.every`` (pydantic adds the union's tag)."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif i > 0 and loc[i - 1] == "algorithm" and part in ALGORITHMS:
            continue  # the discriminated union's tag
        elif i == 1 and loc[0] == "grid" and part.startswith(("dict[", "list[")):
            continue  # the grid union's branch (a mapping or a list of mappings)
        else:
            parts.append(part)
    text = ".".join(parts).replace(".[", "[")
    return text or "<top level>"


def _reason(error: Any) -> str:
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required"
    if (
        "input" in error
        and error["type"] not in ("union_tag_invalid", "value_error")
        and not isinstance(error["input"], dict)
    ):
        message += f" (got {error['input']!r})"
    return message


def _other_grid_branch(error: Any) -> bool:
    """An error of the grid union's branch that the value is not (a mapping checked as a list, ...)."""
    loc = tuple(error["loc"])
    if len(loc) != 2 or loc[0] != "grid" or not isinstance(loc[1], str):
        return False
    return (loc[1].startswith("list[") and error["type"] == "list_type") or (
        loc[1].startswith("dict[") and error["type"] == "dict_type"
    )


def describe(exc: ValidationError, source: str, limit: int = 3) -> SparseforgeError:
    """One line: ``SOURCE: key.path: reason; ...`` (the first ``limit`` problems, then a count)."""
    errors = [e for e in exc.errors() if not _other_grid_branch(e)] or exc.errors()
    shown = "; ".join(f"{_path(tuple(e['loc']))}: {_reason(e)}" for e in errors[:limit])
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return SparseforgeError(f"{source}: {shown}{more}")


# -- loading --------------------------------------------------------------------------------------------


def parse_config(raw: object, source: str = "config") -> ExperimentConfig:
    """Validate a mapping (as read from YAML); errors name the key path and the reason."""
    if not isinstance(raw, dict):
        raise SparseforgeError(
            f"{source}: the top level must be a mapping of keys (model:, data:, ...), not {type(raw).__name__}"
        )
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise describe(exc, source) from None


def load_config(path: str | os.PathLike[str]) -> ExperimentConfig:
    """Read and validate a YAML config file (``yaml.safe_load``: no code runs)."""
    from ..fileio import check_input_file, describe_os_error

    file = check_input_file(path, "config")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SparseforgeError(f"config {str(file)!r} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise describe_os_error(exc, file, "config") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SparseforgeError(f"config {str(file)!r}{where}: not valid YAML ({problem})") from None
    if raw is None:
        raise SparseforgeError(f"config {str(file)!r} is empty; expected a mapping of keys (model:, data:, ...)")
    return parse_config(raw, f"config {str(file)!r}")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# -- runs -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One run of a sweep: a config without a grid, for one seed, and its unique key."""

    config: ExperimentConfig
    seed: int
    assignment: tuple[tuple[str, Any], ...]
    key: str

    @property
    def label(self) -> str:
        """``algorithm=rigl sparsity.target=0.9 seed=0`` (the grid values and the seed)."""
        parts = [f"{path}={_short(value)}" for path, value in self.assignment]
        return " ".join([*parts, f"seed={self.seed}"])


def _short(value: Any) -> str:
    if isinstance(value, dict):
        rest = {k: v for k, v in value.items() if k != "name"}
        return f"{value.get('name', '?')}{json.dumps(rest, sort_keys=True) if rest else ''}"
    return str(value)


def config_key(config: ExperimentConfig, seed: int) -> str:
    """A 16-hex-digit key of the resolved config and seed: equal settings give equal keys."""
    resolved = _resolved(config).model_dump(mode="json")
    if resolved["model"].get("sparse_ift") is None:  # keys of configs written before the option stay
        resolved["model"].pop("sparse_ift", None)
    payload = json.dumps({"config": resolved, "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _resolved(config: ExperimentConfig) -> ExperimentConfig:
    """The config a run executes: no grid, no seed list, and for dense runs no sparsity settings."""
    update: dict[str, Any] = {"grid": {}, "seeds": [0]}
    if config.algorithm.name == "dense":
        update["sparsity"] = SparsitySpec(target=0.0)
    return config.model_copy(update=update)


def _set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if isinstance(child, str) and key in ("model", "data", "algorithm"):
            child = {"name": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise SparseforgeError(f"grid key {path!r}: {key!r} holds {child!r}, not a mapping")
        node[key] = child = dict(child)
        node = child
    node[keys[-1]] = copy.deepcopy(value)


def expand(config: ExperimentConfig, raw: dict[str, Any] | None = None, source: str = "config") -> list[Run]:
    """Every run of ``config``: each sub-grid's combinations (first key slowest) x the seeds.

    ``raw`` is the mapping the config was read from (grid values are applied to it and each
    combination validated again); by default it is rebuilt from ``config``. Runs with the same
    key (dense runs that differ only in sparsity settings) are listed once.
    """
    base = raw if raw is not None else config.model_dump(mode="json", exclude_defaults=True)
    base = {k: v for k, v in base.items() if k not in ("grid", "seeds")}
    runs: list[Run] = []
    seen: set[str] = set()
    for part in config.grids:
        paths = list(part)
        for values in itertools.product(*(part[p] for p in paths)):
            combo = copy.deepcopy(base)
            for path, value in zip(paths, values, strict=True):
                _set_path(combo, path, value)
            assignment = tuple(zip(paths, values, strict=True))
            label = " ".join(f"{p}={_short(v)}" for p, v in assignment)
            single = parse_config(combo, f"{source} (grid run {label})" if label else source)
            for seed in config.seeds:
                key = config_key(single, seed)
                if key in seen:
                    continue
                seen.add(key)
                runs.append(Run(_resolved(single), seed, assignment, key))
    return runs


def load_runs(
    path: str | os.PathLike[str], *, data_root: str | os.PathLike[str] | None = None
) -> tuple[ExperimentConfig, list[Run]]:
    """``(config, runs)`` of a YAML file: validated, then its grid expanded and every run validated.

    ``data_root`` replaces the file's ``data.root`` (a shipped config naming a placeholder folder
    for a data set that must be copied in, such as CIFAR-10) before anything is validated.
    """
    config = load_config(path)
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if data_root is not None:
        if not isinstance(raw.get("data"), dict):
            raise SparseforgeError(
                f"config {str(path)!r} has no data: mapping to set the root of; allowed: one with data:"
            )
        raw["data"]["root"] = str(data_root)
        config = parse_config(raw, f"config {str(path)!r}")
    return config, expand(config, raw, f"config {str(path)!r}")
