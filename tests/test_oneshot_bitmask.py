"""The one-bit-per-weight mask store of the one-shot driver."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.oneshot.bitmask import BitMask


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(min_value=0, max_value=17), min_size=1, max_size=3),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    density=st.floats(min_value=0.0, max_value=1.0),
)
def test_pack_unpack_round_trip(shape: list[int], seed: int, density: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < density
    packed = BitMask.pack(mask)
    assert packed.bits.nbytes == (mask.numel() + 7) // 8
    back = packed.unpack()
    assert back.dtype == torch.bool and back.shape == mask.shape
    assert torch.equal(back, mask)


def test_non_contiguous_mask_keeps_its_own_layout() -> None:
    mask = torch.tensor([[True, False, False], [True, True, False]])
    packed = BitMask.pack(mask.t())  # (3, 2), not contiguous
    assert packed.shape == (3, 2)
    assert packed.unpack().tolist() == [[True, True], [False, True], [False, False]]


def test_pack_refuses_a_float_mask() -> None:
    with pytest.raises(TypeError, match="bool"):
        BitMask.pack(torch.ones(3))
