"""One-shot pruning of a whole model, block by block on calibration data (the sequential driver).

One model-agnostic loop for every method and every transformer:

1. capture what the model feeds its first block for each calibration batch (the embedding part
   runs, nothing else; see :mod:`~sparseforge.oneshot.capture`);
2. for each block in turn: hooks on its linear layers accumulate :class:`InputStats` while the
   block runs on every batch (the dense outputs are kept), each layer is pruned by the method,
   and the pruned block runs again; its outputs feed the next block (SparseGPT's sequential
   convention: a block is calibrated on the outputs of the already pruned blocks before it).

Only the current block's inputs and outputs are alive at any time, so memory is two blocks'
worth of activations whatever the depth of the model.

Two options work with every method:

- ``owl=OWL(...)`` (outlier-weighed layerwise sparsity, Yin et al. 2024): a first sequential pass
  over the **dense** model measures each block's outlier ratio (its layers' Wanda scores pooled,
  :func:`~sparseforge.oneshot.block_outlier_ratio`), and :func:`~sparseforge.oneshot.owl_sparsities`
  turns the ratios into one sparsity per block (more outliers, lower sparsity), used by the main
  pass for every layer of the block. Unstructured only.
- ``dsnot=DSnoT(...)`` (Zhang et al. 2024): each layer's mask from the method is refined by
  :func:`~sparseforge.oneshot.refine_dsnot` on the layer's dense weight and input statistics;
  the layer keeps its dense values where the refined mask keeps a weight.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import SparseforgeError, check_float, check_int, check_sparsity
from ..masks import MaskState, check_materialized, unwrap
from ..structures import NM, Structure, Unstructured, parse_structure
from .bitmask import BitMask
from .blocks import find_blocks
from .capture import BlockCall, capture_block_inputs
from .dsnot import refine_dsnot
from .layers import DEFAULT_EXCLUDE, LinearLayer, find_linear_layers
from .owl import block_outlier_ratio, owl_sparsities
from .registry import METHODS
from .result import LayerResult
from .stats import InputStats

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = [
    "OWL",
    "BlockReport",
    "DSnoT",
    "LayerReport",
    "OneShotReport",
    "available_methods",
    "calibration_batches",
    "real_rows",
    "prune_model",
]

#: A one-shot method: ``(weight (out, in), stats or None, sparsity or None for N:M, structure, **options)``.
MethodFn = Callable[..., LayerResult]

_NEEDS = ("none", "norms", "hessian")

#: Methods whose layers come back with updated weights; DSnoT (which keeps the dense values of the
#: kept weights) would drop the update, so ``dsnot`` is refused with them. Measured on tiny Llama
#: and GPT-2 (block 0, 50%): SparseGPT 0.0080 -> 0.0182 relative error with DSnoT (Wanda 0.0127).
_UPDATES_WEIGHTS = frozenset({"sparsegpt"})

#: Built-in methods that read no input means or variances (only column norms or ``X^T X``); their
#: statistics skip the column sums unless DSnoT needs them. Any other method gets them.
_NO_MEANS = frozenset({"magnitude", "wanda", "ria", "sparsegpt"})


def _method_table() -> dict[str, tuple[MethodFn, str]]:
    """Every registered method: name -> (function, what statistics it needs)."""
    return {name: (method.fn, method.needs) for name, method in METHODS.items()}


def available_methods() -> list[str]:
    """Names accepted by ``prune_model(method=...)``."""
    return sorted(_method_table())


# -- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OWL:
    """Outlier-weighed layerwise sparsity for :func:`prune_model` (``owl=OWL()`` or ``owl=True``).

    Granularity and weighting follow the reference code: one sparsity per **block** (all its
    pruned layers share it), from the block's outlier ratio ``D_b`` = fraction of the block's
    pooled Wanda scores ``|W_ij| ||X_j||_2`` above ``m`` times their mean, measured on the dense
    model (each block fed the dense outputs of the block before). The block sparsities have an
    **unweighted mean** equal to the target (as in the paper and its code, which average over
    blocks, not over weights) and lie in ``[target - lam, target + lam]``. The blocks of a
    transformer have equal sizes, so the mean over blocks is also the sparsity over all pruned
    weights (up to each layer's rounding to whole weights); with ``exclude`` patterns that leave
    blocks of different sizes, the weight-weighted overall sparsity can differ from the target.

    Args:
        lam: half-width of the band around the target (paper: 0.08), ``0 <= lam``, with
            ``target - lam >= 0`` and ``target + lam < 1``.
        m: outlier threshold as a multiple of the mean score (paper: 5; 3 to 10 explored), > 0.
    """

    lam: float = 0.08
    m: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lam", check_float(self.lam, "lam", low=0.0))
        object.__setattr__(self, "m", check_float(self.m, "m", low=0.0, low_open=True))


@dataclass(frozen=True)
class DSnoT:
    """DSnoT refinement of every layer's mask for :func:`prune_model` (``dsnot=DSnoT()`` or ``True``).

    The options of :func:`~sparseforge.oneshot.refine_dsnot` (see there what DSnoT optimises: the
    **mean** output error per row, from the input means, with the input variances as a growth
    heuristic). ``tokens_per_sample`` is not an option here: the driver passes the calibration
    sequence length, so ``update_threshold`` has the reference's units.
    """

    max_cycles: int = 50
    update_threshold: float = 0.1
    pow_of_var_regrowing: float = 1.0
    keep_sign: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_cycles", check_int(self.max_cycles, "max_cycles", minimum=0))
        object.__setattr__(self, "update_threshold", check_float(self.update_threshold, "update_threshold", low=0.0))
        power = check_float(self.pow_of_var_regrowing, "pow_of_var_regrowing", low=0.0)
        object.__setattr__(self, "pow_of_var_regrowing", power)
        if not isinstance(self.keep_sign, bool):
            raise SparseforgeError(f"keep_sign={self.keep_sign!r} is not allowed; allowed: True or False")


# -- the report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerReport:
    """One pruned layer: weight name, the parameter's shape (its own layout), kept and total weights.

    ``info``: what the method reported (e.g. SparseGPT's dampening) and, with DSnoT,
    ``dsnot_cycles``, ``dsnot_swaps``, ``dsnot_expected_error_before`` and
    ``dsnot_expected_error_after`` (``sum_i |e_i|``, the mean output error per token summed over
    the outputs, of the method's mask and of the refined one).
    """

    name: str
    block: int
    shape: tuple[int, ...]
    kept: int
    numel: int
    info: dict[str, float] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Exact fraction of zeros of the layer's mask."""
        return 1.0 - self.kept / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class BlockReport:
    """One block: its module name, the relative squared error of its output, and the seconds it took.

    ``error`` = ``||Y_dense - Y_pruned||^2 / ||Y_dense||^2`` over the calibration tokens (padding
    left out), where both outputs come from the same (already pruned upstream) inputs.
    ``sparsity``: the target of the block's layers (the run's target, or the block's OWL
    sparsity); ``outlier_ratio``: OWL's outlier ratio of the dense block (``None`` without OWL).
    """

    index: int
    name: str
    error: float
    seconds: float
    sparsity: float | None = None
    outlier_ratio: float | None = None


@dataclass
class OneShotReport:
    """What :func:`prune_model` did.

    ``masks`` holds one bool mask per pruned weight, keyed by canonical parameter name, in the
    parameter's own layout (``(in, out)`` for GPT-2's ``Conv1D``), on the CPU. The report keeps
    them packed at one bit per weight and unpacks them the first time ``masks`` is read. ``dense`` lists
    the linear layers left dense: excluded, or outside the repeated blocks (e.g. ``lm_head``).
    ``sparsity`` is the target fraction of zeros of the pruned layers (with OWL: the mean of the
    blocks' sparsities, each in ``blocks[i].sparsity``; ``masks.targets`` holds each layer's own).
    ``owl`` and ``dsnot``: the options used, ``None`` when off.
    """

    method: str
    structure: str
    sparsity: float
    blocks_name: str
    layers: list[LayerReport]
    blocks: list[BlockReport]
    packed_masks: dict[str, BitMask]
    targets: dict[str, float]
    dense: list[str]
    samples: int
    seqlen: int
    tokens: int
    seconds: float
    per_block_arguments: bool
    owl: OWL | None = None
    dsnot: DSnoT | None = None
    true_sequential: bool = False

    @cached_property
    def masks(self) -> MaskState:
        """The bool masks (unpacked once, on first use) with each layer's target sparsity."""
        return MaskState({k: m.unpack() for k, m in self.packed_masks.items()}, targets=self.targets)

    def pruned_sparsity(self) -> float:
        """Fraction of zeros over all pruned weights together (0.0 when nothing was pruned)."""
        total = sum(r.numel for r in self.layers)
        return 0.0 if total == 0 else sum(r.numel - r.kept for r in self.layers) / total

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able numbers and strings (the masks left out)."""
        return {
            "method": self.method,
            "structure": self.structure,
            "sparsity": self.sparsity,
            "blocks": self.blocks_name,
            "samples": self.samples,
            "seqlen": self.seqlen,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "per_block_arguments": self.per_block_arguments,
            "owl": None if self.owl is None else {"lam": self.owl.lam, "m": self.owl.m},
            "dsnot": None if self.dsnot is None else dict(vars(self.dsnot)),
            "true_sequential": self.true_sequential,
            "pruned_sparsity": self.pruned_sparsity(),
            "layers": [
                {
                    "name": r.name,
                    "block": r.block,
                    "shape": list(r.shape),
                    "sparsity": r.sparsity,
                    "kept": r.kept,
                    "numel": r.numel,
                    **({"info": dict(r.info)} if r.info else {}),
                }
                for r in self.layers
            ],
            "block_errors": [
                {
                    "index": b.index,
                    "name": b.name,
                    "error": b.error,
                    "seconds": b.seconds,
                    "sparsity": b.sparsity,
                    **({} if b.outlier_ratio is None else {"outlier_ratio": b.outlier_ratio}),
                }
                for b in self.blocks
            ],
            "dense": list(self.dense),
        }


# -- validation ----------------------------------------------------------------------------------


def _resolve_sparsity(sparsity: object, structure: Structure) -> tuple[float, float | None]:
    """``(target sparsity, the value passed to the method)``; N:M fixes it, the method gets ``None``."""
    if isinstance(sparsity, bool) or (sparsity is not None and not isinstance(sparsity, numbers.Real)):
        raise SparseforgeError(f"sparsity={sparsity!r} is not a number; allowed: a float in [0, 1) or None")
    if isinstance(structure, NM):
        fixed = 1.0 - structure.n_keep / structure.m
        if sparsity is not None and not math.isclose(float(sparsity), fixed, abs_tol=1e-9):
            raise SparseforgeError(
                f"sparsity={sparsity!r} conflicts with structure {structure.n_keep}:{structure.m}, which fixes it at "
                f"{fixed:g}; allowed: sparsity=None or {fixed:g}"
            )
        return fixed, None
    if not isinstance(structure, Unstructured):
        raise SparseforgeError(
            f"structure {structure!r} is not supported by one-shot pruning; allowed: 'unstructured' or N:M such as '2:4'"
        )
    value = check_sparsity(0.5 if sparsity is None else float(sparsity))
    return value, value


def _check_options(fn: MethodFn, method: str, options: object) -> dict[str, Any]:
    """The method's keyword options, each a keyword-only parameter of its layer function."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise SparseforgeError(f"options is a {type(options).__name__}; allowed: a dict of the method's options")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to check against: the call will tell
        return dict(options)
    allowed = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    unknown = [n for n in options if n not in allowed]
    if unknown:
        raise SparseforgeError(
            f"option {unknown[0]!r} is not an option of method={method!r}; allowed: {', '.join(allowed) or 'none'}"
        )
    return dict(options)


def _input_embedding(model: nn.Module) -> nn.Module | None:
    """``model.get_input_embeddings()`` where the model has one (transformers' models), else ``None``."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    return embedding if isinstance(embedding, nn.Module) else None


def _vocab_size(model: nn.Module) -> int | None:
    embedding = _input_embedding(model)
    if isinstance(embedding, nn.Embedding):
        return int(embedding.num_embeddings)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def _max_positions(model: nn.Module) -> int | None:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _check_calibration(
    calibration: object, vocab: int | None, max_positions: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input ids (n, seqlen) long, attention mask (n, seqlen) bool or None)``."""
    mask: object = None
    if isinstance(calibration, Mapping):
        if "input_ids" not in calibration:
            raise SparseforgeError(
                f"calibration is a mapping without 'input_ids' (keys {sorted(map(str, calibration))}); "
                "allowed: a LongTensor of token ids (n_samples, seqlen) or {'input_ids': ..., 'attention_mask': ...}"
            )
        ids, mask = calibration["input_ids"], calibration.get("attention_mask")
    elif isinstance(calibration, (tuple, list)) and len(calibration) == 2:
        ids, mask = calibration
    else:
        ids = calibration
    allowed = "allowed: a LongTensor of token ids of shape (n_samples, seqlen)"
    if not isinstance(ids, torch.Tensor):
        raise SparseforgeError(f"calibration input ids are a {type(ids).__name__}; {allowed}")
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise SparseforgeError(f"calibration input ids have shape {tuple(ids.shape)}; {allowed}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise SparseforgeError(f"calibration input ids have dtype {ids.dtype}; {allowed}")
    if ids.is_meta:
        raise SparseforgeError(f"calibration input ids are on the meta device; {allowed}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        bad = lo if lo < 0 else hi
        limit = f"[0, {vocab - 1}]" if vocab is not None else ">= 0"
        raise SparseforgeError(
            f"calibration holds token id {bad}, outside the model's vocabulary; allowed: ids in {limit}"
        )
    if max_positions is not None and ids.shape[1] > max_positions:
        raise SparseforgeError(
            f"calibration seqlen {ids.shape[1]} exceeds the model's max_position_embeddings={max_positions}; "
            f"allowed: seqlen <= {max_positions}"
        )
    if mask is None:
        return ids.long(), None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape) or mask.is_meta:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise SparseforgeError(
            f"calibration attention mask is {shape}; allowed: a 0/1 tensor shaped like the input ids {tuple(ids.shape)}"
        )
    if bool(((mask != 0) & (mask != 1)).any()):
        raise SparseforgeError("calibration attention mask holds values other than 0 and 1; allowed: 0/1 or bool")
    keep = mask != 0
    empty = (~keep.any(dim=1)).nonzero()
    if len(empty):
        raise SparseforgeError(
            f"calibration sample {int(empty[0, 0])} has no token with attention mask 1; allowed: at least one per sample"
        )
    return ids.long(), keep


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _device_of(model: nn.Module) -> torch.device:
    for module in (_input_embedding(model), model):
        if isinstance(module, nn.Module):
            param = next(module.parameters(), None)
            if param is not None:
                return param.device
    return torch.device("cpu")


# -- the loop --------------------------------------------------------------------------------------


def real_rows(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` that belong to real tokens (padding left out) when ``x`` is (batch, seq, ...)."""
    if token_mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(token_mask.shape):
        return x[token_mask.to(x.device)]
    return x


class _Gather:
    """Forward hooks that add each layer's real input rows of the current batch to its statistics.

    Layers called on the very same input tensor in one forward (a block's query, key and value
    projections) would add the same rows to equal statistics: the first one in the first batch
    leads, the others follow it and add nothing, and :meth:`finish` gives each follower a copy of
    its leader's statistics (bitwise what it would have summed itself). If a later batch does not
    call a follower on its leader's input, :meth:`finish` says so and the caller gathers again
    without sharing.
    """

    def __init__(self, stats: dict[str, InputStats], share: bool) -> None:
        self.stats, self.share = stats, share
        self.token_mask: torch.Tensor | None = None
        self.first = True
        self.follows: dict[str, str] = {}
        self.seen: dict[str, torch.Tensor] = {}  # this batch's inputs of the leaders, by layer
        self.calls: dict[str, int] = {}  # this batch's calls, by layer
        self.broken = False

    def _check_batch(self) -> None:
        """Sharing holds for a batch when each follower and its leader were called once each."""
        if any(self.calls.get(f, 0) != 1 or self.calls.get(lead, 0) != 1 for f, lead in self.follows.items()):
            self.broken = True
        self.seen.clear()
        self.calls.clear()

    def next_batch(self, token_mask: torch.Tensor | None, first: bool) -> None:
        self._check_batch()
        self.token_mask, self.first = token_mask, first

    def hook(self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor):
            raise SparseforgeError(
                f"a {type(module).__name__} was called without a tensor input; cannot gather statistics"
            )
        if self.share:
            self.calls[name] = self.calls.get(name, 0) + 1
            leader = self.follows.get(name)
            if self.first and leader is None and name not in self.seen:
                leader = next((n for n, t in self.seen.items() if t is x and self._alike(n, name)), None)
                if leader is not None:
                    self.follows[name] = leader
            if leader is not None:
                if self.seen.get(leader) is not x:
                    self.broken = True
                return
            self.seen[name] = x
        stats = self.stats[name]
        stats.add(real_rows(x, self.token_mask).to(stats.device))

    def _alike(self, a: str, b: str) -> bool:
        x, y = self.stats[a], self.stats[b]
        return (
            type(x) is type(y)
            and x.in_features == y.in_features
            and x.device == y.device
            and (x.xtx is None) == (y.xtx is None)
            and (x.sums is None) == (y.sums is None)
        )

    def finish(self) -> bool:
        """Copy each leader's statistics to its followers; ``False`` when the sharing did not hold."""
        self._check_batch()
        if self.broken:
            return False
        for name, leader in self.follows.items():
            source, target = self.stats[leader], self.stats[name]
            target.tokens = source.tokens
            target.sums = None if source.sums is None else source.sums.clone()
            target.sq_sums = source.sq_sums.clone()
            target.xtx = None if source.xtx is None else source.xtx.clone()
        return True


def _squared(dense: torch.Tensor, pruned: torch.Tensor, token_mask: torch.Tensor | None) -> tuple[float, float]:
    """``(||dense - pruned||^2, ||dense||^2)`` over real tokens, fp32 values summed in fp64."""
    d, p = real_rows(dense, token_mask).float(), real_rows(pruned, token_mask).float()
    return float((d - p).pow(2).sum(dtype=torch.float64)), float(d.pow(2).sum(dtype=torch.float64))


def _checked_result(
    result: object, layer: LinearLayer, old: torch.Tensor, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new weight (out, in) with zeros where pruned, bool mask (out, in))`` from a method's result."""
    where = f"method={method!r} on {layer.param_name}"
    if not isinstance(result, LayerResult):
        raise SparseforgeError(f"{where} returned a {type(result).__name__}; allowed: a LayerResult")
    mask = result.mask
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != old.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise SparseforgeError(f"{where} returned a mask {shape}; allowed: a bool tensor of shape {tuple(old.shape)}")
    weight = old if result.weight is None else result.weight
    if not isinstance(weight, torch.Tensor) or weight.shape != old.shape:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise SparseforgeError(f"{where} returned a weight {shape}; allowed: a tensor of shape {tuple(old.shape)}")
    mask = mask.to(old.device)
    new = weight.to(dtype=old.dtype, device=old.device).masked_fill(~mask, 0)
    if not bool(torch.isfinite(new).all()):
        raise SparseforgeError(f"{where} produced NaN or Inf weights; the layer was left unchanged")
    return new, mask


class _BlockProgress:
    """Rich progress over blocks (on stderr) with one line per finished block; silent when disabled."""

    def __init__(self, enabled: bool, total: int, title: str) -> None:
        self.enabled, self.total, self.title = enabled, total, title
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> _BlockProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.title, total=self.total)
        return self

    def done(self, block: BlockReport, n_layers: int) -> None:
        if self._progress is not None and self._task is not None:  # both set by __enter__
            owl = (
                ""
                if block.outlier_ratio is None
                else f" at sparsity {block.sparsity:.4f} (OWL outlier ratio {block.outlier_ratio:.3e})"
            )
            self._progress.console.print(
                f"block {block.index + 1}/{self.total} {block.name}: {n_layers} layers pruned{owl}, "
                f"relative error {block.error:.3e}, {block.seconds:.2f} s"
            )
            self._progress.update(self._task, advance=1)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)


@dataclass
class _Plan:
    """Everything :func:`prune_model` checked before doing any work."""

    method: str
    fn: MethodFn
    needs: str
    options: dict[str, Any]
    structure: Structure
    target: float
    method_sparsity: float | None
    blocks_name: str
    blocks: nn.ModuleList
    by_block: list[list[LinearLayer]]
    dense: list[str]
    ids: torch.Tensor
    keep: torch.Tensor | None
    owl: OWL | None = None
    dsnot: DSnoT | None = None
    true_sequential: bool = False


def _option(value: object, kind: type[OWL] | type[DSnoT], name: str) -> Any:
    """``None`` (off), the default options (``True``) or the given options."""
    if value is False or value is None:
        return None
    if value is True:
        return kind()
    if isinstance(value, kind):
        return value
    raise SparseforgeError(f"{name}={value!r} is not allowed; allowed: True, False or {kind.__name__}(...)")


def _plan(
    model: nn.Module,
    calibration: object,
    *,
    method: object,
    sparsity: object,
    structure: str | Structure,
    exclude: Sequence[str],
    options: object,
    owl: object = False,
    dsnot: object = False,
) -> _Plan:
    """Validate every argument and find the blocks and their layers; changes nothing."""
    check_materialized(model)
    table = _method_table()
    if not isinstance(method, str) or method not in table:
        raise SparseforgeError(f"method={method!r} is not known; allowed: {', '.join(sorted(table))}")
    fn, needs = table[method]
    if needs not in _NEEDS:
        raise SparseforgeError(f"method {method!r} needs {needs!r}; allowed needs: {', '.join(_NEEDS)}")
    checked_options = _check_options(fn, method, options)
    parsed = parse_structure(structure)
    target, method_sparsity = _resolve_sparsity(sparsity, parsed)
    owl_options: OWL | None = _option(owl, OWL, "owl")
    dsnot_options: DSnoT | None = _option(dsnot, DSnoT, "dsnot")
    if dsnot_options is not None and method in _UPDATES_WEIGHTS:
        raise SparseforgeError(
            f"dsnot cannot be used with method={method!r}: DSnoT keeps the dense values of the kept weights, which "
            f"would drop {method}'s weight update; allowed: dsnot with "
            f"{', '.join(n for n in sorted(table) if n not in _UPDATES_WEIGHTS)}"
        )
    if owl_options is not None:
        if isinstance(parsed, NM):
            raise SparseforgeError(
                f"owl cannot be used with structure {parsed.n_keep}:{parsed.m}: the N:M structure fixes every "
                f"layer's sparsity at {target:g}; allowed: owl=False, or structure='unstructured'"
            )
        owl_sparsities({"low": 0.0, "high": 1.0}, target, lam=owl_options.lam)  # lam checked against the target
    blocks_name, blocks = find_blocks(model)
    by_block: list[list[LinearLayer]] = [[] for _ in blocks]
    prefix = f"{blocks_name}." if blocks_name else ""
    for layer in find_linear_layers(model, exclude):
        head = layer.name[len(prefix) :].split(".", 1)[0] if layer.name.startswith(prefix) else ""
        if head.isdigit() and int(head) < len(blocks) and layer.name.startswith(f"{prefix}{head}."):
            parsed.check_shape((layer.out_features, layer.in_features), name=layer.param_name)
            by_block[int(head)].append(layer)
    if not any(by_block):
        raise SparseforgeError(f"no linear layer of {blocks_name} is left to prune (exclude={list(exclude)!r})")
    pruned = {id(layer.weight) for todo in by_block for layer in todo}
    dense = [layer.param_name for layer in find_linear_layers(model, ()) if id(layer.weight) not in pruned]
    ids, keep = _check_calibration(calibration, _vocab_size(model), _max_positions(model))
    return _Plan(
        method,
        fn,
        needs,
        checked_options,
        parsed,
        target,
        method_sparsity,
        blocks_name,
        blocks,
        by_block,
        dense,
        ids,
        keep,
        owl_options,
        dsnot_options,
    )


def _real_lengths(ids: torch.Tensor, keep: torch.Tensor | None) -> list[int]:
    """Per sample, the columns its batch needs: its real length if right-padded, else the full seqlen.

    A right-padded sample (mask ones then zeros) gives the same values on its real tokens once its
    trailing padding columns are dropped: padded keys are masked out, a causal token never sees
    later columns, and the positions of the real tokens stay ``0 .. length - 1``. Any other mask
    (left padding, holes) keeps every column.
    """
    seqlen = int(ids.shape[1])
    if keep is None:
        return [seqlen] * int(ids.shape[0])
    counts = keep.sum(dim=1)
    columns = torch.arange(seqlen, device=keep.device)
    right_padded = (keep == (columns.unsqueeze(0) < counts.unsqueeze(1))).all(dim=1)
    return [int(c) if bool(r) else seqlen for c, r in zip(counts.tolist(), right_padded.tolist(), strict=True)]


def _batches(
    model: nn.Module, ids: torch.Tensor, keep: torch.Tensor | None, batch_size: int
) -> tuple[list[dict[str, Any]], list[torch.Tensor | None]]:
    """The model's keyword arguments per batch, and per batch the real tokens (``None``: no padding).

    With padding, the samples are grouped by length (longest first, ties in their given order:
    deterministic) and each batch is cut to its longest sample (:func:`_real_lengths`), so the
    blocks run on fewer padded positions; the statistics are sums over real tokens, which the
    order of the samples changes only by float rounding. Without padding nothing moves.
    """
    device = _device_of(model)
    use_cache = {"use_cache": False} if _accepts(model.forward, "use_cache") else {}
    lengths = _real_lengths(ids, keep)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    if order != list(range(len(lengths))):
        index = torch.tensor(order, device=ids.device)
        ids = ids.index_select(0, index)
        keep = keep.index_select(0, index.to(keep.device)) if keep is not None else None
        lengths = [lengths[i] for i in order]
    batches: list[dict[str, Any]] = []
    token_masks: list[torch.Tensor | None] = []
    for s in range(0, ids.shape[0], batch_size):
        width = max(lengths[s : s + batch_size])
        batch: dict[str, Any] = {"input_ids": ids[s : s + batch_size, :width].to(device), **use_cache}
        part = keep[s : s + batch_size, :width] if keep is not None else None
        if part is not None:
            batch["attention_mask"] = part.long().to(device)
        batches.append(batch)
        token_masks.append(part.to(device) if part is not None and not bool(part.all()) else None)
    return batches, token_masks


def calibration_batches(
    model: nn.Module,
    calibration: torch.Tensor | Mapping[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor],
    batch_size: int = 8,
) -> tuple[list[dict[str, Any]], list[torch.Tensor | None]]:
    """Checked calibration data as the model's keyword arguments per batch, and each batch's real tokens.

    ``calibration`` is what :func:`prune_model` accepts (token ids ``(n, seqlen)``, or with an
    attention mask); it is validated against the model's vocabulary and maximum positions. The
    second list holds, per batch, a bool mask of the real (unpadded) tokens, or ``None`` when the
    batch has no padding. Other calibrated passes (e.g. activation thresholds) use this so that
    they accept and check exactly the same inputs as the pruning driver.
    """
    ids, keep = _check_calibration(calibration, _vocab_size(model), _max_positions(model))
    return _batches(model, ids, keep, check_int(batch_size, "batch_size", minimum=1))


def _run_dense(
    block: nn.Module,
    calls: list[BlockCall],
    inputs: list[torch.Tensor],
    token_masks: list[torch.Tensor | None],
    stats: dict[str, InputStats],
    todo: list[LinearLayer],
    *,
    share: bool = True,
    stop_after: nn.Module | None = None,
) -> list[torch.Tensor]:
    """The block's outputs per batch; on the way, each layer's inputs are added to its stats.

    ``stop_after``: a layer after whose call each batch's forward is cut short (its statistics
    gathered first); nothing is returned then (true-sequential stages need only statistics).
    """
    fresh = (
        {name: (s.in_features, s.xtx is not None, s.device, s.sums is not None) for name, s in stats.items()}
        if share
        else {}
    )
    gather = _Gather(stats, share)
    handles = [
        layer.module.register_forward_hook(functools.partial(gather.hook, layer.param_name))
        for layer in todo
        if layer.param_name in stats
    ]
    if stop_after is not None:  # registered last: runs after the layer's own gathering hook
        handles.append(stop_after.register_forward_hook(_stop_block))
    outputs: list[torch.Tensor] = []
    try:
        for b, hidden in enumerate(inputs):
            gather.next_batch(token_masks[b], b == 0)
            if stop_after is None:
                outputs.append(calls[b].run(block, hidden))
                continue
            try:
                calls[b].run(block, hidden)
            except _StopBlock:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if gather.finish():
        return outputs
    del outputs  # a later batch broke the sharing seen in the first: gather again, each layer on its own
    for name, (width, hessian, device, means) in fresh.items():
        stats[name] = InputStats(width, hessian=hessian, device=device, means=means)
    return _run_dense(block, calls, inputs, token_masks, stats, todo, share=False, stop_after=stop_after)


class _StopBlock(Exception):
    """Raised by a hook to cut a block's forward short once a true-sequential stage is gathered."""


def _stop_block(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
    raise _StopBlock


def _stages(
    block: nn.Module, call: BlockCall, hidden: torch.Tensor, todo: list[LinearLayer]
) -> list[list[LinearLayer]]:
    """The block's layers in stages for true-sequential pruning, from one forward on one batch.

    Layers are taken in the order the block calls them; a layer called on the very same input
    tensor as the layer before it joins that layer's stage (query, key and value; gate and up),
    any other starts a new one. If a layer is called more than once, or not at all, the order is
    not well defined and the whole block is one stage (pruned as without true-sequential).
    """
    seen: list[tuple[LinearLayer, torch.Tensor | None]] = []
    counts = dict.fromkeys(range(len(todo)), 0)

    def record(index: int, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        counts[index] += 1
        if counts[index] == 1:
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            seen.append((todo[index], x))

    handles = [layer.module.register_forward_hook(functools.partial(record, k)) for k, layer in enumerate(todo)]
    try:
        call.run(block, hidden)
    finally:
        for handle in handles:
            handle.remove()
    if any(c != 1 for c in counts.values()):
        return [list(todo)]
    stages: list[list[LinearLayer]] = []
    previous: torch.Tensor | None = None
    for layer, x in seen:
        if stages and x is not None and x is previous:
            stages[-1].append(layer)
        else:
            stages.append([layer])
        previous = x
    return stages


def _refine(
    plan: _Plan, layer: LinearLayer, dense: torch.Tensor, mask: torch.Tensor, stat: InputStats | None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """DSnoT on the dense weight from the method's mask: ``(dense kept weights, refined mask, info)``.

    The layer keeps its **dense** values where the refined mask keeps a weight: DSnoT changes no
    weight value (methods that update weights are refused with DSnoT by :func:`_plan`).
    """
    assert plan.dsnot is not None
    opts = plan.dsnot
    result = refine_dsnot(
        dense,
        mask,
        stat,
        structure=plan.structure,
        max_cycles=opts.max_cycles,
        update_threshold=opts.update_threshold,
        tokens_per_sample=int(plan.ids.shape[1]),
        pow_of_var_regrowing=opts.pow_of_var_regrowing,
        keep_sign=opts.keep_sign,
    )
    refined = result.mask.to(dense.device)
    info = {f"dsnot_{key}": float(value) for key, value in result.info.items()}
    return dense.masked_fill(~refined, 0), refined, info


def _prune_layers(
    plan: _Plan,
    index: int,
    stats: dict[str, InputStats],
    sparsity: float | None,
    layers: list[LinearLayer] | None = None,
) -> list[tuple[LayerReport, torch.Tensor]]:
    """Prune the block's layers with the method; each layer's report and mask (parameter layout, CPU).

    ``sparsity``: what the method gets (the block's OWL sparsity, the target, or ``None`` for N:M).
    ``layers``: the block's layers to prune now (default: all of them).
    """
    done: list[tuple[LayerReport, torch.Tensor]] = []
    for layer in plan.by_block[index] if layers is None else layers:
        old = layer.weight_out_in()
        stat = stats.pop(layer.param_name, None)  # freed once the layer is done (a Hessian is in^2 floats)
        given = old.clone() if plan.dsnot is not None else old  # DSnoT needs the dense weight intact
        result = plan.fn(given, stat if plan.needs != "none" else None, sparsity, plan.structure, **plan.options)
        new, mask = _checked_result(result, layer, old, plan.method)
        info = {key: float(value) for key, value in result.info.items()}
        if plan.dsnot is not None:
            new, mask, more = _refine(plan, layer, old, mask, stat)
            info.update(more)
        layer.write_out_in(new)
        report = LayerReport(layer.param_name, index, tuple(layer.weight.shape), int(mask.sum()), mask.numel(), info)
        done.append((report, layer.to_param_layout(mask).cpu()))
    return done


def _owl_pass(
    model: nn.Module, plan: _Plan, batches: list[dict[str, Any]], token_masks: list[torch.Tensor | None]
) -> tuple[list[float], list[float | None]]:
    """OWL's first pass on the dense model: ``(sparsity per block, outlier ratio per block)``.

    Sequential like the main pass (one block's activations alive at a time), each block fed the
    dense outputs of the block before; only the column norms of each layer's inputs are kept,
    and only until the block's ratio is computed. A block with no pruned layer gets the target
    and no ratio, and is left out of OWL's mean.
    """
    assert plan.owl is not None
    captured = capture_block_inputs(model, plan.blocks, batches, name=plan.blocks_name)
    inputs, captured.hidden = captured.hidden, []
    ratios: dict[str, float] = {}
    for i, block in enumerate(plan.blocks):
        todo = plan.by_block[i]
        stats = {x.param_name: InputStats(x.in_features, means=False) for x in todo}
        outputs = _run_dense(block, captured.calls[i], inputs, token_masks, stats, todo)
        if todo:
            pairs = [(x.weight_out_in(), stats[x.param_name].col_norms()) for x in todo]
            ratios[str(i)] = block_outlier_ratio(pairs, m=plan.owl.m)
            del pairs
        del stats
        inputs = outputs
        del outputs
    del inputs
    sparsities = owl_sparsities(ratios, plan.target, lam=plan.owl.lam)
    n = len(plan.blocks)
    return [sparsities.get(str(i), plan.target) for i in range(n)], [ratios.get(str(i)) for i in range(n)]


def _run_pruned(
    block: nn.Module,
    calls: list[BlockCall],
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor],
    token_masks: list[torch.Tensor | None],
) -> float:
    """Replace each dense output by the pruned block's output; the relative squared error of the block."""
    error_sum, norm_sum = 0.0, 0.0
    for b, hidden in enumerate(inputs):
        pruned = calls[b].run(block, hidden)
        err, norm = _squared(outputs[b], pruned, token_masks[b])
        error_sum, norm_sum = error_sum + err, norm_sum + norm
        outputs[b] = pruned
    if norm_sum > 0:
        return error_sum / norm_sum
    return 0.0 if error_sum == 0 else math.inf


def prune_model(
    model: nn.Module,
    calibration: torch.Tensor | Mapping[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor],
    *,
    method: str = "wanda",
    sparsity: float | None = None,
    structure: str | Structure = "unstructured",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    progress: bool = True,
    batch_size: int = 8,
    options: Mapping[str, Any] | None = None,
    owl: bool | OWL = False,
    dsnot: bool | DSnoT = False,
    true_sequential: bool = False,
) -> OneShotReport:
    """Prune every linear layer of the model's repeated blocks in place, one block at a time.

    Args:
        model: a transformer whose blocks sit in one ``nn.ModuleList`` (found by
            :func:`~sparseforge.oneshot.find_blocks`); any dtype, on one device, not on ``meta``.
        calibration: token ids, a LongTensor ``(n_samples, seqlen)``; or ``(ids, attention_mask)``
            or a mapping with ``input_ids`` and optionally ``attention_mask`` (0/1, same shape;
            padded tokens are left out of the statistics and of the error). Padded samples are
            grouped by length (longest first) and each batch is cut to its longest right-padded
            sample, so trailing padding costs no compute; left padding is kept as given.
        method: a name from :func:`available_methods` (``"magnitude"``, ``"wanda"``, ...).
        sparsity: fraction of zeros of every pruned layer, in [0, 1); default 0.5. With an N:M
            structure the structure fixes it (``None`` or the same value).
        structure: ``"unstructured"``, ``"N:M"`` (kept:group, e.g. ``"2:4"``) or a Structure.
        exclude: glob patterns over module names kept dense (must each match a linear layer,
            except the default ``"lm_head"``).
        progress: show a progress bar and one line per block (on stderr).
        batch_size: calibration samples per forward.
        options: keyword options of the method's layer function, e.g. ``{"percdamp": 0.01}`` for
            SparseGPT (checked against its signature before any work).
        owl: OWL's per-block sparsities (``True`` for :class:`OWL`'s defaults, or ``OWL(lam, m)``):
            a first pass over the dense model measures each block's outlier ratio, and block
            ``b`` is pruned at ``S_b`` (mean over blocks = ``sparsity``, each within ``+-lam``).
            Unstructured only: an N:M structure fixes every layer's sparsity, so it is refused.
        dsnot: refine each layer's mask with DSnoT (``True`` for :class:`DSnoT`'s defaults, or
            ``DSnoT(...)``), on the layer's dense weight and input means and variances, with
            ``tokens_per_sample`` = the calibration sequence length; sparsity (and N:M groups)
            kept exactly; the layer keeps the dense values of its kept weights. Refused with
            ``method="sparsegpt"``: keeping dense values drops SparseGPT's weight update (the
            DSnoT reference does so, using SparseGPT's saliency only as the initial mask), and on
            tiny Llama / GPT-2 that more than doubled the block error, worse than Wanda + DSnoT.
        true_sequential: prune each block in stages, in the order its forward calls its layers
            (layers on the same input together: query/key/value, then the attention output, then
            the first and the second feed-forward layers), and gather each stage's statistics
            with the stages before it already pruned, so e.g. the attention output projection
            is calibrated on the pruned attention's outputs (SparseGPT's "true sequential"
            option). Costs one partial forward of the block per stage after the first. A block
            whose forward calls a layer twice (or never) is pruned in one stage.

    Runs under ``torch.inference_mode()`` in the model's own dtype, in eval mode (restored after).
    Everything is validated before any weight changes; if a method itself fails part-way, the
    blocks before it stay pruned. Returns an :class:`OneShotReport`.
    """
    start = time.perf_counter()
    model = unwrap(model)
    plan = _plan(
        model,
        calibration,
        method=method,
        sparsity=sparsity,
        structure=structure,
        exclude=exclude,
        options=options,
        owl=owl,
        dsnot=dsnot,
    )
    if not isinstance(progress, bool):
        raise SparseforgeError(f"progress={progress!r} is not allowed; allowed: True or False")
    if not isinstance(true_sequential, bool):
        raise SparseforgeError(f"true_sequential={true_sequential!r} is not allowed; allowed: True or False")
    plan.true_sequential = true_sequential
    batches, token_masks = _batches(model, plan.ids, plan.keep, check_int(batch_size, "batch_size", minimum=1))
    layers: list[LayerReport] = []
    blocks: list[BlockReport] = []
    masks: dict[str, BitMask] = {}
    targets: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _BlockProgress(progress, len(plan.blocks), f"{method} {plan.blocks_name}") as bar:
            block_sparsity: list[float] = [plan.target] * len(plan.blocks)
            ratios: list[float | None] = [None] * len(plan.blocks)
            if plan.owl is not None:
                block_sparsity, ratios = _owl_pass(model, plan, batches, token_masks)
            captured = capture_block_inputs(model, plan.blocks, batches, name=plan.blocks_name)
            inputs, captured.hidden = captured.hidden, []  # the loop below holds the only reference
            for i, block in enumerate(plan.blocks):
                t0 = time.perf_counter()
                todo = plan.by_block[i]
                hessian = plan.needs == "hessian"
                gather = plan.needs != "none" or plan.dsnot is not None
                means = plan.dsnot is not None or plan.method not in _NO_MEANS
                stages = [todo]
                if plan.true_sequential and gather and len(todo) > 1:
                    stages = _stages(block, captured.calls[i][0], inputs[0], todo)
                given = None if plan.method_sparsity is None else block_sparsity[i]
                outputs: list[torch.Tensor] = []
                for k, stage in enumerate(stages):
                    stats = (
                        {x.param_name: InputStats(x.in_features, hessian=hessian, means=means) for x in stage}
                        if gather
                        else {}
                    )
                    # the first stage runs the dense block to the end (its outputs are the block's
                    # reference); later ones run it with the earlier stages pruned, up to their last layer
                    stop = None if k == 0 else stage[-1].module
                    got = _run_dense(block, captured.calls[i], inputs, token_masks, stats, stage, stop_after=stop)
                    outputs = got if k == 0 else outputs
                    for report, mask in _prune_layers(plan, i, stats, given, stage):
                        layers.append(report)
                        masks[report.name] = BitMask.pack(mask)
                        targets[report.name] = block_sparsity[i]
                    del stats
                # a block with nothing pruned (all excluded) has outputs equal to the dense ones already
                error = _run_pruned(block, captured.calls[i], inputs, outputs, token_masks) if todo else 0.0
                inputs = outputs  # the previous block's activations are freed here
                del outputs
                seconds = time.perf_counter() - t0
                blocks.append(BlockReport(i, f"{plan.blocks_name}.{i}", error, seconds, block_sparsity[i], ratios[i]))
                bar.done(blocks[-1], len(todo))
            del inputs
    finally:
        model.train(was_training)
    structure_name = f"{plan.structure.n_keep}:{plan.structure.m}" if isinstance(plan.structure, NM) else "unstructured"
    return OneShotReport(
        method=plan.method,
        structure=structure_name,
        sparsity=plan.target,
        blocks_name=plan.blocks_name,
        layers=layers,
        blocks=blocks,
        packed_masks=masks,
        targets=targets,
        dense=plan.dense,
        samples=int(plan.ids.shape[0]),
        seqlen=int(plan.ids.shape[1]),
        tokens=int(plan.keep.sum()) if plan.keep is not None else int(plan.ids.numel()),
        seconds=time.perf_counter() - start,
        per_block_arguments=captured.per_block,
        owl=plan.owl,
        dsnot=plan.dsnot,
        true_sequential=plan.true_sequential,
    )
