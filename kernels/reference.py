"""Pure-torch reference implementations of every kernel op.

They are the CPU path and the oracle the Triton kernels are tested against. Shapes:
``qweight`` is ``(out, packed_length(in, bits))`` uint8 (see :mod:`.packing`); ``scales`` is
``(out, n_groups)`` or ``(1, 1)`` for a per-tensor scale (``group_size == -1``); ``aux`` is the
b-bit per-group field (zero points for ``uniform_asym``, breakpoint ids for ``piecewise``), stored
transposed and packed along the output dimension, shape ``(n_groups, packed_length(out, bits))``
(GPTQ's ``qzeros`` layout: a column-parallel shard of whole bytes is a shard of output rows).
FP4 (``mxfp4`` / ``nvfp4``, :mod:`.fp4`): 4-bit E2M1 codes packed the same way, ``scales`` the
``uint8`` E8M0 exponents or ``float8_e4m3fn`` block scales ``(out, n_groups)``; ``nvfp4``'s ``aux``
is its float32 per-tensor scale ``(1,)``.
"""

from __future__ import annotations

import torch

from .fp4 import FP4_ACT_BLOCK, e2m1_decode, fp4_fake_quantize, fp4_scales
from .grids import piecewise_levels, piecewise_table
from .packing import pack_codes, unpack_codes

__all__ = [
    "WEIGHT_FORMATS",
    "ACT_FORMATS",
    "ACT_MODES",
    "dequantize",
    "round_half_even",
    "pack_group_field",
    "unpack_group_field",
    "piecewise_levels",
    "quantize_activation",
    "linear",
]

WEIGHT_FORMATS = ("uniform_sym", "uniform_asym", "piecewise", "fp8_e4m3", "mxfp4", "nvfp4")
ACT_FORMATS = ("none", "int8", "int4", "fp8_e4m3", "mxfp4", "nvfp4")
ACT_MODES = ("dynamic_per_token", "dynamic_per_token_asym", "static_per_tensor")
# mxfp4 / nvfp4 activations are dynamic only, with block scales (kernels/fp4.py): 6 is E2M1's largest value
ACT_QMAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0, "mxfp4": 6.0, "nvfp4": 6.0}
FP4_FORMATS = ("mxfp4", "nvfp4")


def _grouped(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    out, in_features = codes.shape
    if group_size == -1:
        if scales.shape != (1, 1):
            raise ValueError(f"per-tensor scales must have shape (1, 1), got {tuple(scales.shape)}")
        return codes.reshape(1, 1, -1), 1
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    n_groups = in_features // group_size
    if scales.shape != (out, n_groups):
        raise ValueError(f"scales must have shape {(out, n_groups)}, got {tuple(scales.shape)}")
    return codes.reshape(out, n_groups, group_size), n_groups


_MAGIC = 12582912.0  # 1.5 * 2**23: adding it leaves only the integer part in a float32 mantissa


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """``torch.round`` for float32 values (ties to even), exact for ``|x| < 2**22`` (larger values are
    clamped there, far outside every code range). The quantizer search loops use it because
    ``torch.round`` on small CPU tensors can take milliseconds per call when threads are contended."""
    return (x.to(torch.float32).clamp(-4194304.0, 4194304.0) + _MAGIC) - _MAGIC


def pack_group_field(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a per-group field ``(rows, n_groups)`` into ``(n_groups, packed_length(rows, bits))``."""
    return pack_codes(values.t().contiguous(), bits)


def unpack_group_field(packed: torch.Tensor, bits: int, rows: int, n_groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_group_field`: ``int32`` of shape ``(rows, n_groups)``."""
    if packed.shape[0] != n_groups:
        raise ValueError(f"per-group field has {packed.shape[0]} rows, expected n_groups={n_groups}")
    return unpack_codes(packed, bits, rows).t()


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    aux: torch.Tensor | None,
    weight_format: str,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Float weight ``(out, in_features)`` from packed tensors; math in float32, result in ``dtype``."""
    if weight_format == "fp8_e4m3":
        return (qweight.to(torch.float32) * scales.to(torch.float32)).to(dtype)
    if weight_format in FP4_FORMATS:  # E2M1 codes times a float32 block scale (kernels/fp4.py)
        codes = unpack_codes(qweight, 4, in_features)
        g, _ = _grouped(codes, scales, group_size)
        s = fp4_scales(weight_format, scales, aux).unsqueeze(-1)
        return (e2m1_decode(g) * s).reshape(codes.shape).to(dtype)
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight_format {weight_format!r}; allowed: {WEIGHT_FORMATS}")
    codes = unpack_codes(qweight, bits, in_features)
    g, n_groups = _grouped(codes, scales, group_size)
    s = scales.to(torch.float32).unsqueeze(-1)
    half = float(1 << (bits - 1))
    if weight_format == "uniform_sym":
        w = (g.to(torch.float32) - half) * s
    elif weight_format == "uniform_asym":
        if aux is None:
            raise ValueError("uniform_asym needs packed zero points")
        z = unpack_group_field(aux, bits, g.shape[0], n_groups).unsqueeze(-1).to(torch.float32)
        w = (g.to(torch.float32) - z) * s
    else:
        if aux is None:
            raise ValueError("piecewise needs packed breakpoint ids")
        ids = unpack_group_field(aux, bits, g.shape[0], n_groups).long()
        table = piecewise_table(bits, qweight.device)
        h = table[ids, 0].unsqueeze(-1)
        r = table[ids, 1].unsqueeze(-1)
        w = piecewise_levels(g.to(torch.float32) - half, h, r) * s
    return w.reshape(codes.shape).to(dtype)


def quantize_activation(
    x: torch.Tensor,
    act_format: str,
    act_mode: str,
    act_scale: torch.Tensor | None = None,
    clip_ratio: float = 1.0,
    topk: int = 0,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` (simulated activation quantization), returning ``x``'s dtype.

    ``dynamic_per_token``: one symmetric scale per token (last dim), from the token's range.
    ``dynamic_per_token_asym`` (int formats): a scale ``s`` and an offset ``c`` per token, from
    its minimum and maximum, the half-range times ``clip_ratio`` about their midpoint; the
    value is ``s * q + c`` with integer ``q`` in ``[-qmax-1, qmax]`` (all ``2^bits`` levels).
    ``static_per_tensor``: the given calibrated scalar ``act_scale``.
    The range is ``clip_ratio`` times the ``(topk+1)``-th largest magnitude, so the ``topk``
    largest magnitudes of a token are clipped (``topk=0`` is the plain absolute maximum).
    """
    if act_format == "none":
        return x
    if act_format not in ACT_QMAX:
        raise ValueError(f"unknown act_format {act_format!r}; allowed: {ACT_FORMATS}")
    if act_format in FP4_ACT_BLOCK:
        if act_mode != "dynamic_per_token" or clip_ratio != 1.0 or topk != 0:
            raise ValueError(f"{act_format} activations are dynamic with block scales only (act_mode="
                             f"'dynamic_per_token', act_clip_ratio=1.0, act_topk=0); got {act_mode!r}, "
                             f"{clip_ratio}, {topk}")
        return fp4_fake_quantize(x, act_format)
    qmax = ACT_QMAX[act_format]
    xf = x.to(torch.float32)
    if act_mode == "dynamic_per_token_asym":
        if act_format not in ("int8", "int4") or topk != 0:
            raise ValueError(f"dynamic_per_token_asym activations are int8/int4 without top-k clipping; got "
                             f"{act_format!r}, topk={topk}")
        return _asym_per_token(xf, qmax, clip_ratio).to(x.dtype)
    if act_mode == "static_per_tensor":
        if act_scale is None:
            raise ValueError("static_per_tensor activation quantization needs a calibrated act_scale")
        scale = act_scale.to(torch.float32).reshape(())
    elif act_mode == "dynamic_per_token":
        mag = xf.abs()
        if topk > 0:
            k = min(topk + 1, mag.shape[-1])
            rng = mag.topk(k, dim=-1).values[..., -1:]
        else:
            rng = mag.amax(dim=-1, keepdim=True)
        scale = rng * clip_ratio / qmax
    else:
        raise ValueError(f"unknown act_mode {act_mode!r}; allowed: {ACT_MODES}")
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = xf / safe
    if act_format in ("int8", "int4"):
        y = torch.clamp(torch.round(y), -qmax, qmax)
    else:
        y = torch.clamp(y, -qmax, qmax).to(torch.float8_e4m3fn).to(torch.float32)
    y = torch.where(scale > 0, y * safe, torch.zeros_like(y))
    return y.to(x.dtype)


def _asym_scales(xf: torch.Tensor, qmax: float, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(scale, offset)`` of asymmetric activations (float32, last dim kept as 1): the
    levels ``scale * q + offset``, ``q`` in ``[-qmax-1, qmax]``, span the token's minimum to maximum
    (shrunk by ``clip_ratio`` about the midpoint). A constant token gets scale 0 and is exact."""
    hi = xf.amax(dim=-1, keepdim=True)
    lo = xf.amin(dim=-1, keepdim=True)
    mid = (hi + lo) * 0.5
    half = (hi - lo) * (0.5 * clip_ratio)
    scale = half * (2.0 / (2.0 * qmax + 1.0))
    offset = mid - half + (qmax + 1.0) * scale
    return scale, offset


def _asym_per_token(xf: torch.Tensor, qmax: float, clip_ratio: float) -> torch.Tensor:
    scale, offset = _asym_scales(xf, qmax, clip_ratio)
    pos = scale > 0
    safe = torch.where(pos, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((xf - offset) / safe), -qmax - 1.0, qmax)
    # a constant row (scale 0) is its offset, its value, exactly; a row holding NaN or Inf gives NaN, as
    # it would in float (the symmetric mode zeroes a NaN row)
    return torch.where(pos, q * safe + offset, torch.where(torch.isfinite(scale), offset, scale))


def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    aux: torch.Tensor | None,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    weight_format: str,
    bits: int,
    group_size: int,
    in_features: int,
    act_format: str = "none",
    act_mode: str = "dynamic_per_token",
    act_clip_ratio: float = 1.0,
    act_topk: int = 0,
) -> torch.Tensor:
    """``F.linear(quantize_activation(x), dequantize(weight), bias)`` in ``x``'s dtype."""
    xq = quantize_activation(x, act_format, act_mode, act_scale, act_clip_ratio, act_topk)
    w = dequantize(qweight, scales, aux, weight_format, bits, group_size, in_features, x.dtype)
    b = bias.to(x.dtype) if bias is not None else None
    return torch.nn.functional.linear(xq, w, b)
