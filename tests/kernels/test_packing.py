import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from piecewise_quant.kernels import pack_codes, packed_length, unpack_codes


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), n=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip_is_exact(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g, dtype=torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_length(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packing_is_dense(bits):
    # 3-bit codes take 3 bits, not 4: 64 codes fit in 24 bytes
    codes = torch.zeros(1, 64, dtype=torch.int32)
    assert pack_codes(codes, bits).shape[-1] == 64 * bits // 8


def test_four_bit_layout_low_nibble_first():
    packed = pack_codes(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4)
    assert packed.tolist() == [[0x21, 0x43, 0x65, 0x87]]


def test_three_bit_layout_is_a_little_endian_bit_stream():
    codes = torch.tensor([[7, 0, 0, 0, 0, 0, 0, 5]])  # bits 0-2 = 111, bits 21-23 = 101
    assert pack_codes(codes, 3).tolist() == [[0x07, 0x00, 0xA0]]


def test_out_of_range_codes_raise():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="bits=9"):
        pack_codes(torch.tensor([[1]]), 9)


def test_wrong_packed_length_raises():
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.uint8), 4, 8)
