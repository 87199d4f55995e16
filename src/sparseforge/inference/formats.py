"""Packed sparse weight formats for inference, each with an exact round trip to dense.

Every format holds a 2-D weight of shape ``(out_features, in_features)`` (the layout of
``nn.Linear.weight``) as NumPy arrays that the kernels in :mod:`.kernels` read directly.
Sizes are in bytes; "kept" weights are the stored ones (exact zeros are dropped).

==================  ==============================================  ============================
format              arrays                                          bytes per kept weight
==================  ==============================================  ============================
``CompactCSR``      fp32 values, uint16/int32 column indices,       4 + 2 (in_features <= 65536)
                    int32 (or int64) row pointers
``Bitmask``         fp32 values in row-major order + one bit per     4 + 1 / (8 * density)
                    weight (uint64 words per row)
``PackedNM``        fp32 values ``n`` per group of ``m`` inputs +    4 + 1
                    one uint8 position per value
``BlockSparse``     dense ``(bh, bw)`` fp32 blocks + uint16/int32    4 / fill + small
                    block-column indices + int32 block-row pointers
``CompactDense``    the dense sub-matrix of the rows and columns     4 / fill + small
                    with any nonzero + their uint16/int32 indices
``PairedCSR``       rows in pairs, inputs in blocks of ``cb``:       4 + 1 (shared columns:
                    uint8 columns per run (shared / first / second)  8 + 1 per two weights)
                    + fp32 values (batched kernel)
``InputSparseDense``  W^T in output tiles of ``tile`` rows: for       4 (+ row padding)
                    each tile, every input's ``tile`` weights
                    contiguous (sparse *inputs*, batch 1)
``InputSparse-      per 64-row tile and input: a uint64 mask, a      4 + 1/8 / d + 4/64 / d
Bitmask``           uint32 offset and the kept values (sparse
                    inputs *and* weights, batch 1)
==================  ==============================================  ============================

The two ``InputSparse*`` formats serve the sparse-input kernel (:func:`.kernels.input_sparse_matmul`):
one input row whose small entries are dropped, so only the weights of the active inputs are read.

``to_dense(fmt.from_dense(w))`` reproduces ``w`` bit for bit (including ``-0.0`` stored as a
kept value only if it is not an exact zero: ``-0.0 == 0`` so it is dropped and comes back as
``+0.0``; all other values, NaN and inf included, come back exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import SparseforgeError

__all__ = [
    "PackedFormat",
    "CompactCSR",
    "Bitmask",
    "PackedNM",
    "BlockSparse",
    "CompactDense",
    "PairedCSR",
    "InputSparseDense",
    "InputSparseBitmask",
    "INPUT_SPARSE_FORMATS",
    "FORMATS",
    "as_weight_array",
    "index_dtype_for",
]

_U16_LIMIT = 65536


def as_weight_array(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    """A C-contiguous float32 2-D NumPy copy-or-view of ``weight`` (no grad, on CPU)."""
    if isinstance(weight, torch.Tensor):
        if weight.dtype != torch.float32:
            raise SparseforgeError(f"weight dtype {weight.dtype} is not supported; allowed: torch.float32")
        arr = weight.detach().cpu().numpy()
    else:
        arr = np.asarray(weight)
        if arr.dtype != np.float32:
            raise SparseforgeError(f"weight dtype {arr.dtype} is not supported; allowed: float32")
    if arr.ndim != 2:
        raise SparseforgeError(
            f"weight has shape {tuple(arr.shape)}; allowed: a 2-D (out_features, in_features) weight"
        )
    return np.ascontiguousarray(arr)


def index_dtype_for(extent: int) -> np.dtype:
    """Narrowest unsigned index dtype that can address ``extent`` positions (uint16 or int32)."""
    return np.dtype(np.uint16) if extent <= _U16_LIMIT else np.dtype(np.int32)


def _pointer_dtype_for(count: int) -> np.dtype:
    return np.dtype(np.int32) if count < 2**31 else np.dtype(np.int64)


def _require(arrays: dict[str, np.ndarray], names: tuple[str, ...], kind: str) -> None:
    missing = [n for n in names if n not in arrays]
    if missing:
        raise SparseforgeError(f"{kind} arrays are missing {missing}; allowed: exactly {list(names)}")


class PackedFormat:
    """Common interface: ``from_dense``, ``to_dense``, ``nbytes``, ``arrays`` and ``from_arrays``."""

    name: ClassVar[str]
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, weight: torch.Tensor | np.ndarray) -> PackedFormat:  # pragma: no cover
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:  # pragma: no cover
        """The dense float32 weight of shape ``(out_features, in_features)``."""
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:  # pragma: no cover
        """The arrays that fully describe the packed weight (for saving)."""
        raise NotImplementedError

    @classmethod
    def from_arrays(
        cls, shape: tuple[int, int], arrays: dict[str, np.ndarray], params: dict[str, int]
    ) -> PackedFormat:  # pragma: no cover
        """Rebuild from :meth:`arrays`, validating every invariant the kernels rely on."""
        raise NotImplementedError

    def params(self) -> dict[str, int]:
        """Integer parameters beyond the shape (e.g. ``n``, ``m``, block shape)."""
        return {}

    @property
    def nbytes(self) -> int:
        """Bytes of all packed arrays."""
        return int(sum(a.nbytes for a in self.arrays().values()))

    @property
    def nnz(self) -> int:  # pragma: no cover
        """Number of stored values (may include explicit zero padding)."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class CompactCSR(PackedFormat):
    """CSR with narrow indices: uint16 columns when ``in_features <= 65536``.

    ``indptr`` has ``out_features + 1`` entries; row ``r`` holds ``values[indptr[r]:indptr[r+1]]``
    at columns ``indices[...]``, increasing within a row.
    """

    name: ClassVar[str] = "csr"
    shape: tuple[int, int]
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray

    @classmethod
    def from_dense(cls, weight: torch.Tensor | np.ndarray) -> CompactCSR:
        w = as_weight_array(weight)
        rows, cols = w.shape
        r, c = np.nonzero(w)
        counts = np.bincount(r, minlength=rows)
        indptr = np.zeros(rows + 1, dtype=_pointer_dtype_for(len(r)))
        np.cumsum(counts, out=indptr[1:])
        return cls((rows, cols), indptr, c.astype(index_dtype_for(cols)), np.ascontiguousarray(w[r, c]))

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        out = np.zeros((rows, cols), dtype=np.float32)
        ip = self.indptr.astype(np.int64)  # ip[1:] - ip[:-1] is np.diff, which numpy's stubs type as timedelta64
        r = np.repeat(np.arange(rows), ip[1:] - ip[:-1])
        out[r, self.indices.astype(np.int64)] = self.values
        return torch.from_numpy(out)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"indptr": self.indptr, "indices": self.indices, "values": self.values}

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @classmethod
    def from_arrays(cls, shape: tuple[int, int], arrays: dict[str, np.ndarray], params: dict[str, int]) -> CompactCSR:
        _require(arrays, ("indptr", "indices", "values"), "csr")
        rows, cols = shape
        indptr, indices, values = arrays["indptr"], arrays["indices"], arrays["values"]
        ok = (
            indptr.ndim == 1
            and indptr.shape[0] == rows + 1
            and indptr.dtype in (np.int32, np.int64)
            and values.dtype == np.float32
            and indices.shape == values.shape
            and values.ndim == 1
            and indices.dtype == index_dtype_for(cols)
        )
        if ok:
            ip = indptr.astype(np.int64)
            ok = ip[0] == 0 and ip[-1] == values.shape[0] and bool(np.all(np.diff(ip) >= 0))
            ok = ok and (indices.size == 0 or (int(indices.min()) >= 0 and int(indices.max()) < cols))
        if not ok:
            raise SparseforgeError(
                f"csr arrays are inconsistent with shape {shape}; allowed: a file written by save_converted"
            )
        return cls(shape, indptr, indices, values)


# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Bitmask(PackedFormat):
    """One bit per weight plus the kept values in row-major order.

    ``mask`` is ``(out_features, ceil(in_features / 64))`` uint64; bit ``j % 64`` of word ``j // 64``
    is column ``j``. ``rowptr[r]`` is the offset of row ``r``'s first value (int64, ``out+1`` long).
    At density ``d`` this costs ``4 d + 1/8`` bytes per weight: 13.1 % of dense at 90 % sparsity.
    """

    name: ClassVar[str] = "bitmask"
    shape: tuple[int, int]
    mask: np.ndarray
    rowptr: np.ndarray
    values: np.ndarray

    @classmethod
    def from_dense(cls, weight: torch.Tensor | np.ndarray) -> Bitmask:
        w = as_weight_array(weight)
        rows, cols = w.shape
        keep = w != 0
        words = (cols + 63) // 64
        padded = np.zeros((rows, words * 64), dtype=bool)
        padded[:, :cols] = keep
        packed = np.packbits(padded, axis=1, bitorder="little")  # (rows, words*8) uint8
        mask = np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)
        rowptr = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(keep.sum(axis=1), out=rowptr[1:])
        return cls((rows, cols), np.ascontiguousarray(mask), rowptr, np.ascontiguousarray(w[keep]))

    def _bool_mask(self) -> np.ndarray:
        rows, cols = self.shape
        as_bytes = np.ascontiguousarray(self.mask.astype("<u8", copy=False)).view(np.uint8)
        return np.unpackbits(as_bytes.reshape(rows, -1), axis=1, bitorder="little")[:, :cols].astype(bool)

    def to_dense(self) -> torch.Tensor:
        out = np.zeros(self.shape, dtype=np.float32)
        out[self._bool_mask()] = self.values
        return torch.from_numpy(out)

    def arrays(self) -> dict[str, np.ndarray]:
        # rowptr is derivable from the mask, so it is not stored (see from_arrays).
        return {"mask": self.mask, "values": self.values}

    @property
    def nbytes(self) -> int:
        return int(self.mask.nbytes + self.values.nbytes + self.rowptr.nbytes)

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @classmethod
    def from_arrays(cls, shape: tuple[int, int], arrays: dict[str, np.ndarray], params: dict[str, int]) -> Bitmask:
        _require(arrays, ("mask", "values"), "bitmask")
        rows, cols = shape
        mask, values = arrays["mask"], arrays["values"]
        words = (cols + 63) // 64
        if mask.dtype != np.uint64 or mask.shape != (rows, words) or values.dtype != np.float32 or values.ndim != 1:
            raise SparseforgeError(
                f"bitmask arrays are inconsistent with shape {shape}; allowed: a file written by save_converted"
            )
        fmt = cls(shape, np.ascontiguousarray(mask), np.zeros(rows + 1, np.int64), values)
        keep = fmt._bool_mask()
        # Bits beyond in_features must be clear, and the popcount must match the value count.
        tail_ok = words * 64 == cols or not np.any(
            np.unpackbits(
                np.ascontiguousarray(mask.astype("<u8", copy=False)).view(np.uint8).reshape(rows, -1),
                axis=1,
                bitorder="little",
            )[:, cols:]
        )
        np.cumsum(keep.sum(axis=1), out=fmt.rowptr[1:])
        if not tail_ok or int(fmt.rowptr[-1]) != values.shape[0]:
            raise SparseforgeError(
                f"bitmask has {int(fmt.rowptr[-1])} set bits but {values.shape[0]} values; allowed: equal counts"
            )
        return fmt


# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class PackedNM(PackedFormat):
    """N:M sparsity: in each group of ``m`` consecutive inputs at most ``n_keep`` are nonzero.

    ``values`` is ``(out_features, groups * n_keep)`` fp32 and ``positions`` the same shape in
    uint8: the offset ``0..m-1`` of each value inside its group, increasing within a group. Groups
    with fewer nonzeros are padded with explicit zeros at unused positions.
    """

    name: ClassVar[str] = "nm"
    shape: tuple[int, int]
    n_keep: int
    m: int
    values: np.ndarray
    positions: np.ndarray

    @staticmethod
    def fits(weight: torch.Tensor | np.ndarray, n_keep: int, m: int) -> bool:
        """Whether every group of ``m`` inputs of ``weight`` has at most ``n_keep`` nonzeros."""
        w = as_weight_array(weight)
        if m < 1 or not (0 < n_keep <= m) or w.shape[1] % m:
            return False
        return bool((w.reshape(w.shape[0], -1, m) != 0).sum(axis=2).max(initial=0) <= n_keep)

    @classmethod
    def from_dense(cls, weight: torch.Tensor | np.ndarray, n_keep: int = 2, m: int = 4) -> PackedNM:
        w = as_weight_array(weight)
        rows, cols = w.shape
        if not (1 <= m <= 255) or not (0 < n_keep <= m):
            raise SparseforgeError(f"NM({n_keep}, {m}) is not allowed; allowed: 0 < n_keep <= m <= 255")
        if cols % m:
            raise SparseforgeError(f"in_features={cols} is not a multiple of m={m}; allowed: multiples of m")
        groups = w.reshape(rows, cols // m, m)
        nz = groups != 0
        if nz.sum(axis=2).max(initial=0) > n_keep:
            raise SparseforgeError(
                f"weight is not NM({n_keep}, {m}): some group of {m} inputs has more than {n_keep} nonzeros"
            )
        # Stable order: nonzeros first (by position), then zeros (by position); keep the first n_keep.
        order = np.argsort(~nz, axis=2, kind="stable")[:, :, :n_keep]
        positions = np.sort(order, axis=2).astype(np.uint8)
        values = np.take_along_axis(groups, positions.astype(np.int64), axis=2)
        return cls(
            (rows, cols),
            int(n_keep),
            int(m),
            np.ascontiguousarray(values.reshape(rows, -1)),
            np.ascontiguousarray(positions.reshape(rows, -1)),
        )

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        out = np.zeros((rows, cols // self.m, self.m), dtype=np.float32)
        pos = self.positions.reshape(rows, -1, self.n_keep).astype(np.int64)
        np.put_along_axis(out, pos, self.values.reshape(rows, -1, self.n_keep), axis=2)
        return torch.from_numpy(out.reshape(rows, cols))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"values": self.values, "positions": self.positions}

    def params(self) -> dict[str, int]:
        return {"n_keep": self.n_keep, "m": self.m}

    @property
    def nnz(self) -> int:
        return int(self.values.size)

    @classmethod
    def from_arrays(cls, shape: tuple[int, int], arrays: dict[str, np.ndarray], params: dict[str, int]) -> PackedNM:
        _require(arrays, ("values", "positions"), "nm")
        rows, cols = shape
        n, m = int(params.get("n_keep", 0)), int(params.get("m", 0))
        values, positions = arrays["values"], arrays["positions"]
        ok = (
            1 <= m <= 255
            and 0 < n <= m
            and cols % m == 0
            and values.dtype == np.float32
            and positions.dtype == np.uint8
            and values.shape == (rows, cols // m * n)
            and positions.shape == values.shape
        )
        if ok and positions.size:
            p = positions.reshape(rows, -1, n).astype(np.int64)
            ok = int(p.max()) < m and bool(np.all(np.diff(p, axis=2) > 0))
        if not ok:
            raise SparseforgeError(
                f"nm arrays are inconsistent with shape {shape} and NM({n}, {m}); allowed: a file written by save_converted"
            )
        return cls(shape, n, m, values, positions)


# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class BlockSparse(PackedFormat):
    """Block sparse rows (BSR-like): dense ``(bh, bw)`` blocks where any weight is nonzero.

    ``block_rowptr`` (int32, ``out/bh + 1``) and ``block_cols`` (uint16 or int32 block-column
    indices) index ``blocks`` of shape ``(nblocks, bh, bw)``. ``out`` and ``in`` must be
    multiples of ``bh`` and ``bw``.
    """

    name: ClassVar[str] = "block"
    shape: tuple[int, int]
    bh: int
    bw: int
    block_rowptr: np.ndarray
    block_cols: np.ndarray
    blocks: np.ndarray

    @staticmethod
    def fill_ratio(weight: torch.Tensor | np.ndarray, bh: int, bw: int) -> float:
        """Fraction of weights inside nonzero ``(bh, bw)`` blocks that are nonzero (1.0 = perfectly blocked)."""
        w = as_weight_array(weight)
        rows, cols = w.shape
        if rows % bh or cols % bw:
            return 0.0
        nzb = (w.reshape(rows // bh, bh, cols // bw, bw) != 0).any(axis=(1, 3)).sum()
        return float((w != 0).sum() / (nzb * bh * bw)) if nzb else 1.0

    @classmethod
    def from_dense(cls, weight: torch.Tensor | np.ndarray, bh: int = 4, bw: int = 4) -> BlockSparse:
        w = as_weight_array(weight)
        rows, cols = w.shape
        if bh < 1 or bw < 1 or rows % bh or cols % bw:
            raise SparseforgeError(
                f"block ({bh}, {bw}) does not tile weight shape {(rows, cols)}; allowed: divisors of the shape"
            )
        tiles = w.reshape(rows // bh, bh, cols // bw, bw).transpose(0, 2, 1, 3)  # (R, C, bh, bw)
        nzb = (tiles != 0).any(axis=(2, 3))
        br, bc = np.nonzero(nzb)
        rowptr = np.zeros(rows // bh + 1, dtype=np.int32)
        np.cumsum(np.bincount(br, minlength=rows // bh), out=rowptr[1:])
        return cls(
            (rows, cols),
            int(bh),
            int(bw),
            rowptr,
            bc.astype(index_dtype_for(cols // bw)),
            np.ascontiguousarray(tiles[br, bc]),
        )

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        tiles = np.zeros((rows // self.bh, cols // self.bw, self.bh, self.bw), dtype=np.float32)
        ip = self.block_rowptr.astype(np.int64)  # as in CompactCSR.to_dense
        br = np.repeat(np.arange(rows // self.bh), ip[1:] - ip[:-1])
        tiles[br, self.block_cols.astype(np.int64)] = self.blocks
        return torch.from_numpy(np.ascontiguousarray(tiles.transpose(0, 2, 1, 3)).reshape(rows, cols))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"block_rowptr": self.block_rowptr, "block_cols": self.block_cols, "blocks": self.blocks}

    def params(self) -> dict[str, int]:
        return {"bh": self.bh, "bw": self.bw}

    @property
    def nnz(self) -> int:
        return int(self.blocks.size)

    @classmethod
    def from_arrays(cls, shape: tuple[int, int], arrays: dict[str, np.ndarray], params: dict[str, int]) -> BlockSparse:
        _require(arrays, ("block_rowptr", "block_cols", "blocks"), "block")
        rows, cols = shape
        bh, bw = int(params.get("bh", 0)), int(params.get("bw", 0))
        rp, bc, blocks = arrays["block_rowptr"], arrays["block_cols"], arrays["blocks"]
        ok = bh >= 1 and bw >= 1 and rows % bh == 0 and cols % bw == 0
        ok = ok and rp.dtype == np.int32 and rp.shape == (rows // bh + 1,) and blocks.dtype == np.float32
        ok = ok and bc.dtype == index_dtype_for(cols // bw) and blocks.shape == (bc.shape[0], bh, bw) and bc.ndim == 1
        if ok:
            ip = rp.astype(np.int64)
            ok = ip[0] == 0 and ip[-1] == bc.shape[0] and bool(np.all(np.diff(ip) >= 0))
            ok = ok and (bc.size == 0 or int(bc.max()) < cols // bw)
        if not ok:
            raise SparseforgeError(
                f"block arrays are inconsistent with shape {shape} and block ({bh}, {bw}); allowed: a file written by save_converted"
            )
        return cls(shape, bh, bw, rp, bc, blocks)


# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class CompactDense(PackedFormat):
    """The dense sub-matrix over the output rows and input columns that hold any nonzero.

    For channel (structured) pruning: whole output neurons (zero rows) or inputs (zero columns)
    removed. ``rows`` and ``cols`` (uint16 or int32, strictly increasing) index the kept ones;
    ``weight`` is ``(len(rows), len(cols))`` fp32, zeros inside it included. Runs as a smaller
    dense matmul (PyTorch's BLAS), so it is fast where whole channels are gone and no use for
    unstructured zeros (:func:`CompactDense.area` says how much of the matrix it keeps).
    """

    name: ClassVar[str] = "compact"
    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    weight: np.ndarray

    @staticmethod
    def area(weight: torch.Tensor | np.ndarray) -> float:
        """Fraction of the weight matrix the compacted sub-matrix keeps (1.0 = no zero row or column)."""
        w = as_weight_array(weight)
        if w.size == 0:
            return 1.0
        nz = w != 0
        return float(nz.any(axis=1).sum()) * float(nz.any(axis=0).sum()) / w.size

    @classmethod
    def from_dense(cls, weight: torch.Tensor | np.ndarray) -> CompactDense:
        w = as_weight_array(weight)
        nz = w != 0
        rows = np.flatnonzero(nz.any(axis=1))
        cols = np.flatnonzero(nz.any(axis=0))
        sub = np.ascontiguousarray(w[np.ix_(rows, cols)])
        return cls(w.shape, rows.astype(index_dtype_for(w.shape[0])), cols.astype(index_dtype_for(w.shape[1])), sub)

    def to_dense(self) -> torch.Tensor:
        out = np.zeros(self.shape, dtype=np.float32)
        out[np.ix_(self.rows.astype(np.int64), self.cols.astype(np.int64))] = self.weight
        return torch.from_numpy(out)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"rows": self.rows, "cols": self.cols, "weight": self.weight}

    @property
    def nnz(self) -> int:
        return int(self.weight.size)

    @classmethod
    def from_arrays(cls, shape: tuple[int, int], arrays: dict[str, np.ndarray], params: dict[str, int]) -> CompactDense:
        _require(arrays, ("rows", "cols", "weight"), "compact")
        out_f, in_f = shape
        rows, cols, weight = arrays["rows"], arrays["cols"], arrays["weight"]
        ok = (
            rows.dtype == index_dtype_for(out_f)
            and cols.dtype == index_dtype_for(in_f)
            and rows.ndim == 1
            and cols.ndim == 1
        )
        ok = ok and weight.dtype == np.float32 and weight.shape == (rows.shape[0], cols.shape[0])
        for idx, extent in ((rows, out_f), (cols, in_f)):
            if ok and idx.size:
                i = idx.astype(np.int64)
                ok = bool(np.all(np.diff(i) > 0)) and int(i[0]) >= 0 and int(i[-1]) < extent
        if not ok:
            raise SparseforgeError(
                f"compact arrays are inconsistent with shape {shape}; allowed: a file written by save_converted"
            )
        return cls(shape, rows, cols, weight)


# --------------------------------------------------------------------------------------------
#: Output tile heights of the sparse-input layouts: the outputs are padded to a multiple of the
#: tile, and the kernel splits them between threads in whole tiles.
INPUT_SPARSE_TILES = (16, 32, 64, 128)


def _tile_count(rows: int, tile: int) -> int:
    return (rows + tile - 1) // tile


def _padded_transpose(w: np.ndarray, tile: int) -> np.ndarray:
    """``w`` ``(rows, cols)`` as W^T ``(cols, ceil(rows / tile) * tile)``, row-major, outputs zero padded."""
    rows, cols = w.shape
    out = np.zeros((cols, _tile_count(rows, tile) * tile), dtype=np.float32)
    out[:, :rows] = w.T
    return out


@dataclass(eq=False)
class InputSparseDense(PackedFormat):
    """A dense weight laid out for sparse *inputs*: W^T row-major ("input-major").

    ``weight_t`` is ``(in_features, ceil(out_features / tile) * tile)`` float32: row ``j`` holds
    input ``j``'s weights for every output (``W[:, j]``, zero padded). At batch 1 with a sparse
    input, the kernel streams the rows of the *active* inputs only; the skipped ones are whole
    rows away, so the hardware prefetchers do not fetch them. ``tile`` (one of
    :data:`INPUT_SPARSE_TILES`, 64 by default) is the padding and the unit of the thread split.
    """

    name: ClassVar[str] = "input-sparse"
    shape: tuple[int, int]
    tile: int
    weight_t: np.ndarray

    @classmethod
    def from_dense(cls, weight: torch.Tensor | np.ndarray, tile: int = 64) -> InputSparseDense:
        if tile not in INPUT_SPARSE_TILES or isinstance(tile, bool):
            raise SparseforgeError(f"tile={tile!r} is not allowed; allowed: one of {INPUT_SPARSE_TILES}")
        w = as_weight_array(weight)
        return cls((int(w.shape[0]), int(w.shape[1])), int(tile), _padded_transpose(w, int(tile)))

    def to_dense(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.weight_t[:, : self.shape[0]].T))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weight_t": self.weight_t}

    def params(self) -> dict[str, int]:
        return {"tile": self.tile}

    @property
    def nnz(self) -> int:
        return int(self.weight_t.size)

    @classmethod
    def from_arrays(
        cls, shape: tuple[int, int], arrays: dict[str, np.ndarray], params: dict[str, int]
    ) -> InputSparseDense:
        _require(arrays, ("weight_t",), "input-sparse")
        rows, cols = shape
        tile = int(params.get("tile", 0))
        wt = arrays["weight_t"]
        ok = tile in INPUT_SPARSE_TILES and wt.dtype == np.float32
        ok = ok and wt.shape == (cols, _tile_count(rows, tile) * tile)
        if ok and rows % tile:
            ok = not np.any(wt[:, rows:])  # the padding outputs are zero
        if not ok:
            raise SparseforgeError(
                f"input-sparse arrays are inconsistent with shape {shape} and tile {tile}; allowed: a file written by save_converted"
            )
        return cls(shape, tile, np.ascontiguousarray(wt))


@dataclass(eq=False)
class InputSparseBitmask(PackedFormat):
    """A pruned weight laid out for sparse inputs: per input, its kept weights, with a mask per 64 outputs.

    ``mask`` is ``(in_features, ceil(out_features / 64))`` uint64: bit ``i`` of ``mask[j, t]`` says
    whether ``W[64 t + i, j]`` is kept. ``values`` holds the kept values input by input (weight
    column by column), in output order. Derived (not stored): ``colptr`` (int64, ``in + 1``: where
    each input's values start) and ``coloff`` (uint32, like ``mask``: where tile ``t``'s values
    start inside input ``j``'s), so a thread jumps straight to its outputs. At weight density
    ``d`` this costs ``4 d + 1/8 + 1/16`` bytes per weight (mask and offsets), and an active input
    reads only its kept values, contiguously: sparse weights and sparse inputs multiply.
    """

    name: ClassVar[str] = "input-sparse+bitmask"
    shape: tuple[int, int]
    mask: np.ndarray
    values: np.ndarray
    colptr: np.ndarray
    coloff: np.ndarray

    tile: ClassVar[int] = 64

    @staticmethod
    def _offsets(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(colptr, coloff)`` of a ``(cols, tiles)`` uint64 mask."""
        counts = np.unpackbits(
            np.ascontiguousarray(mask.astype("<u8", copy=False)).view(np.uint8).reshape(mask.shape + (8,)), axis=2
        ).sum(axis=2, dtype=np.int64)
        per_col = counts.sum(axis=1)
        colptr = np.zeros(mask.shape[0] + 1, dtype=np.int64)
        np.cumsum(per_col, out=colptr[1:])
        coloff = np.zeros(mask.shape, dtype=np.int64)
        if mask.shape[1] > 1:
            np.cumsum(counts[:, :-1], axis=1, out=coloff[:, 1:])
        return colptr, coloff.astype(np.uint32)

    @classmethod
    def from_dense(cls, weight: torch.Tensor | np.ndarray) -> InputSparseBitmask:
        w = as_weight_array(weight)
        rows, cols = w.shape
        if rows >= 2**32:
            raise SparseforgeError(f"out_features={rows} is too large; allowed: at most {2**32 - 1}")
        wt = _padded_transpose(w, 64).reshape(cols, -1, 64)  # (cols, tiles, 64)
        keep = wt != 0
        mask = np.packbits(keep, axis=2, bitorder="little").view("<u8").reshape(keep.shape[:2])
        mask = np.ascontiguousarray(mask.astype(np.uint64, copy=False))
        colptr, coloff = cls._offsets(mask)
        return cls((rows, cols), mask, np.ascontiguousarray(wt[keep]), colptr, coloff)

    def to_dense(self) -> torch.Tensor:
        cols, nt = self.mask.shape
        keep = np.unpackbits(
            np.ascontiguousarray(self.mask.astype("<u8", copy=False)).view(np.uint8).reshape(cols, nt, 8),
            axis=2,
            bitorder="little",
        ).astype(bool)
        wt = np.zeros((cols, nt, 64), dtype=np.float32)
        wt[keep] = self.values
        return torch.from_numpy(np.ascontiguousarray(wt.reshape(cols, nt * 64)[:, : self.shape[0]].T))

    def arrays(self) -> dict[str, np.ndarray]:
        # colptr and coloff are derivable from the mask (see from_arrays)
        return {"mask": self.mask, "values": self.values}

    @property
    def nbytes(self) -> int:
        return int(self.mask.nbytes + self.values.nbytes + self.colptr.nbytes + self.coloff.nbytes)

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @classmethod
    def from_arrays(
        cls, shape: tuple[int, int], arrays: dict[str, np.ndarray], params: dict[str, int]
    ) -> InputSparseBitmask:
        _require(arrays, ("mask", "values"), "input-sparse+bitmask")
        rows, cols = shape
        mask, values = arrays["mask"], arrays["values"]
        ok = mask.dtype == np.uint64 and mask.shape == (cols, _tile_count(rows, 64))
        ok = ok and values.dtype == np.float32 and values.ndim == 1 and rows < 2**32
        if ok and rows % 64 and mask.size:
            ok = not np.any(mask[:, -1] >> np.uint64(rows % 64))  # no bit in the padding outputs
        if not ok:
            raise SparseforgeError(
                f"input-sparse+bitmask arrays are inconsistent with shape {shape}; allowed: a file written by save_converted"
            )
        colptr, coloff = cls._offsets(mask)
        if int(colptr[-1]) != values.shape[0]:
            raise SparseforgeError(
                f"input-sparse+bitmask has {int(colptr[-1])} set bits but {values.shape[0]} values; allowed: equal counts"
            )
        return cls(shape, np.ascontiguousarray(mask), np.ascontiguousarray(values), colptr, coloff)


# --------------------------------------------------------------------------------------------
#: Default input features per block of :class:`PairedCSR` (at 64 batch rows per tile the block's
#: inputs are 32 KiB, inside a 48 KiB L1) and rows per group.
PAIRS_BLOCK_COLS = 128
PAIRS_GROUP_ROWS = 64
_PAIRS_MAX_CB = 256


@dataclass(eq=False)
class PairedCSR(PackedFormat):
    """Rows in pairs and input features in blocks, for the batched (encoder-regime) kernel.

    Rows are padded to an even count and taken in pairs ``(2p, 2p + 1)``; groups of ``group`` rows
    run together; input features are cut into blocks of ``cb`` (<= 256) columns. For each (group,
    block, pair) three runs follow each other, each in column order: the columns both rows keep
    (one uint8 column inside the block, two values), then those only the first row keeps, then
    those only the second keeps (one column, one value). ``counts`` int32 ``(ngroups, nblocks,
    group // 2, 3)`` holds the run lengths. A shared column is read once for both rows, which
    saves input loads in the kernel (:func:`.kernels.sparse_matmul_tensor`); bytes per kept weight
    are 4 + 1 (one byte per column entry, shared entries counted once).
    """

    name: ClassVar[str] = "pairs"
    shape: tuple[int, int]
    cb: int
    group: int
    counts: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    share: int = 1

    def __post_init__(self) -> None:
        per = self.counts.reshape(-1, self.counts.shape[2], 3) if self.counts.size else self.counts.reshape(0, 1, 3)
        n_cols = per.sum(axis=(1, 2), dtype=np.int64)
        n_vals = (2 * per[..., 0].astype(np.int64) + per[..., 1] + per[..., 2]).sum(axis=1)
        starts = np.zeros((n_cols.shape[0], 2), dtype=np.int64)
        if n_cols.shape[0] > 1:
            np.cumsum(n_cols[:-1], out=starts[1:, 0])
            np.cumsum(n_vals[:-1], out=starts[1:, 1])
        #: offsets of each (group, block) in ``cols`` and ``values`` (derived, not saved)
        self.starts = starts

    @staticmethod
    def _check_params(cb: int, group: int) -> None:
        if isinstance(cb, bool) or not isinstance(cb, (int, np.integer)) or not 1 <= int(cb) <= _PAIRS_MAX_CB:
            raise SparseforgeError(
                f"pairs block width cb={cb!r} is not allowed; allowed: an integer in 1..{_PAIRS_MAX_CB}"
            )
        if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 2 or group % 2:
            raise SparseforgeError(f"pairs group={group!r} is not allowed; allowed: an even integer >= 2")

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor | np.ndarray,
        cb: int = PAIRS_BLOCK_COLS,
        group: int = PAIRS_GROUP_ROWS,
        share: bool = True,
    ) -> PairedCSR:
        """Pack ``weight``; ``share=False`` stores every weight in its own row's run (no shared
        columns): at high sparsity two rows rarely share a column, and the empty shared runs
        only cost loop overhead."""
        cls._check_params(cb, group)
        if not isinstance(share, (bool, np.bool_, int, np.integer)) or share not in (0, 1):
            raise SparseforgeError(f"pairs share={share!r} is not allowed; allowed: True or False")
        cb, group = int(cb), int(group)
        w = as_weight_array(weight)
        rows, cols = w.shape
        rows_pad = rows + rows % 2
        half = group // 2
        ng, nb = -(-rows_pad // group), -(-cols // cb)
        k1 = w[0::2] != 0
        k2 = np.zeros_like(k1)
        k2[: rows // 2] = w[1::2] != 0
        if share:
            kind = np.where(k1 & k2, 0, np.where(k1, 1, np.where(k2, 2, 3))).astype(np.int8)
            p, c = np.nonzero(kind < 3)  # pair-major, columns increasing
            k = kind[p, c].astype(np.int64)
        else:  # every kept weight in its own row's run
            p1, c1 = np.nonzero(k1)
            p2, c2 = np.nonzero(k2)
            p, c = np.concatenate([p1, p2]), np.concatenate([c1, c2])
            k = np.concatenate([np.ones(p1.shape[0], np.int64), np.full(p2.shape[0], 2, np.int64)])
        b = c // cb
        key = (((p // half) * nb + b) * half + p % half) * 3 + k
        order = np.argsort(key, kind="stable")
        p, c, k, b, key = p[order], c[order], k[order], b[order], key[order]
        counts = np.bincount(key, minlength=ng * nb * half * 3).astype(np.int32).reshape(ng, nb, half, 3)
        first = w[2 * p, c]
        second = np.zeros_like(first)
        has2 = 2 * p + 1 < rows
        second[has2] = w[2 * p[has2] + 1, c[has2]]
        nv = np.where(k == 0, 2, 1)
        pos = np.cumsum(nv) - nv
        values = np.empty(int(nv.sum()), dtype=np.float32)
        values[pos[k != 2]] = first[k != 2]
        values[pos[k == 0] + 1] = second[k == 0]
        values[pos[k == 2]] = second[k == 2]
        return cls((rows, cols), cb, group, counts, (c - b * cb).astype(np.uint8), values, int(bool(share)))

    def _entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per column entry: its pair, its input feature and its run (0 shared, 1 first, 2 second)."""
        ng, nb, half, _ = self.counts.shape
        seg = np.repeat(np.arange(self.counts.size, dtype=np.int64), self.counts.ravel().astype(np.int64))
        k = seg % 3
        q = seg // 3 % half
        b = seg // (3 * half) % nb
        g = seg // (3 * half * nb)
        return g * half + q, b * self.cb + self.cols.astype(np.int64), k

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        out = np.zeros((rows + rows % 2, cols), dtype=np.float32)
        p, c, k = self._entries()
        nv = np.where(k == 0, 2, 1)
        pos = np.cumsum(nv) - nv
        out[2 * p[k != 2], c[k != 2]] = self.values[pos[k != 2]]
        out[2 * p[k == 0] + 1, c[k == 0]] = self.values[pos[k == 0] + 1]
        out[2 * p[k == 2] + 1, c[k == 2]] = self.values[pos[k == 2]]
        return torch.from_numpy(np.ascontiguousarray(out[:rows]))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts, "cols": self.cols, "values": self.values}

    def params(self) -> dict[str, int]:
        return {"cb": self.cb, "group": self.group, "share": self.share}

    @property
    def nbytes(self) -> int:
        return int(self.counts.nbytes + self.cols.nbytes + self.values.nbytes + self.starts.nbytes)

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @classmethod
    def from_arrays(cls, shape: tuple[int, int], arrays: dict[str, np.ndarray], params: dict[str, int]) -> PairedCSR:
        _require(arrays, ("counts", "cols", "values"), "pairs")
        cb, group, share = params.get("cb"), params.get("group"), params.get("share", 1)
        cls._check_params(cb, group)  # type: ignore[arg-type]
        cb, group = int(cb), int(group)  # type: ignore[arg-type]
        if share not in (0, 1):
            raise SparseforgeError(f"pairs share={share!r} is not allowed; allowed: 0 or 1")
        rows, cols = shape
        rows_pad = rows + rows % 2
        counts, col, values = arrays["counts"], arrays["cols"], arrays["values"]
        ng, nb, half = -(-rows_pad // group), -(-cols // cb), group // 2
        bad = (
            counts.dtype != np.int32
            or counts.shape != (ng, nb, half, 3)
            or col.dtype != np.uint8
            or col.ndim != 1
            or values.dtype != np.float32
            or values.ndim != 1
        )
        if not bad:
            c64 = counts.astype(np.int64)
            bad = bool(np.any(c64 < 0)) or int(c64.sum()) != col.shape[0]
            bad = bad or int((2 * c64[..., 0] + c64[..., 1] + c64[..., 2]).sum()) != values.shape[0]
            bad = bad or (share == 0 and bool(np.any(c64[..., 0])))
        if bad:
            raise SparseforgeError(
                f"pairs arrays are inconsistent with shape {shape}; allowed: a file written by save_converted"
            )
        fmt = cls(shape, cb, group, np.ascontiguousarray(counts), np.ascontiguousarray(col), values, int(share))
        p, c, k = fmt._entries()
        # every entry inside the matrix (the kernel reads inputs at these columns), no pair past
        # the padded rows, no value in the padding row, and no (row, column) stored twice
        ok = bool(np.all(c < cols)) and bool(np.all(2 * p < rows_pad))
        ok = ok and (rows % 2 == 0 or not bool(np.any((2 * p + 1 == rows) & (k != 1))))
        if ok and c.size:
            r_first = np.where(k != 2, 2 * p, -1)
            r_second = np.where(k != 1, 2 * p + 1, -1)
            cells = np.concatenate([r_first * cols + c, r_second * cols + c])
            cells = cells[cells >= 0]
            ok = np.unique(cells).size == cells.size
        if not ok:
            raise SparseforgeError(
                f"pairs entries fall outside shape {shape} or repeat a weight; allowed: a file written by save_converted"
            )
        return fmt


#: The formats of the sparse-input kernel (batch 1, sparse activations), by name.
INPUT_SPARSE_FORMATS: dict[str, type[PackedFormat]] = {f.name: f for f in (InputSparseDense, InputSparseBitmask)}

FORMATS: dict[str, type[PackedFormat]] = {
    f.name: f
    for f in (
        CompactCSR,
        Bitmask,
        PackedNM,
        BlockSparse,
        CompactDense,
        PairedCSR,
        InputSparseDense,
        InputSparseBitmask,
    )
}
