"""Sparse Wide: the hidden widths of a chain of layers widened by ``k = 1 / sqrt(1 - s)``.

The chain is read from one forward pass of an example batch (hooks on every leaf module, in
eval mode, without gradients): the Linear / Conv1d / Conv2d layers in call order, each taking the
previous leaf's output (or a flattened view of it) and nothing else, so a residual connection, a
branch or an attention block is refused. Between two layers only activations, dropout, pooling,
``nn.Flatten`` and ``BatchNorm1d`` / ``BatchNorm2d`` / ``LayerNorm`` may run; norms are rebuilt
at the new width.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SparseforgeError
from .base import REPLACEABLE, LayerSpec, in_out
from .budget import sparsity_bound

__all__ = ["SUPPORTED", "widen"]

#: What :func:`widen` supports, for messages and docs.
SUPPORTED = (
    "a chain of Linear/Conv1d/Conv2d layers, each taking the previous one's output through activations, "
    "dropout, pooling, flattening, BatchNorm1d/2d or LayerNorm (nn.Sequential, or a forward that only "
    "flattens between layers)"
)
_PASS: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)


@dataclass
class _Call:
    """One leaf module's call: its input (first argument) and output, where they are tensors."""

    name: str
    module: nn.Module
    x: torch.Tensor | None
    y: torch.Tensor | None


@dataclass
class _Edge:
    """How the tensor between two chained layers looks at a point: its channel axis (1 for a
    convolution's ``(batch, channels, ...)``, -1 for features last) and how many values each
    channel of the widened layer has become (``factor``: the flattened positions)."""

    axis: int
    factor: int = 1


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _probe(model: nn.Module, example: Any) -> tuple[list[_Call], Any]:
    """Every leaf module's calls in order, and the model's output, from one eval-mode forward pass."""
    calls: list[_Call] = []

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            calls.append(_Call(name, module, x, output if isinstance(output, torch.Tensor) else None))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and not any(m.children())]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:  # the model's own error, reported in one line
        raise SparseforgeError(
            f"wide traces the model with one forward pass, which failed ({_one_line(exc)}); "
            "allowed: example= one input batch the model takes"
        ) from None
    finally:
        for m, mode in modes:
            m.training = mode
        for h in handles:
            h.remove()
    return calls, out


def _same_storage(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """``b`` is ``a`` or a view of it with as many values (a reshape, not a new tensor)."""
    if a is None or b is None:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.numel() == b.numel()


def _chain(model: nn.Module, calls: list[_Call], out: Any, excluded: Collection[str]) -> list[int]:
    """Indices in ``calls`` of the replaceable layers, after checking that they form a chain."""
    counts = Counter(c.name for c in calls)
    for name, module in model.named_modules():
        if isinstance(module, REPLACEABLE) and (counts[name] > 1 or (counts[name] == 0 and name not in excluded)):
            raise SparseforgeError(
                f"wide needs layer {name!r} called once per forward pass, not {counts[name]} times; allowed: {SUPPORTED}"
            )
    layers = [i for i, c in enumerate(calls) if isinstance(c.module, REPLACEABLE)]
    if not layers:
        raise SparseforgeError(f"wide found no layer called in the forward pass; allowed: {SUPPORTED}")
    for i in range(layers[0] + 1, len(calls)):
        if counts[calls[i].name] > 1:
            raise SparseforgeError(f"wide found {calls[i].name!r} called more than once; allowed: {SUPPORTED}")
        if not _same_storage(calls[i - 1].y, calls[i].x):
            raise SparseforgeError(
                f"layer {calls[i].name!r} does not take the output of {calls[i - 1].name!r} (a residual connection, "
                f"a branch or an operation between them); wide supports {SUPPORTED}"
            )
    if not isinstance(out, torch.Tensor) or not _same_storage(calls[-1].y, out):
        raise SparseforgeError(
            f"the model's output is not the output of its last module {calls[-1].name!r}; wide supports {SUPPORTED}"
        )
    return layers


def _reshape(edge: _Edge, before: torch.Tensor, after: torch.Tensor, name: str, width: int) -> _Edge:
    """The edge after ``before`` became ``after``: unchanged, or flattened from channels to features."""
    if before.shape == after.shape:
        return edge
    if edge.axis == 1 and before.dim() > 2 and after.dim() == 2 and after.shape[0] == before.shape[0]:
        return _Edge(-1, edge.factor * math.prod(before.shape[2:]))
    raise SparseforgeError(
        f"wide cannot follow the {width} widened channels into {name!r}: its input is reshaped from "
        f"{tuple(before.shape)} to {tuple(after.shape)}; allowed: flattening (batch, channels, ...) to (batch, features)"
    )


def _passes(call: _Call, edge: _Edge) -> bool:
    """Whether ``call`` keeps the channel axis as it is (activation, dropout, pooling)."""
    module, x, y = call.module, call.x, call.y
    elementwise = type(module).__module__ == "torch.nn.modules.activation" and next(module.parameters(), None) is None
    if not (isinstance(module, _PASS) or elementwise) or x is None or y is None:
        return False
    return y.dim() == x.dim() and y.shape[0] == x.shape[0] and y.shape[edge.axis] == x.shape[edge.axis]


def _norm_size(call: _Call, edge: _Edge) -> int | None:
    """The size a BatchNorm1d/2d or LayerNorm normalises over, where it is the widened channel axis."""
    module, x = call.module, call.x
    if x is None:
        return None
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and (edge.axis == 1 or x.dim() == 2):
        return module.num_features
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and (edge.axis == -1 or x.dim() == 2):
        return module.normalized_shape[0]
    return None


def _segment(calls: list[_Call], start: int, stop: int, width: int) -> tuple[dict[str, int], int]:
    """Check the leaves from ``calls[start]`` (a layer of ``width`` outputs) to ``calls[stop]`` (the
    next layer); return the norms in between (name -> values per channel) and the next layer's
    inputs per channel (the flattened positions; 1 without a flatten)."""
    first = calls[start]
    assert first.y is not None
    edge = _Edge(1 if isinstance(first.module, (nn.Conv1d, nn.Conv2d)) and first.y.dim() > 2 else -1)
    norms: dict[str, int] = {}
    prev = first.y
    for call in calls[start + 1 : stop]:
        assert call.x is not None
        edge = _reshape(edge, prev, call.x, call.name, width)
        size = _norm_size(call, edge)
        if isinstance(call.module, nn.Flatten) and call.y is not None:
            edge = _reshape(edge, call.x, call.y, call.name, width)
        elif size is not None:
            if size != width * edge.factor:
                raise SparseforgeError(
                    f"wide cannot rebuild {call.name!r} ({type(call.module).__name__} over {size} values) for "
                    f"{width} widened channels; allowed: a norm over the channels"
                )
            norms[call.name] = edge.factor
        elif not _passes(call, edge):
            raise SparseforgeError(
                f"wide cannot widen through {call.name!r} ({type(call.module).__name__}); allowed between widened "
                "layers: activations, dropout, pooling, Flatten, BatchNorm1d/2d, LayerNorm"
            )
        assert call.y is not None
        prev = call.y
    last = calls[stop]
    assert last.x is not None
    edge = _reshape(edge, prev, last.x, last.name, width)
    inputs = in_out(last.module)[0]
    if isinstance(last.module, (nn.Conv1d, nn.Conv2d)):
        fits = edge.axis == 1 and edge.factor == 1 and last.x.shape[1] == inputs
    else:  # a Linear acts on the last axis, which must hold the channels
        fits = (edge.axis == -1 or last.x.dim() == 2) and last.x.shape[-1] == inputs
    if not fits or inputs != width * edge.factor:
        raise SparseforgeError(
            f"layer {last.name!r} does not take the {width} channels of {calls[start].name!r} as its inputs "
            f"(input shape {tuple(last.x.shape)}); allowed: a convolution on the channels, or a Linear on them "
            "or on their flattened (batch, channels x positions)"
        )
    return norms, edge.factor


def _new_width(width: int, sparsity: float, name: str) -> int:
    """``round(width x k)``, ``k = 1 / sqrt(1 - sparsity)``; refused where that is ``width`` at a sparsity above 0."""
    k = 1.0 / math.sqrt(1.0 - sparsity)
    new = math.floor(width * k + 0.5)
    if sparsity > 0 and new == width:
        lowest = sparsity_bound(1.0 - (width / (width + 0.5)) ** 2, up=True)
        raise SparseforgeError(
            f"wide at sparsity {sparsity:g} widens the {width} outputs of layer {name!r} to round({width} x {k:.4f}) = "
            f"{new}, no wider; allowed: sparsity 0, or at least {lowest:g} ({width + 1} outputs)"
        )
    return new


def _norm_like(norm: nn.Module, size: int) -> nn.Module:
    """A fresh ``norm`` of the same type and settings over ``size`` values."""
    new: nn.Module
    if isinstance(norm, nn.LayerNorm):
        new = nn.LayerNorm(size, eps=norm.eps, elementwise_affine=norm.elementwise_affine, bias=norm.bias is not None)
    else:
        assert isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d))
        new = type(norm)(
            size, eps=norm.eps, momentum=norm.momentum, affine=norm.affine, track_running_stats=norm.track_running_stats
        )
    ref = next((t for t in [*norm.parameters(), *norm.buffers()] if t.is_floating_point()), None)
    return new if ref is None else new.to(device=ref.device, dtype=ref.dtype)


def widen(
    model: nn.Module, sparsity: float, excluded: Collection[str], example: Any
) -> list[tuple[str, nn.Module, dict[str, int]]]:
    """The Sparse Wide rewrite of ``model``'s chain at ``sparsity``, without applying it.

    Returns ``(name, module, kept)`` per changed module: the new (or, where no width changed,
    the same) layer and its weight's kept count, the original layer's weight count; rebuilt norms
    with no count. Excluded layers keep their widths, and so do the widths next to them.
    """
    calls, out = _probe(model, example)
    layers = _chain(model, calls, out, excluded)
    names = [calls[i].name for i in layers]
    open_ = [a not in excluded and b not in excluded for a, b in zip(names, names[1:], strict=False)]
    if not any(open_):
        why = "it has one layer" if len(names) == 1 else "every width between two layers touches an excluded layer"
        raise SparseforgeError(
            f"wide has no width to widen in {type(model).__name__}: {why}; allowed: two consecutive layers, "
            "neither of them excluded"
        )
    sizes = {calls[i].name: list(in_out(calls[i].module)) for i in layers}
    changes: list[tuple[str, nn.Module, dict[str, int]]] = []
    for j, widened in enumerate(open_):
        if not widened:
            continue
        left, right = names[j], names[j + 1]
        width = sizes[left][1]
        norms, factor = _segment(calls, layers[j], layers[j + 1], width)
        new = _new_width(width, sparsity, left)
        sizes[left][1] = new
        sizes[right][0] = new * factor
        for name, per_channel in norms.items():
            changes.append((name, _norm_like(model.get_submodule(name), new * per_channel), {}))
    for i in layers:
        call = calls[i]
        if call.name in excluded:
            continue
        layer = call.module
        spec = LayerSpec.of(layer, call.name)
        weight = layer.weight
        assert isinstance(weight, torch.Tensor)
        n_in, n_out = sizes[call.name]
        if (n_in, n_out) != in_out(layer):  # widened: a fresh layer of the new shape
            layer = spec.make(n_in, n_out, bias=getattr(layer, "bias", None) is not None)
            layer.to(device=weight.device, dtype=weight.dtype)
        changes.append((call.name, layer, {"weight": weight.numel()}))
    return changes
