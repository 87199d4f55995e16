"""Fast sparse inference on CPU: packed formats, C and Numba kernels, ``convert`` and save/load.

Typical use::

    from sparseforge.inference import convert, save_converted, load_converted
    fast, report = convert(pruned_model, batch_sizes=(1, 16))
    print(report)                      # per layer: format, path per batch size, and why
    with torch.inference_mode():
        y = fast(x)
    save_converted("model.sf.safetensors", fast)
    again = load_converted("model.sf.safetensors", make_dense_model())

From 16 rows per call on, the ``pairs`` format (:class:`PairedCSR`) runs the batched kernel, and
``convert`` fuses an activation module into the layer before it (:mod:`.fusion`, :mod:`.epilogue`).

A :class:`~sparseforge.activations.ThresholdedLinear` (sparse activations) becomes an
:class:`InputSparseLinear`: one input row runs the sparse-input kernel, which reads only the
weights of the active inputs (:func:`~.kernels.input_sparse_matmul`).
"""

from .convert import ConversionReport, LayerDecision, convert, retune
from .epilogue import ACTIVATIONS
from .formats import (
    FORMATS,
    Bitmask,
    BlockSparse,
    CompactCSR,
    CompactDense,
    InputSparseBitmask,
    InputSparseDense,
    PackedFormat,
    PackedNM,
    PairedCSR,
)
from .fusion import Fusion
from .kernels import input_sparse_matmul, kernels_available, sparse_matmul, unavailable_reason
from .modules import BatchPlan, InputSparseLinear, SparseLinear
from .serialization import load_converted, save_converted

__all__ = [
    "convert",
    "retune",
    "ConversionReport",
    "LayerDecision",
    "PackedFormat",
    "CompactCSR",
    "Bitmask",
    "PackedNM",
    "BlockSparse",
    "CompactDense",
    "PairedCSR",
    "ACTIVATIONS",
    "Fusion",
    "InputSparseDense",
    "InputSparseBitmask",
    "FORMATS",
    "SparseLinear",
    "InputSparseLinear",
    "input_sparse_matmul",
    "BatchPlan",
    "kernels_available",
    "unavailable_reason",
    "sparse_matmul",
    "save_converted",
    "load_converted",
]
