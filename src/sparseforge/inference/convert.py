"""``convert(model)``: replace pruned Linear / 1x1 Conv layers by fast packed inference modules.

The input model is deep-copied unless ``inplace=True``. Every eligible layer (``nn.Linear``,
transformers' ``Conv1D`` of GPT-2 (a linear layer whose weight is stored transposed, ``(in, out)``),
``nn.Conv1d`` / ``nn.Conv2d`` with kernel size 1, stride 1, padding 0, dilation 1, groups 1,
float32 weights on CPU) becomes a :class:`~.modules.SparseLinear` whose path per batch size
(rows = batch x leading dims) is chosen by measurement (``autotune=True``) or by a rule.
Layers where dense wins everywhere stay ``nn.Linear``/``nn.Conv`` and are listed in the report
with the reason (a warning also says how many). Layers of other types or dtypes are listed as
skipped. A model with no Linear / Conv layer at all raises :class:`SparseforgeError`.

A :class:`~sparseforge.activations.ThresholdedLinear` (inputs with ``|x| <= threshold`` dropped)
never loses its thresholding: it becomes an :class:`~.modules.InputSparseLinear` (one input row
runs the sparse-input kernel when it measured faster than the plain path at the layer's calibrated
input sparsity, up to a measured crossover of active inputs; more rows run what the plain layer
would, on the thresholded input), or stays a ``ThresholdedLinear`` where neither helps.

Decisions timed while other processes kept the cores busy are flagged in the report
(``LayerDecision.under_load``) and by a warning; :func:`retune` measures a converted model again
(every ``SparseLinear`` and every dense-kept layer with zeros) and rebuilds it with the new choices.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, TypeGuard, cast

import torch
from torch import nn

from ..activations.thresholded import ThresholdedLinear
from ..errors import SparseforgeError
from ..masks import check_materialized, check_module
from .autotune import InputSparseChoice, LayerChoice, measure_input_sparse, measure_layer, rule_input_sparse, rule_layer
from .formats import PairedCSR
from .fusion import Fusion, PlannedFusion, apply_fusions, plan_fusions
from .kernels import unavailable_reason
from .modules import BatchPlan, InputSparseLinear, SparseLinear

__all__ = ["LayerDecision", "ConversionReport", "convert", "retune", "check_model"]

#: Upper bound of ``reps`` (timed calls per candidate and batch size).
MAX_REPS = 1000


@dataclass(frozen=True)
class LayerDecision:
    """What convert did with one layer: ``action`` is ``"sparse"``, ``"dense"`` or ``"skipped"``.

    ``under_load``: some batch size was decided from noisy timings (other processes competing for
    the cores); re-tune on a quiet machine. ``predicted``: the cost model's speedup over dense per
    candidate format and batch size. For a thresholded layer (``ThresholdedLinear``,
    ``InputSparseLinear``): ``input_sparsity`` is its calibrated input sparsity, ``crossover`` the
    largest fraction of active inputs at which one row runs the sparse-input kernel (``None``: it
    never does), and ``format`` names the sparse-input format (``"input-sparse"``,
    ``"input-sparse+bitmask"``) when it runs, else the plain formats.
    """

    name: str
    layer_type: str
    #: the weight's shape as the layer computes it: ``(out, in)`` for Linear and GPT-2's Conv1D
    #: (whose parameter is stored ``(in, out)``), ``(out, in, 1[, 1])`` for a 1x1 convolution
    shape: tuple[int, ...]
    sparsity: float
    action: str
    format: str | None
    plan: str
    reason: str
    timings_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    under_load: bool = False
    predicted: dict[str, dict[int, float]] = field(default_factory=dict)
    input_sparsity: float | None = None
    crossover: float | None = None


@dataclass
class ConversionReport:
    """Per-layer decisions of :func:`convert`; ``str(report)`` is a readable table."""

    layers: list[LayerDecision]
    batch_sizes: tuple[int, ...]
    autotune: bool
    #: activations fused into the layer before them (:mod:`.fusion`)
    fusions: list[Fusion] = field(default_factory=list)

    @property
    def sparse_layers(self) -> list[str]:
        return [d.name for d in self.layers if d.action == "sparse"]

    @property
    def dense_layers(self) -> list[str]:
        return [d.name for d in self.layers if d.action != "sparse"]

    @property
    def under_load_layers(self) -> list[str]:
        """Layers decided from noisy timings: re-tune them on a quiet machine (:func:`retune`)."""
        return [d.name for d in self.layers if d.under_load]

    def __str__(self) -> str:
        head = f"sparseforge.convert: {len(self.sparse_layers)} of {len(self.layers)} layers run sparse (batch sizes {list(self.batch_sizes)}, {'measured autotune' if self.autotune else 'rule, no measurement'})"
        if self.under_load_layers:
            head += f"; {len(self.under_load_layers)} decided under load (re-tune on a quiet machine: sparseforge.inference.retune)"
        lines = [head]
        for d in self.layers:
            inputs = f", input sparsity {d.input_sparsity:.3f}" if d.input_sparsity is not None else ""
            lines.append(
                f"  {d.name or '<root>'} [{d.layer_type} {'x'.join(map(str, d.shape))}, sparsity {d.sparsity:.3f}{inputs}] -> {d.action.upper()}"
                f"{' ' + d.format if d.format else ''}{' (UNDER LOAD)' if d.under_load else ''}: {d.reason}"
            )
        for f in self.fusions:
            chained = f"; {', '.join(f.chained)} reads its output transposed, in place" if f.chained else ""
            lines.append(f"  fused: {f.replaced} ({f.activation}) into {f.layer}{chained}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------- argument checks
def check_model(model: object, name: str = "model") -> nn.Module:
    """``model`` if it is a ``torch.nn.Module`` with real tensors; else a one-line :class:`SparseforgeError`."""
    module = check_module(model, name)
    check_materialized(module, name)
    return module


def _is_int(v: object) -> TypeGuard[numbers.Integral]:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_batch_sizes(batch_sizes: object) -> tuple[int, ...]:
    allowed = "a non-empty tuple or list of ints >= 1"
    if not isinstance(batch_sizes, (tuple, list)) or not batch_sizes:
        raise SparseforgeError(f"batch_sizes={batch_sizes!r} is not allowed; allowed: {allowed}")
    for b in batch_sizes:
        if not _is_int(b) or int(b) < 1:
            raise SparseforgeError(f"batch_sizes={batch_sizes!r} is not allowed ({b!r}); allowed: {allowed}")
    return tuple(sorted({int(b) for b in batch_sizes}))


def _check_args(*, reps: object, max_formats: object, min_sparsity: object, **flags: object) -> None:
    if not _is_int(reps) or not 1 <= int(reps) <= MAX_REPS:
        raise SparseforgeError(f"reps={reps!r} is not allowed; allowed: an int in [1, {MAX_REPS}]")
    if not _is_int(max_formats) or int(max_formats) not in (1, 2):
        raise SparseforgeError(f"max_formats={max_formats!r} is not allowed; allowed: 1 or 2")
    if (
        not isinstance(min_sparsity, numbers.Real)
        or isinstance(min_sparsity, bool)
        or not (0.0 <= float(min_sparsity) < 1.0)
    ):
        raise SparseforgeError(f"min_sparsity={min_sparsity!r} is outside the allowed range [0, 1)")
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise SparseforgeError(f"{key}={value!r} is not allowed; allowed: True or False")


# ------------------------------------------------------------------------------------ layers
#: The layers convert rebuilds (see _layer_types); transformers' Conv1D is typed as a Module.
_Layer = nn.Linear | nn.Conv1d | nn.Conv2d | SparseLinear | Any


@functools.lru_cache(maxsize=1)
def _hf_conv1d_type() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` (GPT-2), or ``None`` without transformers (an optional dependency)."""
    try:
        module = importlib.import_module("transformers.pytorch_utils")
    except ImportError:
        return None
    conv1d = getattr(module, "Conv1D", None)
    return conv1d if isinstance(conv1d, type) and issubclass(conv1d, nn.Module) else None


def is_hf_conv1d(m: object) -> bool:
    """Whether ``m`` is transformers' ``Conv1D`` with a 2-D ``(in, out)`` weight (a transposed Linear).

    transformers is imported only when a module that is none of torch's own layers is checked,
    so a model without such modules never loads it.
    """
    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, SparseLinear)) or not isinstance(m, nn.Module):
        return False
    if not any(c.__name__ == "Conv1D" for c in type(m).__mro__):  # cheap guard: no import for other modules
        return False
    conv1d = _hf_conv1d_type()
    weight = getattr(m, "weight", None)
    return conv1d is not None and isinstance(m, conv1d) and isinstance(weight, torch.Tensor) and weight.dim() == 2


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, _LAYER_TYPES) or is_hf_conv1d(m)


def _conv_is_pointwise(m: nn.Conv1d | nn.Conv2d) -> bool:
    k = m.kernel_size
    return (
        all(s == 1 for s in k)
        and all(s == 1 for s in m.stride)
        and all(d == 1 for d in m.dilation)
        and m.groups == 1
        and m.padding in ((0,), (0, 0), "valid")
        and m.padding_mode == "zeros"
    )


def _weight_2d(m: _Layer) -> torch.Tensor:
    if isinstance(m, SparseLinear):
        if m.dense_weight is not None:
            return m.dense_weight.detach()
        assert m.packed is not None  # SparseLinear refuses neither a packed nor a dense weight
        return m.packed.to_dense().detach()
    w = m.weight.detach()
    if is_hf_conv1d(m):
        return w.t().contiguous()  # stored (in, out); computed as (out, in) like nn.Linear
    return w.reshape(w.shape[0], -1) if w.dim() > 2 else w


def _layout(m: _Layer) -> str:
    if isinstance(m, SparseLinear):
        return m.layout
    if isinstance(m, nn.Linear) or is_hf_conv1d(m):
        return "linear"
    return "conv1d" if isinstance(m, nn.Conv1d) else "conv2d"


def _shape(m: _Layer) -> tuple[int, ...]:
    """The shape reported for ``m``: ``(out, in)`` for Linear, Conv1D and SparseLinear."""
    if isinstance(m, SparseLinear):
        return (m.out_features, m.in_features)
    if is_hf_conv1d(m):
        return (int(m.weight.shape[1]), int(m.weight.shape[0]))
    return tuple(m.weight.shape)


def _skip_reason(m: _Layer) -> str | None:
    if isinstance(m, SparseLinear):
        return None  # float32 on CPU by construction
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and not _conv_is_pointwise(m):
        return "only 1x1 convolutions with stride 1, padding 0, dilation 1, groups 1 are converted"
    if m.weight.dtype != torch.float32:
        return f"weight dtype {m.weight.dtype} is not supported (float32 only)"
    if m.weight.device.type != "cpu":
        return f"weight on {m.weight.device} (cpu only)"
    if m.bias is not None and m.bias.dtype != torch.float32:
        return f"bias dtype {m.bias.dtype} is not supported (float32 only)"
    return None


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def build_module(m: _Layer, choice: LayerChoice, batch_sizes: tuple[int, ...] | None = None) -> SparseLinear:
    """A :class:`SparseLinear` for layer ``m`` (a Linear / Conv1D / 1x1 conv or a SparseLinear) following
    ``choice`` (keeps the dense weight only if needed); ``batch_sizes`` are recorded for :func:`retune`."""
    plan = BatchPlan.from_choices(choice.choices)
    w = _weight_2d(m)
    dense = w.clone().contiguous() if "dense" in plan.paths else None
    fused = m if isinstance(m, SparseLinear) else None  # a re-tuned layer keeps its fused epilogue
    new = SparseLinear(
        choice.packed,
        dense,
        m.bias,
        plan,
        _layout(m),
        shape=(w.shape[0], w.shape[1]),
        extra=choice.extra,
        activation=fused.activation if fused is not None else None,
        transposed_output=fused.transposed_output if fused is not None else False,
    )
    new.tuned_batch_sizes = tuple(batch_sizes) if batch_sizes is not None else tuple(sorted(choice.choices))
    return new


def _dense_module(m: SparseLinear) -> nn.Module:
    """The plain ``nn.Linear`` / 1x1 ``nn.Conv1d`` / ``nn.Conv2d`` that ``m`` computes (for a layer
    that :func:`retune` now keeps dense); a ``ThresholdedLinear`` with the same threshold for an
    :class:`~.modules.InputSparseLinear`."""
    w = _weight_2d(m).clone()
    bias = m.bias
    has_bias = bias is not None
    new: nn.Linear | nn.Conv1d | nn.Conv2d
    if isinstance(m, InputSparseLinear):
        new = ThresholdedLinear(
            m.in_features,
            m.out_features,
            bias=has_bias,
            threshold=float(m.input_threshold),
            sparsity=float(m.input_sparsity),
        )
    elif m.layout == "linear":
        new = nn.Linear(m.in_features, m.out_features, bias=has_bias)
    elif m.layout == "conv1d":
        new, w = nn.Conv1d(m.in_features, m.out_features, 1, bias=has_bias), w[:, :, None]
    else:
        new, w = nn.Conv2d(m.in_features, m.out_features, 1, bias=has_bias), w[:, :, None, None]
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            assert new.bias is not None  # built with bias=has_bias
            new.bias.copy_(bias)
    return new.eval()


_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, SparseLinear)


@dataclass(frozen=True)
class _Context:
    """How a layer runs in the model, for its measurement: the activation that will be fused into
    it, the batch sizes at which its input arrives transposed, whether its output is handed on
    transposed (see :mod:`.fusion`), and the batch sizes at which the layer before it (in module
    order) runs dense."""

    activation: str | None = None
    transposed_in: frozenset[int] = frozenset()
    transposed_output: bool = False
    after_dense: frozenset[int] = frozenset()


def _choose(
    name: str,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    sizes: tuple[int, ...],
    autotune: bool,
    reps: int,
    max_formats: int,
    context: _Context | None = None,
) -> LayerChoice:
    """The plain layer's choice (measured or by rule); dense everywhere, with a warning, when a kernel fails."""
    ctx = context or _Context()
    try:
        if not autotune:
            return rule_layer(w, sizes)
        return measure_layer(
            w,
            bias,
            sizes,
            reps=reps,
            max_formats=max_formats,
            activation=ctx.activation,
            transposed_in=ctx.transposed_in,
            transposed_output=ctx.transposed_output,
            after_dense=ctx.after_dense,
        )
    except Exception as exc:  # a kernel that fails to compile must never crash convert
        warnings.warn(
            f"sparseforge.convert: kernel failed for {name!r}, left dense: {type(exc).__name__}: {exc}", stacklevel=4
        )
        return LayerChoice(None, dict.fromkeys(sizes, "dense"), f"kernel failed: {type(exc).__name__}")


def _convert_thresholded(
    m: ThresholdedLinear | InputSparseLinear,
    name: str,
    w: torch.Tensor,
    sparsity: float,
    sizes: tuple[int, ...],
    autotune: bool,
    reps: int,
    min_sparsity: float,
    max_formats: int,
    kernel_problem: str | None,
) -> tuple[InputSparseLinear | None, LayerDecision]:
    """Decide a thresholded layer: ``(new module or None to keep it thresholded and dense, decision)``.

    The plain choice (dense, or a packed format where the weight has zeros) is made as for any
    layer, at ``sizes`` plus one row; then the sparse-input kernel is timed against the plain
    path's one-row call (:func:`~.autotune.measure_input_sparse`). An ``InputSparseLinear`` is
    built when either beats dense; it thresholds its input on every path.
    """
    kind = type(m).__name__
    shape = (int(w.shape[0]), int(w.shape[1]))
    threshold, in_sparsity = float(m.input_threshold), float(m.input_sparsity)
    sizes1 = tuple(sorted({*sizes, 1}))

    def decision(
        action: str, fmt: str | None, plan: str, reason: str, *parts: LayerChoice | InputSparseChoice
    ) -> LayerDecision:
        timings = {k: v for p in parts for k, v in p.timings_ms.items()}
        predicted = {k: v for p in parts for k, v in p.predicted.items()}
        cross = next((p.crossover for p in parts if isinstance(p, InputSparseChoice) and p.packed is not None), None)
        under = any(p.under_load for p in parts)
        return LayerDecision(
            name, kind, shape, sparsity, action, fmt, plan, reason, timings, under, predicted, in_sparsity, cross
        )

    if kernel_problem:
        return None, decision("dense", None, "all: dense (thresholded)", kernel_problem)
    if sparsity <= min_sparsity or sparsity == 0.0:
        plain = LayerChoice(
            None,
            dict.fromkeys(sizes1, "dense"),
            f"dense: sparsity {sparsity:.3f} <= min_sparsity {min_sparsity} (no zeros to exploit)",
        )
    else:
        plain = _choose(name, w, m.bias, sizes1, autotune, reps, max_formats)
    try:
        ins = (
            measure_input_sparse(w, m.bias, threshold, in_sparsity, plain, reps=reps)
            if autotune
            else rule_input_sparse(w, in_sparsity)
        )
    except Exception as exc:  # as for the plain kernels: never crash convert
        warnings.warn(
            f"sparseforge.convert: sparse-input kernel failed for {name!r}: {type(exc).__name__}: {exc}", stacklevel=3
        )
        ins = InputSparseChoice(None, 0, f"sparse-input kernel failed: {type(exc).__name__}")
    reason = f"one row: {ins.reason}; plain path: {plain.reason}"
    if ins.packed is None and plain.packed is None:
        return None, decision("dense", None, "all: dense (thresholded)", reason, plain, ins)
    plan = BatchPlan.from_choices(plain.choices)
    new = InputSparseLinear(
        ins.packed,
        ins.max_active,
        threshold,
        in_sparsity,
        plain.packed,
        w.clone().contiguous() if "dense" in plan.paths else None,
        m.bias,
        plan,
        shape=shape,
        extra=plain.extra,
    )
    new.tuned_batch_sizes = sizes1
    return new, decision("sparse", new.format_names, new.describe_plan(), reason, plain, ins)


def _context(
    name: str, m: _Layer, planned: list[PlannedFusion], pairs_at: dict[str, set[int]], sizes: tuple[int, ...]
) -> _Context:
    """The measurement context of layer ``name`` (``pairs_at``: the batch sizes at which each layer
    converted so far runs the pairs kernel)."""
    activation = m.activation if isinstance(m, SparseLinear) else None
    out_t = isinstance(m, SparseLinear) and m.transposed_output
    for p in planned:
        if p.layer == name:
            activation = p.activation
        if name in p.feeds and p.consumer is not None:
            out_t = True
    transposed_in: set[int] = set()
    for p in planned:
        if p.consumer == name and all(f in pairs_at for f in p.feeds):
            transposed_in |= set.intersection(*(pairs_at[f] for f in p.feeds))
    return _Context(activation, frozenset(transposed_in & set(sizes)), out_t)


def _convert_layers(
    out: nn.Module,
    sizes: tuple[int, ...],
    autotune: bool,
    reps: int,
    min_sparsity: float,
    max_formats: int,
    planned: list[PlannedFusion] | None = None,
) -> tuple[nn.Module, list[LayerDecision]]:
    """Decide and rebuild every Linear / conv / SparseLinear layer of ``out`` in place (the root too: returned).

    ``planned``: the fusions :func:`.fusion.plan_fusions` found; each layer is measured in its
    context (:class:`_Context`)."""
    layers = [n for n, m in out.named_modules() if _is_layer(m)]
    planned = planned or []
    pairs_at: dict[str, set[int]] = {}
    dense_before: frozenset[int] = frozenset()  # where the previous layer runs dense (none before the first)
    decisions: list[LayerDecision] = []
    kernel_problem = unavailable_reason()
    if kernel_problem:
        warnings.warn(
            f"sparseforge.convert: kernels unavailable, every layer stays dense: {kernel_problem}", stacklevel=3
        )
    with torch.inference_mode():
        for name in layers:
            m = cast(_Layer, out.get_submodule(name) if name else out)  # layers holds only _is_layer modules
            was_sparse = isinstance(m, SparseLinear)
            kind = f"SparseLinear({m.layout})" if was_sparse else type(m).__name__
            skip = _skip_reason(m)
            w = _weight_2d(m)
            shape = _shape(m)
            sparsity = float((w == 0).float().mean()) if w.numel() else float("nan")
            new: nn.Module | None = None
            if skip is not None:
                decisions.append(LayerDecision(name, kind, shape, sparsity, "skipped", None, "-", skip))
                dense_before = frozenset(sizes)  # left as it is: a PyTorch layer
                continue
            if isinstance(m, (ThresholdedLinear, InputSparseLinear)):
                # the thresholding must survive: InputSparseLinear, or the layer kept as it is
                new, decision = _convert_thresholded(
                    m, name, w, sparsity, sizes, autotune, reps, min_sparsity, max_formats, kernel_problem
                )
            elif kernel_problem:
                decision = LayerDecision(name, kind, shape, sparsity, "dense", None, "all: dense", kernel_problem)
            elif sparsity <= min_sparsity or sparsity == 0.0:
                decision = LayerDecision(
                    name,
                    kind,
                    shape,
                    sparsity,
                    "dense",
                    None,
                    "all: dense",
                    f"sparsity {sparsity:.3f} <= min_sparsity {min_sparsity} (no zeros to exploit)",
                )
            else:
                ctx = dataclasses.replace(_context(name, m, planned, pairs_at, sizes), after_dense=dense_before)
                choice = _choose(name, w, m.bias, sizes, autotune, reps, max_formats, ctx)
                if choice.packed is None:
                    decision = LayerDecision(
                        name,
                        kind,
                        shape,
                        sparsity,
                        "dense",
                        None,
                        "all: dense",
                        choice.reason,
                        choice.timings_ms,
                        choice.under_load,
                        choice.predicted,
                    )
                else:
                    new = build_module(m, choice, sizes)
                    pairs_at[name] = {b for b in sizes if isinstance(new.format_for(b), PairedCSR)}
                    decision = LayerDecision(
                        name,
                        kind,
                        shape,
                        sparsity,
                        "sparse",
                        new.format_names,
                        new.describe_plan(),
                        choice.reason,
                        choice.timings_ms,
                        choice.under_load,
                        choice.predicted,
                    )
            if new is None and isinstance(m, SparseLinear):  # was_sparse
                if m.activation is not None and not isinstance(m, InputSparseLinear):
                    # dense everywhere now, but its activation module was fused away: keep it here
                    new = SparseLinear(
                        None,
                        w.clone().contiguous(),
                        m.bias,
                        BatchPlan(((1, "dense"),)),
                        m.layout,
                        shape=(m.out_features, m.in_features),
                        activation=m.activation,
                    )
                else:
                    new = _dense_module(m)  # a re-tuned layer that now runs dense everywhere
            if new is not None:
                if name:
                    _set_submodule(out, name, new)
                else:
                    out = new
            decisions.append(decision)
            final = new if new is not None else m
            dense_before = frozenset(
                b for b in sizes if not isinstance(final, SparseLinear) or final.format_for(b) is None
            )
    return out, decisions


def _warn_summary(report: ConversionReport, what: str) -> None:
    n_dense = len(report.dense_layers)
    if not report.sparse_layers:
        warnings.warn(
            f"sparseforge.{what}: nothing converted, all {n_dense} layers run dense (see report)", stacklevel=3
        )
    elif n_dense:
        warnings.warn(
            f"sparseforge.{what}: {n_dense} of {len(report.layers)} layers run dense: {', '.join(report.dense_layers)} (see report)",
            stacklevel=3,
        )
    busy = report.under_load_layers
    if busy:
        warnings.warn(
            f"sparseforge.{what}: {len(busy)} of {len(report.layers)} layers were decided while other processes kept the CPU busy "
            f"(noisy timings): {', '.join(n or '<root>' for n in busy)}; re-tune them on a quiet machine with "
            f"sparseforge.inference.retune(model)",
            stacklevel=3,
        )


def convert(
    model: nn.Module,
    *,
    batch_sizes: tuple[int, ...] = (1,),
    autotune: bool = True,
    inplace: bool = False,
    reps: int = 5,
    min_sparsity: float = 0.0,
    max_formats: int = 2,
    fuse: bool = True,
) -> tuple[nn.Module, ConversionReport]:
    """Return ``(converted_model, report)`` with pruned layers packed for fast CPU inference.

    Args:
        model: a model whose ``nn.Linear`` / GPT-2 ``Conv1D`` / 1x1 conv weights contain exact zeros
            (not on the meta device).
        batch_sizes: input rows per call to tune for (batch x leading dims); each one is measured.
        autotune: measure every candidate format against dense (``True``) or use the rule in
            :func:`.autotune.rule_layer` (``False``).
        inplace: modify ``model`` itself instead of a deep copy.
        reps: timed calls per candidate and batch size (median is used), 1 to 1000.
        min_sparsity: layers with a lower sparsity (fraction of zeros) stay dense without timing.
        max_formats: packed formats a layer may keep (1 or 2): with 2, a second format is kept
            for the batch sizes where it beats the first by the margin (more memory, faster).
        fuse: fuse an activation module into the converted layer before it where the model's
            structure allows (:mod:`.fusion`; the module becomes ``nn.Identity``), and let a
            widening layer hand its output to the next converted layer in the transposed layout.

    Layers decided from noisy timings (the machine busy with other processes) are flagged in the
    report (``under_load``) and by a warning; :func:`retune` re-measures them later.

    Raises:
        SparseforgeError: if the model has no Linear / Conv layer, or an argument is invalid.
    """
    check_model(model)
    sizes = _check_batch_sizes(batch_sizes)
    _check_args(
        reps=reps, max_formats=max_formats, min_sparsity=min_sparsity, autotune=autotune, inplace=inplace, fuse=fuse
    )
    if not any(_is_layer(m) for m in model.modules()):
        raise SparseforgeError(
            f"nothing to convert: {type(model).__name__} has no nn.Linear, transformers Conv1D or 1x1 nn.Conv1d/Conv2d layer"
        )
    out = model if inplace else copy.deepcopy(model)
    planned = plan_fusions(out) if fuse else []
    out, decisions = _convert_layers(out, sizes, autotune, int(reps), float(min_sparsity), int(max_formats), planned)
    fusions = apply_fusions(out, planned) if fuse else []
    fused = {f.layer: f.activation for f in fusions}
    decisions = [
        dataclasses.replace(d, format=f"{d.format}+{fused[d.name]}") if d.name in fused and d.format else d
        for d in decisions
    ]
    report = ConversionReport(decisions, sizes, autotune, fusions)
    _warn_summary(report, "convert")
    return out, report


def retune(
    model: nn.Module,
    *,
    batch_sizes: tuple[int, ...] | None = None,
    inplace: bool = True,
    reps: int = 5,
    min_sparsity: float = 0.0,
    max_formats: int = 2,
) -> tuple[nn.Module, ConversionReport]:
    """Measure a converted model again and rebuild its layers with the new choices.

    Every :class:`SparseLinear` (from :func:`convert` or :func:`~.serialization.load_converted`),
    every ``nn.Linear`` / 1x1 conv that has zeros (a layer ``convert`` kept dense) and every
    ``ThresholdedLinear`` / ``InputSparseLinear`` is timed as :func:`convert` would; a SparseLinear
    that now runs dense everywhere becomes a plain ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``
    again (an ``InputSparseLinear``: a ``ThresholdedLinear`` with its threshold). Use it after a conversion on a busy machine
    (``report.under_load_layers``), or on a different machine.

    Args:
        batch_sizes: default: the batch sizes the layers were tuned for (the bounds of their
            plans after :func:`~.serialization.load_converted`).
        inplace: modify ``model`` (default) or a deep copy. The model is returned either way (a
            root layer is replaced, not modified).
        reps: as for :func:`convert`.
        min_sparsity: as for :func:`convert`.
        max_formats: as for :func:`convert`.

    Returns ``(model, report)``; raises :class:`SparseforgeError` for invalid arguments.
    """
    check_model(model)
    if batch_sizes is None:
        found: set[int] = set()
        for m in model.modules():
            if isinstance(m, SparseLinear):
                found.update(getattr(m, "tuned_batch_sizes", None) or (bound for bound, _ in m.plan.steps))
        sizes = tuple(sorted(found)) or (1,)
    else:
        sizes = _check_batch_sizes(batch_sizes)
    _check_args(reps=reps, max_formats=max_formats, min_sparsity=min_sparsity, inplace=inplace)
    if not any(_is_layer(m) for m in model.modules()):
        raise SparseforgeError(
            f"nothing to re-tune: {type(model).__name__} has no SparseLinear, nn.Linear or 1x1 nn.Conv1d/Conv2d layer"
        )
    out = model if inplace else copy.deepcopy(model)
    out, decisions = _convert_layers(out, sizes, True, int(reps), float(min_sparsity), int(max_formats))
    report = ConversionReport(decisions, sizes, True)
    _warn_summary(report, "retune")
    return out, report
