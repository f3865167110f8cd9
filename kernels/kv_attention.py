"""Decode attention over a quantized KV cache, in C (``_pq_cpu.kv_attend``).

One query token per head attends to a cache stored as three parts in token order: full-precision
sink tokens, a packed history (codes with float16 scale and zero point, or piecewise codes with a
scale and breakpoint id, see ``piecewise_quant.kv.KVQTensor``) and a full-precision window of
recent tokens. The kernel reads
the codes directly: keys quantized per channel are folded into the query
(``q . (s * c + z) = (q * s) . c + q . z`` per block), values per token into the weights, so no
dequantized copy of the history is ever made. Scores, softmax and sums are float32.

:func:`kv_attend` takes plain tensors; the cache-level API is ``piecewise_quant.kv.decode_attention``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

__all__ = ["PackedSegment", "available", "kv_attend", "FUSED_BITS"]

FUSED_BITS = (2, 4, 8)
_AXES = {"token": 0, "channel": 1}


class PackedSegment(NamedTuple):
    """A packed history segment as the kernel reads it.

    ``codes``: uint8 ``(B, H, n, D*bits/8)`` (token axis) or ``(B, H, n/G, G, D*bits/8)`` (channel axis);
    ``scale``/``zero``: float16, one value per token and ``G`` channels (token axis) or per channel
    and block of ``G`` tokens (channel axis); ``zero`` is ``None`` for symmetric codes, which are
    offset by ``2**(bits-1)``. The piecewise grid adds ``breakpoint`` (uint8, ``scale``'s layout)
    and ``levels`` (float32 ``(256, 2**bits)``: the level of each breakpoint id and code, in units
    of the scale); its ``zero`` is ``None`` and its codes are looked up, not offset.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    tokens: int
    group_size: int
    bits: int
    axis: str
    breakpoint: torch.Tensor | None = None
    levels: torch.Tensor | None = None


@functools.lru_cache(maxsize=1)
def _ext():
    try:
        from . import _pq_cpu
    except ImportError:
        return None
    return _pq_cpu if hasattr(_pq_cpu, "kv_attend") else None


def available() -> bool:
    """Whether the compiled extension with the decode-attention kernel is importable."""
    return _ext() is not None


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def _segment_args(seg: PackedSegment | None, keep: list[torch.Tensor], b: int, h: int, d: int) -> tuple:
    if seg is None or seg.tokens == 0:
        return (0, 0, 0, 0, 1, 4, 0, 0, 0)
    codes, scale = seg.codes.contiguous(), seg.scale.contiguous()
    if seg.bits not in FUSED_BITS or seg.axis not in _AXES:
        raise ValueError(f"kv_attend: bits must be one of {FUSED_BITS} and axis 'token' or 'channel'")
    expect = b * h * seg.tokens * d * seg.bits // 8
    if codes.shape[:2] != (b, h) or codes.numel() != expect:
        raise ValueError(f"kv_attend: codes of shape {tuple(codes.shape)} do not hold ({b}, {h}, {seg.tokens}, {d}) "
                         f"{seg.bits}-bit codes")
    zero = None if seg.zero is None else seg.zero.contiguous()
    g = seg.group_size
    per = seg.tokens * (d // g) if seg.axis == "token" else (seg.tokens // g) * d
    if scale.numel() != b * h * per or (zero is not None and zero.numel() != b * h * per):
        raise ValueError(f"kv_attend: scale/zero hold {scale.numel()} values; expected {b * h * per}")
    if codes.dtype != torch.uint8 or scale.dtype != torch.float16 or (zero is not None and zero.dtype != torch.float16):
        raise ValueError("kv_attend: codes must be uint8 and scale/zero float16")
    keep += [codes, scale] + ([zero] if zero is not None else [])
    bp, lut = _piecewise_args(seg, scale)
    keep += [t for t in (bp, lut) if t is not None]
    return (codes.data_ptr(), scale.data_ptr(), 0 if zero is None else zero.data_ptr(), seg.tokens, seg.group_size,
            seg.bits, _AXES[seg.axis], 0 if bp is None else bp.data_ptr(), 0 if lut is None else lut.data_ptr())


def _piecewise_args(seg: PackedSegment, scale: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The piecewise segment's breakpoint ids and level table, checked (every uint8 id indexes the
    256-row table, so no id can read outside it)."""
    if seg.breakpoint is None and seg.levels is None:
        return None, None
    if seg.breakpoint is None or seg.levels is None or seg.zero is not None:
        raise ValueError("kv_attend: a piecewise segment needs breakpoint ids and a level table, and no zero point")
    bp, lut = seg.breakpoint.contiguous(), seg.levels.contiguous()
    if bp.dtype != torch.uint8 or bp.numel() != scale.numel():
        raise ValueError(f"kv_attend: breakpoint ids must be uint8 with one per scale ({scale.numel()})")
    if lut.dtype != torch.float32 or tuple(lut.shape) != (256, 1 << seg.bits):
        raise ValueError(f"kv_attend: the level table must be float32 of shape (256, {1 << seg.bits})")
    return bp, lut


def kv_attend(
    q: torch.Tensor,
    keys: tuple[torch.Tensor, PackedSegment | None, torch.Tensor],
    values: tuple[torch.Tensor, PackedSegment | None, torch.Tensor],
    scaling: float,
    mask: torch.Tensor | None = None,
    q_history: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per head, ``softmax(q k^T * scaling + mask) v``, in float32.

    Args:
        q: ``(B, Hq, D)``; ``Hq`` a multiple of the cache's ``Hkv`` (grouped-query attention).
        keys / values: ``(sink, history, window)`` with ``sink``/``window`` ``(B, Hkv, n, D)`` float
            tensors and ``history`` a :class:`PackedSegment` or ``None``.
        scaling: the factor on the scores (usually ``D ** -0.5``).
        mask: additive ``(B, T)`` float mask over all ``T`` cached tokens, or ``None``.
        q_history: the query used for the packed key history (when the history holds rotated keys,
            ``q`` rotated the same way); ``None``: ``q``.

    Returns ``(B, Hq, D)`` float32. Needs :func:`available`; raises ``ValueError`` on inconsistent parts.
    """
    ext = _ext()
    if ext is None:
        raise RuntimeError("the compiled extension piecewise_quant.kernels._pq_cpu with kv_attend is not available")
    b, hq, d = q.shape
    ks, kq, kr = keys
    vs, vq, vr = values
    hkv = ks.shape[1]
    keep: list[torch.Tensor] = []
    qf = _f32(q)
    qh = qf if q_history is None else _f32(q_history)
    ks, kr, vs, vr = _f32(ks), _f32(kr), _f32(vs), _f32(vr)
    for t in (ks, kr, vs, vr):
        if t.shape[0] != b or t.shape[1] != hkv or t.shape[3] != d:
            raise ValueError(f"kv_attend: a full-precision part has shape {tuple(t.shape)}; expected ({b}, {hkv}, n, {d})")
    total = ks.shape[2] + (kq.tokens if kq is not None else 0) + kr.shape[2]
    m = 0
    if mask is not None:
        mf = _f32(mask)
        if tuple(mf.shape) != (b, total):
            raise ValueError(f"kv_attend: mask has shape {tuple(mf.shape)}; expected ({b}, {total})")
        keep.append(mf)
        m = mf.data_ptr()
    out = torch.empty(b, hq, d, dtype=torch.float32)
    ext.kv_attend(qf.data_ptr(), qh.data_ptr(), m, out.data_ptr(), b, hq, hkv, d, float(scaling),
                  ks.data_ptr(), ks.shape[2], _segment_args(kq, keep, b, hkv, d), kr.data_ptr(), kr.shape[2],
                  vs.data_ptr(), _segment_args(vq, keep, b, hkv, d), vr.data_ptr(), vr.shape[2], torch.get_num_threads())
    return out
