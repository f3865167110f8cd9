"""Dense bit packing of integer codes along the last dimension.

Layout (the checkpoint format depends on it, do not change without a format version bump):
code ``i`` of a row occupies bits ``[i*b, (i+1)*b)`` of that row's little-endian bit stream,
and byte ``j`` of the packed row holds bits ``[8j, 8j+8)``. Rows are padded with zero codes to a
multiple of 8 codes, so a packed row has ``ceil(n / 8) * b`` bytes. For b in {2, 4, 8} this is the
usual "low bits first" nibble/crumb packing; 3-bit codes really take 3 bits (8 codes in 3 bytes).
"""

from __future__ import annotations

import torch

__all__ = ["pack_codes", "unpack_codes", "packed_length"]

SUPPORTED_PACK_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_length(n: int, bits: int) -> int:
    """Bytes one packed row of ``n`` codes of ``bits`` bits takes."""
    return ((n + 7) // 8) * bits


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_PACK_BITS:
        raise ValueError(f"bits={bits} cannot be packed; allowed: {SUPPORTED_PACK_BITS}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (any integer dtype, values in [0, 2**bits)) along the last dim.

    Returns a ``torch.uint8`` tensor of shape ``(*codes.shape[:-1], packed_length(n, bits))``.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point:
        raise TypeError("pack_codes expects an integer tensor")
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing: [{int(c.min())}, {int(c.max())}]")
    pad = (-n) % 8
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, -1, 8)
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1)  # up to 64 bits: 8 codes * 8 bits
    byte_shifts = torch.arange(bits, device=c.device, dtype=torch.int64) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.reshape(*lead, -1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: returns ``int32`` codes of shape ``(*lead, n)``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    lead = packed.shape[:-1]
    expected = packed_length(n, bits)
    if packed.shape[-1] != expected:
        raise ValueError(f"packed row has {packed.shape[-1]} bytes, expected {expected} for {n} codes of {bits} bits")
    p = packed.to(torch.int64).reshape(*lead, -1, bits)
    byte_shifts = torch.arange(bits, device=p.device, dtype=torch.int64) * 8
    word = (p << byte_shifts).sum(-1)
    shifts = torch.arange(8, device=p.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*lead, -1)[..., :n].to(torch.int32)
