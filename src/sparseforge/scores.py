"""Pruning scores (criteria): how important each weight is.

Conventions
-----------
* A score is a tensor shaped like its weight. **Higher score = more important = kept.** A mask
  builder keeps the highest scores (see :mod:`sparseforge.structures`).
* Every function takes ``params``, a mapping ``name -> parameter`` whose names are the model's own
  parameter names (``dict(model.named_parameters())``; a DDP ``module.`` prefix is fine), and
  returns ``dict[str, torch.Tensor]`` with the same keys, each score detached, ``float32`` and on
  the parameter's device.
* Gradients are taken with :func:`torch.autograd.grad`, never ``.backward()``, so parameters'
  ``.grad`` are left as they were. Functions that run the model restore its state afterwards:
  every parameter's ``.grad`` and ``requires_grad``, every module's train/eval flag and every
  buffer's value (BatchNorm running statistics are updated by a forward in train mode and are put
  back). Data-driven scores run the model in the mode it is in when called; SynFlow works on a
  float64 copy in eval mode and never touches the model.
* ``data`` is one ``(inputs, targets)`` batch or an iterable of such batches; gradients are
  **summed** over the batches (each batch's loss uses ``loss_fn``'s own reduction, a mean for the
  default :func:`torch.nn.functional.cross_entropy`). Inputs are passed to the model as they
  are: move them to the model's device first.
* DDP: pass the unwrapped ``ddp_model.module`` (``autograd.grad`` bypasses DDP's gradient
  reducer); keys with the ``module.`` prefix still resolve. Scores are computed from this rank's
  data only; all-reduce them (or use the same data on every rank) so ranks agree on a mask.

Scores (units: a score has the units of ``weight x gradient`` = loss units, except magnitude,
which has weight units, and random, which is unitless):

==========================  ============================================================
``magnitude``               ``|W|``
``random_scores``           uniform ``[0, 1)`` from a seeded generator
``snip``                    ``|W * g|``, ``g = sum_b dL_b/dW`` (Lee et al. 2019)
``grasp``                   ``W * (H g)`` (the *negation* of GraSP's ``-W * Hg``; see below)
``synflow``                 ``|W * dR/dW|`` on the ``|W|`` network, one round (Tanaka et al. 2020)
``synflow_masks``           iterative SynFlow, exponential density schedule, returns masks
``movement``                ``-W * g`` (Sanh et al. 2020, first order, one shot)
``MovementAccumulator``     ``-sum_t W_t * g_t`` over training steps
==========================  ============================================================
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SparseforgeError, check_density, check_seed

__all__ = [
    "Batch",
    "LossFn",
    "MaskFn",
    "iter_batches",
    "magnitude",
    "random_scores",
    "snip",
    "grasp",
    "synflow",
    "synflow_masks",
    "movement",
    "MovementAccumulator",
]

Batch = tuple[Tensor, Tensor]
#: ``loss_fn(model_output, targets) -> scalar tensor``.
LossFn = Callable[[Any, Any], Tensor]
#: ``mask_fn(scores, density) -> masks``: bool masks keyed like ``scores``, keeping ``density``.
MaskFn = Callable[[dict[str, Tensor], float], dict[str, Tensor]]
Data = Batch | Iterable[Batch]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_params_mapping(params: Mapping[str, Tensor]) -> None:
    if not isinstance(params, Mapping):
        raise SparseforgeError(
            f"params is a {type(params).__name__}; allowed: a mapping name -> tensor "
            "(e.g. dict(model.named_parameters()))"
        )
    for name, p in params.items():
        if not isinstance(p, Tensor):
            raise SparseforgeError(f"params[{name!r}] is a {type(p).__name__}; allowed: a torch.Tensor")


def _is_single_batch(data: Any) -> TypeGuard[tuple[Any, ...] | list[Any]]:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)


def iter_batches(data: Data) -> Iterator[Batch]:
    """Yield ``(inputs, targets)`` batches from one batch or an iterable of batches.

    A tuple or list of length 2 whose first item is a tensor is one batch; anything else is
    iterated, and each item must be a pair. Raises :class:`SparseforgeError` if ``data`` is not
    iterable, an item is not a pair, or no batch at all is produced (checked lazily, when the
    iteration ends).
    """
    if _is_single_batch(data):
        yield data[0], data[1]
        return
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise SparseforgeError(
            f"data is a {type(data).__name__}; allowed: one (inputs, targets) batch or an iterable of them"
        )
    count = 0
    for i, batch in enumerate(data):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise SparseforgeError(
                f"data item {i} is a {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                + "; allowed: an (inputs, targets) pair"
            )
        count += 1
        yield batch[0], batch[1]
    if count == 0:
        raise SparseforgeError("data is empty (no batches); allowed: at least one (inputs, targets) batch")


def _named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise SparseforgeError(f"model is a {type(model).__name__}; allowed: a torch.nn.Module")
    return dict(model.named_parameters(remove_duplicate=False))


def _model_name(named: Mapping[str, Tensor], name: str, tensor: Tensor | None = None) -> str | None:
    """The model's own name for ``name``: itself, the tensor's identity, or ``module.`` added/removed."""
    if name in named:
        return name
    if tensor is not None:
        for model_name, p in named.items():
            if p is tensor:
                return model_name
    if name.startswith("module.") and name[len("module.") :] in named:
        return name[len("module.") :]
    if "module." + name in named:
        return "module." + name
    return None


def _unknown_name(named: Mapping[str, Tensor], name: str, what: str = "params") -> SparseforgeError:
    examples = ", ".join(repr(n) for n in list(named)[:3]) or "none: the model has no parameters"
    return SparseforgeError(
        f"{what} name {name!r} is not a parameter of the model; allowed: names from "
        f"model.named_parameters() (e.g. {examples})"
    )


def _resolve_params(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, str]:
    """Map each caller name in ``params`` to the model's own parameter name.

    Tried in order: the name itself, the tensor's identity, the name with a ``module.`` prefix
    added or removed (DDP wrappers).
    """
    _check_params_mapping(params)
    named = _named_parameters(model)
    resolved: dict[str, str] = {}
    for name, tensor in params.items():
        model_name = _model_name(named, name, tensor)
        if model_name is None:
            raise _unknown_name(named, name)
        if tuple(named[model_name].shape) != tuple(tensor.shape):
            raise SparseforgeError(
                f"params[{name!r}] has shape {tuple(tensor.shape)} but the model's {model_name!r} has "
                f"shape {tuple(named[model_name].shape)}; allowed: the model's own parameter"
            )
        resolved[name] = model_name
    return resolved


@contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Put back grads, requires_grad, train/eval flags and buffer values on exit."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    requires = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    buffers = [
        (m, key, b, b.detach().clone()) for m in model.modules() for key, b in m._buffers.items() if b is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, key, b, saved in buffers:
                m._buffers[key] = b  # undo a forward that re-assigned the buffer
                b.copy_(saved)
        for m, training in modes:
            m.training = training
        for p, g, r in zip(params, grads, requires, strict=True):
            p.grad = g
            p.requires_grad_(r)


def _scalar_loss(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise SparseforgeError(f"loss_fn returned {shape}; allowed: a scalar tensor (one element)")
    return loss.reshape(())


def _grads(loss: Tensor, inputs: Sequence[Tensor], *, create_graph: bool = False) -> list[Tensor]:
    """d loss / d inputs; an input the loss does not depend on gets zeros."""
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in inputs]
    got = torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, got, strict=True)]


def _summed_grads(model: nn.Module, tensors: Sequence[Tensor], data: Data, loss_fn: LossFn) -> list[Tensor]:
    """Sum over batches of d loss_fn(model(x), y) / d tensors, detached, float32."""
    total = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in tensors]
    for x, y in iter_batches(data):
        loss = _scalar_loss(loss_fn(model(x), y))
        for acc, g in zip(total, _grads(loss, tensors), strict=True):
            acc.add_(g.detach().float())
    return total


def _check_loss_fn(loss_fn: Any) -> None:
    if not callable(loss_fn):
        raise SparseforgeError(f"loss_fn={loss_fn!r} is not callable; allowed: loss_fn(output, targets) -> scalar")


def _gradient_scores(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Data,
    loss_fn: LossFn,
    combine: Callable[[Tensor, Tensor], Tensor],
) -> dict[str, Tensor]:
    """Shared body of SNIP and movement: ``combine(W_float32, summed_grad)`` per parameter."""
    _check_loss_fn(loss_fn)
    resolved = _resolve_params(model, params)
    named = _named_parameters(model)
    with _preserved(model), torch.enable_grad():
        tensors = [named[m] for m in resolved.values()]
        for p in tensors:
            p.requires_grad_(True)
        grads = _summed_grads(model, tensors, data, loss_fn)
        return {
            name: combine(p.detach().float(), g).detach() for name, p, g in zip(resolved, tensors, grads, strict=True)
        }


# --------------------------------------------------------------------------------------------
# Data-free scores
# --------------------------------------------------------------------------------------------


def magnitude(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Magnitude score ``|W|`` (weight units), float32, detached, one tensor per name."""
    _check_params_mapping(params)
    return {name: p.detach().float().abs() for name, p in params.items()}


def random_scores(params: Mapping[str, Tensor], *, seed: int = 0) -> dict[str, Tensor]:
    """Uniform ``[0, 1)`` scores (unitless) from a CPU ``torch.Generator`` seeded with ``seed``.

    One generator is drawn from in the iteration order of ``params``, so the same names, shapes
    and order give the same scores on every device and every rank (DDP), whatever the global RNG
    state. Scores are generated on the CPU and moved to each parameter's device.
    """
    _check_params_mapping(params)
    seed = check_seed(seed)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return {name: torch.rand(p.shape, generator=gen, dtype=torch.float32).to(p.device) for name, p in params.items()}


# --------------------------------------------------------------------------------------------
# Gradient scores
# --------------------------------------------------------------------------------------------


def snip(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Data,
    *,
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, Tensor]:
    """SNIP connection sensitivity ``|W * g|`` with ``g = sum_b dL_b/dW`` (loss units).

    ``L_b = loss_fn(model(x_b), y_b)``; the gradient is summed over all batches in ``data``
    before the product. Model state is left unchanged (see the module docstring).
    """
    return _gradient_scores(model, params, data, loss_fn, lambda w, g: (w * g).abs())


def movement(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Data,
    *,
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, Tensor]:
    """First-order movement score ``-W * g``, ``g = sum_b dL_b/dW`` (loss units).

    Positive where a gradient-descent step would move the weight away from zero (``W`` and
    ``-g`` have the same sign), so keeping the highest keeps the weights that are growing. For
    the score accumulated over training steps use :class:`MovementAccumulator`.
    """
    return _gradient_scores(model, params, data, loss_fn, lambda w, g: -(w * g))


def grasp(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Data,
    *,
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, Tensor]:
    """GraSP score (Wang et al. 2020) in the keep-highest convention: ``W * (H g)`` (loss units).

    **Sign convention.** The paper scores ``S = -W * (H g)`` and *removes* the weights with the
    largest ``S`` (removing them reduces gradient flow the least / increases it). This function
    returns the negation, ``W * (H g) = -S``, so that keeping the highest scores is exactly
    removing the largest ``S``. Scores can be negative.

    ``g`` is the gradient of the loss w.r.t. the given ``params`` only, summed over all batches
    and detached; ``H g = sum_b d(g . g_b)/dW`` is the Hessian-gradient product by double
    backward, with ``g_b`` the batch gradient taken with ``create_graph=True``. ``data`` is read
    into a list because it is needed twice. The original code divides the logits by a
    temperature (200); pass a ``loss_fn`` that does so if you want it.
    """
    _check_loss_fn(loss_fn)
    resolved = _resolve_params(model, params)
    named = _named_parameters(model)
    batches = list(iter_batches(data))
    with _preserved(model), torch.enable_grad():
        tensors = [named[m] for m in resolved.values()]
        for p in tensors:
            p.requires_grad_(True)
        g_total = _summed_grads(model, tensors, batches, loss_fn)
        hg = [torch.zeros_like(g) for g in g_total]
        for x, y in batches:
            loss = _scalar_loss(loss_fn(model(x), y))
            g_b = _grads(loss, tensors, create_graph=True)
            z = loss.new_zeros(())
            for g, gb in zip(g_total, g_b, strict=True):
                z = z + (g.to(gb.dtype) * gb).sum()
            for acc, h in zip(hg, _grads(z, tensors), strict=True):
                acc.add_(h.detach().float())
        return {name: (p.detach().float() * h).detach() for name, p, h in zip(resolved, tensors, hg, strict=True)}


# --------------------------------------------------------------------------------------------
# SynFlow
# --------------------------------------------------------------------------------------------


def _check_input_shape(input_shape: Any) -> tuple[int, ...]:
    allowed = "a non-empty sequence of positive ints, the shape of one sample without the batch dim"
    if input_shape is None or isinstance(input_shape, (str, bytes, Tensor)) or not isinstance(input_shape, Sequence):
        raise SparseforgeError(f"input_shape={input_shape!r} is invalid; allowed: {allowed}")
    dims = tuple(input_shape)
    if len(dims) == 0 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise SparseforgeError(f"input_shape={input_shape!r} is invalid; allowed: {allowed}")
    return dims


def _check_masks(
    masks: Mapping[str, Tensor], named: Mapping[str, Tensor], resolved: Mapping[str, str]
) -> dict[str, Tensor]:
    """Validate masks (bool, shaped like the parameter) and key them by the model's names."""
    if not isinstance(masks, Mapping):
        raise SparseforgeError(f"masks is a {type(masks).__name__}; allowed: a mapping name -> bool tensor")
    out: dict[str, Tensor] = {}
    for name, mask in masks.items():
        model_name = resolved.get(name) or _model_name(named, name)
        if model_name is None:
            raise _unknown_name(named, name, "masks")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise SparseforgeError(f"masks[{name!r}] is {kind}; allowed: a torch.bool tensor")
        if tuple(mask.shape) != tuple(named[model_name].shape):
            raise SparseforgeError(
                f"masks[{name!r}] has shape {tuple(mask.shape)}; allowed: the parameter's shape "
                f"{tuple(named[model_name].shape)}"
            )
        out[model_name] = mask
    return out


class _SynFlowNet:
    """A float64, eval-mode, ``|W|`` copy of a model, reusable across SynFlow rounds."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        self.net = copy.deepcopy(model)
        self.net.double()
        self.net.eval()
        self.named = _named_parameters(self.net)
        with torch.no_grad():
            for p in self.net.parameters():
                p.grad = None
                p.abs_()
        device = next(iter(self.named.values())).device if self.named else torch.device("cpu")
        self.input = torch.ones((1, *input_shape), dtype=torch.float64, device=device)
        self._unmasked: dict[str, Tensor] = {}  # |W| before masking, for params ever masked

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Zero masked-out weights; weights masked in an earlier round but not now get |W| back."""
        with torch.no_grad():
            for model_name, base in self._unmasked.items():
                if model_name not in masks:
                    self.named[model_name].copy_(base)
            for model_name, mask in masks.items():
                p = self.named[model_name]
                if model_name not in self._unmasked:
                    self._unmasked[model_name] = p.detach().clone()
                p.copy_(self._unmasked[model_name] * mask.to(device=p.device, dtype=p.dtype))

    def scores(self, resolved: Mapping[str, str], out_devices: Mapping[str, torch.device]) -> dict[str, Tensor]:
        names = list(dict.fromkeys(resolved.values()))
        tensors = [self.named[m] for m in names]
        for p in self.net.parameters():
            p.requires_grad_(False)
        for p in tensors:
            p.requires_grad_(True)
        with torch.enable_grad():
            out = self.net(self.input)
            if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
                out = out[0]
            if not isinstance(out, Tensor):
                raise SparseforgeError(
                    f"model output is a {type(out).__name__}; allowed for SynFlow: a tensor or a tuple starting with one"
                )
            r = out.sum()
            grads = dict(zip(names, _grads(r, tensors), strict=True))
        return {
            name: (self.named[m].detach() * grads[m]).abs().to(device=out_devices[name], dtype=torch.float32)
            for name, m in resolved.items()
        }


def _synflow_setup(
    model: nn.Module, params: Mapping[str, Tensor], input_shape: Any
) -> tuple[dict[str, str], dict[str, torch.device], tuple[int, ...]]:
    resolved = _resolve_params(model, params)
    shape = _check_input_shape(input_shape)
    named = _named_parameters(model)
    devices = {name: named[m].device for name, m in resolved.items()}
    return resolved, devices, shape


def synflow(
    model: nn.Module,
    params: Mapping[str, Tensor],
    *,
    input_shape: Sequence[int],
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """One SynFlow round (Tanaka et al. 2020): data-free synaptic saliency ``|W * dR/dW|``.

    On a float64 deep copy of ``model`` in eval mode (BatchNorm uses its running statistics),
    every parameter is replaced by its absolute value and the weights where ``masks`` (bool,
    keyed by parameter name, True = kept) is False are zeroed. ``R = sum(net(ones(1,
    *input_shape)))`` and the score of a named parameter is ``|W * dR/dW|`` of the linearised,
    masked weight, so a masked-out weight scores exactly 0. Units: those of ``R`` (the summed
    output of the ``|W|`` network). ``model`` is not modified. For the iterative algorithm (100
    rounds, exponential density schedule) use :func:`synflow_masks`.
    """
    resolved, devices, shape = _synflow_setup(model, params, input_shape)
    net = _SynFlowNet(model, shape)
    if masks is not None:
        net.set_masks(_check_masks(masks, net.named, resolved))
    return net.scores(resolved, devices)


def synflow_masks(
    model: nn.Module,
    params: Mapping[str, Tensor],
    *,
    input_shape: Sequence[int],
    mask_fn: MaskFn,
    density: float,
    rounds: int = 100,
) -> dict[str, Tensor]:
    """Iterative SynFlow: ``rounds`` rounds of scoring and masking; returns the final bool masks.

    Round ``k = 1..rounds`` scores with the previous round's masks applied (none in round 1) and
    calls ``mask_fn(scores, density ** (k / rounds))`` (exponential schedule, density = kept
    fraction), so the last round asks for exactly ``density``. ``mask_fn`` owns the layer-wise
    distribution and the structure; it returns bool masks keyed like ``scores`` (a subset of the
    keys is allowed: missing names are unmasked). The float64 ``|W|`` copy is made once and
    re-masked each round; ``model`` is not modified.
    """
    density = check_density(density)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise SparseforgeError(f"rounds={rounds!r} is invalid; allowed: an int >= 1")
    if not callable(mask_fn):
        raise SparseforgeError(f"mask_fn={mask_fn!r} is not callable; allowed: mask_fn(scores, density) -> masks")
    resolved, devices, shape = _synflow_setup(model, params, input_shape)
    net = _SynFlowNet(model, shape)
    masks: dict[str, Tensor] = {}
    for k in range(1, rounds + 1):
        scores = net.scores(resolved, devices)
        new = mask_fn(scores, density ** (k / rounds))
        if not isinstance(new, Mapping):
            raise SparseforgeError(f"mask_fn returned a {type(new).__name__}; allowed: a mapping name -> bool tensor")
        unknown = [n for n in new if n not in resolved]
        if unknown:
            raise SparseforgeError(
                f"mask_fn returned mask names {unknown[:3]!r} not in params; allowed: names of params"
            )
        net.set_masks(_check_masks(new, net.named, resolved))
        masks = dict(new)
    return masks


# --------------------------------------------------------------------------------------------
# Movement over training
# --------------------------------------------------------------------------------------------


class MovementAccumulator:
    """Accumulates the movement score ``-sum_t W_t * g_t`` over training steps (loss units).

    Call :meth:`update` after ``loss.backward()`` and before ``optimizer.step()``, every step:
    it reads each parameter's ``.grad`` (a ``None`` grad adds nothing). :meth:`scores` returns
    float32 copies keyed by name; :meth:`reset` clears the sums.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self.steps: int = 0  #: number of :meth:`update` calls since the last reset

    def update(self, params: Mapping[str, Tensor]) -> None:
        """Add ``-W * W.grad`` of every parameter in ``params`` to its running sum."""
        _check_params_mapping(params)
        with torch.no_grad():
            for name, p in params.items():
                acc = self._sums.get(name)
                if acc is None:
                    acc = self._sums[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                elif acc.shape != p.shape:
                    raise SparseforgeError(
                        f"params[{name!r}] has shape {tuple(p.shape)} but earlier updates had "
                        f"{tuple(acc.shape)}; allowed: the same shape every step (call reset())"
                    )
                if p.grad is not None:
                    acc.sub_(p.detach().float() * p.grad.detach().float().to(acc.device))
        self.steps += 1

    def scores(self) -> dict[str, Tensor]:
        """The accumulated scores, float32 copies (higher = moving away from zero = keep)."""
        return {name: s.clone() for name, s in self._sums.items()}

    def reset(self) -> None:
        """Forget all sums and the step count."""
        self._sums.clear()
        self.steps = 0
