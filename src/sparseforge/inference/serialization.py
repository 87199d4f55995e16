"""Saving and loading converted models as safetensors (no pickle anywhere).

File layout: every ``SparseLinear`` named ``L`` stores its packed arrays under ``L.<array>`` and
its bias under ``L.bias``; every other entry of the model's ``state_dict`` is stored as is. The
safetensors metadata holds ``sparseforge.layers`` (JSON: format, shape, params, plan, layout per
layer) and ``sparseforge.tensor_crc32`` (JSON ``{name: CRC-32 of the tensor's dtype, shape and
bytes}``, made and checked by the same helpers as checkpoints, :mod:`sparseforge.fileio`), checked
on load. ``sparseforge.crc32`` (the CRC-32 of the bytes alone) is written too, so that releases
from before the dtype and shape were covered still read the files; files that have only it (written
by those releases) are checked against it.

With ``layers_only=True`` only the ``SparseLinear`` layers are stored (metadata
``sparseforge.layers_only = "1"``): the file rides beside a model whose other weights are stored
elsewhere (a pruned transformer's folder, see :mod:`sparseforge.oneshot.packed`), and loading it
replaces those layers of the skeleton and leaves the rest of its state as it is.

A skeleton layer may be an ``nn.Linear``, a 1x1 convolution or transformers' ``Conv1D`` (GPT-2,
weight stored ``(in, out)``): the file's shape is ``(out, in)`` in every case.

An :class:`~.modules.InputSparseLinear` (a converted ``ThresholdedLinear``) is stored like a
``SparseLinear`` plus its ``input_threshold`` and ``input_sparsity`` tensors; its metadata entry
has ``"kind": "input-sparse"``, the sparse-input format and its parameters, and the crossover
(``max_active``). The sparse-input packing is re-packed on load from the stored weight. Its
skeleton layer is the ``ThresholdedLinear`` (or an ``nn.Linear`` of the same shape).

Unstructured packings are *stored* as :class:`~.formats.Bitmask` (``4 d + 1/8`` bytes per
weight: 13.1 % of dense at 90 % sparsity, below CSR's ``6 d``) and re-packed on load into the
format the layer runs. The file is written with :func:`sparseforge.fileio.atomic_write` (a
temporary file in the same folder, moved into place with ``os.replace``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import SparseforgeError
from ..fileio import (
    atomic_write,
    check_input_file,
    check_output_file,
    checksum_table,
    describe_os_error,
    verify_checksums,
)
from .epilogue import activation_name_of
from .formats import (
    FORMATS,
    INPUT_SPARSE_FORMATS,
    Bitmask,
    CompactCSR,
    InputSparseBitmask,
    InputSparseDense,
    PairedCSR,
)
from .kernels import set_spmv_variant
from .modules import BatchPlan, InputSparseLinear, SparseLinear

__all__ = ["save_converted", "load_converted"]

_FORMAT_VERSION = "1"
_WHAT = "converted model file"


def _storage_format(module: SparseLinear):
    if module.packed is None:
        assert module.dense_weight is not None  # SparseLinear refuses neither a packed nor a dense weight
        return Bitmask.from_dense(module.dense_weight)
    if isinstance(module.packed, (CompactCSR, PairedCSR)):
        return Bitmask.from_dense(module.packed.to_dense())
    return module.packed


def save_converted(path: str | os.PathLike, model: nn.Module, *, layers_only: bool = False) -> Path:
    """Write ``model`` (output of :func:`.convert.convert`) to ``path`` as safetensors; returns the path.

    ``layers_only=True`` stores the packed (``SparseLinear``) layers alone, not the rest of the
    model's state (for a file that accompanies the model's own weights file). The folder of
    ``path`` must exist. A path that cannot be written (a directory, no such
    directory, permission denied, disk full) raises a one-line :class:`SparseforgeError`, and an
    existing file at ``path`` keeps its old content then. A model in which ``convert`` kept every
    layer dense is saved with its plain weights (and loads back the same way).
    """
    from .convert import check_model

    check_model(model)
    if not isinstance(layers_only, bool):
        raise SparseforgeError(f"layers_only={layers_only!r} is not allowed; allowed: True or False")
    path = check_output_file(path, _WHAT)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    # A model where convert kept every layer dense (as it may on another machine, or under load)
    # is saved with no packed layer: a script must not depend on what the machine measured.
    sparse_names = {n for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    for name, m in model.named_modules():
        if name not in sparse_names:
            continue
        stored = _storage_format(m)
        for key, arr in stored.arrays().items():
            tensors[f"{name}.{key}"] = torch.from_numpy(np.ascontiguousarray(arr))
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().contiguous()
        layers[name] = {
            "stored": stored.name,
            "runs": m.packed.name if m.packed is not None else None,
            "runs_extra": m.extra.name if m.extra is not None else None,
            # parameters of the run formats (block shape, n:m) for the re-pack on load
            "runs_params": [f.params() if f is not None else None for f in (m.packed, m.extra)],
            "spmv_variants": [getattr(f, "_sf_spmv_variant", None) for f in (m.packed, m.extra)],
            "params": stored.params(),
            "shape": [m.out_features, m.in_features],
            "plan": [list(s) for s in m.plan.steps],
            "layout": m.layout,
            "bias": m.bias is not None,
            "activation": m.activation,
            "fused_from": m.fused_from,
            "transposed_output": m.transposed_output,
        }
        if isinstance(m, InputSparseLinear):
            for key in ("input_threshold", "input_sparsity"):
                tensors[f"{name}.{key}"] = getattr(m, key).detach().reshape(()).contiguous().clone()
            fmt = m.input_packed
            layers[name].update(
                kind="input-sparse",
                input_format=fmt.name if fmt is not None else None,
                input_params=fmt.params() if fmt is not None else {},
                max_active=m.max_active,
                input_variant=m.input_variant,
            )
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in sparse_names or layers_only:
            continue
        tensors[key] = value.detach().contiguous().clone()
    meta = {
        "sparseforge.version": _FORMAT_VERSION,
        "sparseforge.layers_only": "1" if layers_only else "0",
        "sparseforge.layers": json.dumps(layers, sort_keys=True),
        "sparseforge.tensor_crc32": json.dumps(checksum_table(tensors), sort_keys=True),
        "sparseforge.crc32": json.dumps(checksum_table(tensors, layout=False), sort_keys=True),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), what=_WHAT)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as exc:
        if exc.errno is None:
            raise _unreadable(path, exc) from None
        raise describe_os_error(exc, path, _WHAT) from None
    except Exception as exc:
        raise _unreadable(path, exc) from None
    return tensors, meta


def _unreadable(path: Path, exc: BaseException) -> SparseforgeError:
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return SparseforgeError(f"{_WHAT} {str(path)!r} is corrupted or not safetensors ({first})")


def _repack(stored, runs: str, params: dict | None, layer: str):
    params = {k: int(v) for k, v in (params or {}).items()}
    if runs == stored.name and params == stored.params():
        return stored
    if runs not in FORMATS:
        raise SparseforgeError(f"file layer {layer!r} runs unknown format {runs!r}; allowed: {sorted(FORMATS)}")
    try:
        return FORMATS[runs].from_dense(stored.to_dense(), **params)
    except TypeError:
        raise SparseforgeError(
            f"file layer {layer!r}: format {runs!r} does not take parameters {sorted(params)}"
        ) from None


#: Entries of a stored layer that are not arrays of its format.
_NOT_ARRAYS = ("bias", "input_threshold", "input_sparsity")


def _plain_layer(skeleton: nn.Module, name: str, spec: dict, parts: tuple) -> SparseLinear:
    """A :class:`SparseLinear` from a file entry; with a fused activation, the skeleton must hold
    that activation where the converted model had it (it is replaced by ``nn.Identity`` on load)."""
    packed, dense, bias, plan, shape, extra = parts
    activation, fused_from = spec.get("activation"), spec.get("fused_from")
    layer = SparseLinear(
        packed,
        dense,
        bias,
        plan,
        spec["layout"],
        shape=shape,
        extra=extra,
        activation=activation,
        transposed_output=bool(spec.get("transposed_output", False)),
    )
    if fused_from:
        try:
            found = skeleton.get_submodule(fused_from)
        except AttributeError:
            found = None
        if found is None or activation_name_of(found) != activation:
            raise SparseforgeError(
                f"layer {name!r} applies the {activation} that was at {fused_from!r}, but the skeleton has "
                f"{type(found).__name__ if found is not None else 'no module'} there; allowed: the model the file was converted from"
            )
        layer.fused_from = fused_from
    return layer


def _input_sparse_layer(
    path: Path, name: str, spec: dict, tensors: dict[str, torch.Tensor], stored, plain: tuple
) -> InputSparseLinear:
    """An :class:`InputSparseLinear` from a file entry of kind ``"input-sparse"`` (``plain``: the
    SparseLinear parts already built from it)."""
    scalars = {}
    for key in ("input_threshold", "input_sparsity"):
        t = tensors.get(f"{name}.{key}")
        if t is None or t.numel() != 1 or t.dtype != torch.float32:
            raise SparseforgeError(f"file {str(path)!r}: layer {name!r} has no valid {key!r} tensor (corrupted)")
        scalars[key] = float(t.reshape(()))
    fmt_name = spec.get("input_format")
    if fmt_name is not None and fmt_name not in INPUT_SPARSE_FORMATS:
        raise SparseforgeError(
            f"file layer {name!r} has sparse-input format {fmt_name!r}; allowed: {sorted(INPUT_SPARSE_FORMATS)}"
        )
    input_packed = _repack(stored, fmt_name, spec.get("input_params"), name) if fmt_name is not None else None
    assert input_packed is None or isinstance(input_packed, (InputSparseDense, InputSparseBitmask))  # checked above
    max_active = spec.get("max_active")
    if isinstance(max_active, bool) or not isinstance(max_active, int):
        raise SparseforgeError(f"file layer {name!r} has max_active {max_active!r}; allowed: an int (corrupted)")
    packed, dense, bias, plan, shape, extra = plain
    return InputSparseLinear(
        input_packed,
        max_active,
        scalars["input_threshold"],
        scalars["input_sparsity"],
        packed,
        dense,
        bias,
        plan,
        shape=shape,
        extra=extra,
        input_variant=spec.get("input_variant"),
    )


def _skeleton_shape(target: nn.Module) -> tuple[int, int] | None:
    """``(out, in)`` of a skeleton layer (Linear, 1x1 conv, GPT-2 Conv1D, SparseLinear), else ``None``."""
    from .convert import is_hf_conv1d

    if isinstance(target, SparseLinear):
        return (target.out_features, target.in_features)
    tw = getattr(target, "weight", None)
    if not isinstance(tw, torch.Tensor) or tw.dim() < 2:
        return None
    if is_hf_conv1d(target):
        return (int(tw.shape[1]), int(tw.shape[0]))
    return (int(tw.shape[0]), int(tw[0].numel()))


def _describe_shape(target: nn.Module) -> str:
    """How a skeleton layer looks, for the message of a file that does not fit it."""
    shape = _skeleton_shape(target)
    if shape is not None:
        return f"a {type(target).__name__} of (out, in) shape {shape}"
    tw = getattr(target, "weight", None)
    if isinstance(tw, torch.Tensor):
        return f"a {type(target).__name__} with weight shape {tuple(tw.shape)}"
    return f"a {type(target).__name__} with no weight"


def load_converted(path: str | os.PathLike, skeleton: nn.Module) -> nn.Module:
    """Load a file written by :func:`save_converted` into ``skeleton`` (the dense architecture).

    ``skeleton`` is modified in place and returned: its converted layers are replaced by
    :class:`SparseLinear` modules rebuilt from the file and all other state is loaded strictly
    (a file written with ``layers_only=True`` holds no other state: the rest of ``skeleton`` is kept).
    Everything is checked before the first layer is replaced, so a refused file leaves
    ``skeleton`` as it was.
    Raises :class:`SparseforgeError` (one line) on a path that is a directory, missing or
    unreadable, on a truncated or corrupted file (every tensor is checked against its stored
    CRC-32 before ``skeleton`` is changed), or one that does not match the skeleton.
    """
    path = check_input_file(path, _WHAT)
    tensors, meta = _read(path)
    if meta.get("sparseforge.version") != _FORMAT_VERSION:
        raise SparseforgeError(
            f"file {str(path)!r} is not a sparseforge converted model (version {meta.get('sparseforge.version')!r}); allowed: version {_FORMAT_VERSION}"
        )
    try:
        layers = json.loads(meta["sparseforge.layers"])
        # files written before dtype and shape were covered have the bytes-only table alone
        layout = "sparseforge.tensor_crc32" in meta
        crcs = json.loads(meta["sparseforge.tensor_crc32" if layout else "sparseforge.crc32"])
    except (KeyError, ValueError):
        raise SparseforgeError(f"file {str(path)!r} has corrupted sparseforge metadata") from None
    verify_checksums(tensors, crcs, f"{_WHAT} {str(path)!r}", layout=layout)
    layers_only = meta.get("sparseforge.layers_only", "0") == "1"
    if not isinstance(layers, dict):
        raise SparseforgeError(f"file {str(path)!r} has corrupted sparseforge metadata")
    # Build every module and check every other entry first; change the skeleton only when all fit.
    built: dict[str, SparseLinear] = {}
    for name, spec in layers.items():
        try:
            target = skeleton.get_submodule(name) if name else skeleton
        except AttributeError:
            raise SparseforgeError(f"file layer {name!r} is not in the skeleton {type(skeleton).__name__}") from None
        shape = (int(spec["shape"][0]), int(spec["shape"][1]))
        if _skeleton_shape(target) != shape:
            raise SparseforgeError(
                f"file {str(path)!r} does not fit the skeleton: its layer {name!r} is {_describe_shape(target)} "
                f"there; the file holds (out, in) shape {shape}"
            )
        cls = FORMATS.get(spec["stored"])
        if cls is None:
            raise SparseforgeError(
                f"file layer {name!r} has unknown format {spec['stored']!r}; allowed: {sorted(FORMATS)}"
            )
        prefix = f"{name}."
        arrays = {
            k[len(prefix) :]: t.numpy()
            for k, t in tensors.items()
            if k.startswith(prefix) and k[len(prefix) :] not in _NOT_ARRAYS
        }
        stored = cls.from_arrays(shape, arrays, {k: int(v) for k, v in spec["params"].items()})
        plan = BatchPlan(tuple((int(b), str(p)) for b, p in spec["plan"]))
        runs = spec["runs"]
        # files written before runs_params existed: the stored format's own parameters
        run_params = spec.get("runs_params") or [stored.params(), None]
        packed = extra = None
        if runs is not None:
            packed = _repack(stored, runs, run_params[0], name)
        if spec.get("runs_extra") is not None:
            extra = _repack(stored, spec["runs_extra"], run_params[1], name)
        variants = spec.get("spmv_variants", [None, None])
        if not isinstance(variants, list) or len(variants) != 2:
            raise SparseforgeError(f"file layer {name!r} has spmv_variants {variants!r}; allowed: a list of 2 entries")
        for fmt, variant in zip((packed, extra), variants, strict=True):
            if fmt is not None and variant is not None:
                set_spmv_variant(fmt, int(variant))
        dense = stored.to_dense() if "dense" in plan.paths else None
        bias = tensors.get(f"{name}.bias") if spec["bias"] else None
        if spec.get("kind", "sparse") == "input-sparse":
            built[name] = _input_sparse_layer(
                path, name, spec, tensors, stored, (packed, dense, bias, plan, shape, extra)
            )
        else:
            built[name] = _plain_layer(skeleton, name, spec, (packed, dense, bias, plan, shape, extra))
    rest = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in layers}
    own = {k: v for k, v in skeleton.state_dict().items() if k.rpartition(".")[0] not in layers}
    if layers_only and rest:
        raise SparseforgeError(
            f"file {str(path)!r} is marked layers-only but holds other entries such as {sorted(rest)[0]!r} (corrupted)"
        )
    if not layers_only and set(rest) != set(own):
        raise SparseforgeError(
            f"file {str(path)!r} does not match the skeleton: differing entries {sorted(set(rest) ^ set(own))[:3]}"
        )
    for key, value in rest.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise SparseforgeError(
                f"file {str(path)!r}: {key!r} has shape {tuple(value.shape)}, the skeleton expects {tuple(own[key].shape)}"
            )
    for name, module in built.items():
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(skeleton.get_submodule(parent_name) if parent_name else skeleton, child, module)
        else:
            skeleton = module
    for module in built.values():  # the activations the layers' epilogues replace
        if module.fused_from:
            parent_name, _, child = module.fused_from.rpartition(".")
            setattr(skeleton.get_submodule(parent_name) if parent_name else skeleton, child, nn.Identity())
    if rest:
        skeleton.load_state_dict(rest, strict=False)
    return skeleton
