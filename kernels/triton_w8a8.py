"""Triton W8A8 GEMM: activations quantized per token (or per tensor) by a small producer kernel,
then an 8-bit x 8-bit ``tl.dot`` with the scales applied in the epilogue.

Two variants, each the fast form of :func:`piecewise_quant.kernels.reference.linear` for one
``(weight_format, act_format)`` pair:

* **int8** (``uniform_sym`` 8-bit weights, ``act_format="int8"``): ``qweight`` is ``uint8``
  ``(N, packed_length(K, 8))`` holding ``q = w / s_w + 128`` (8-bit packing is the identity, rows
  padded to a multiple of 8); the kernel flips the top bit (``q ^ 0x80`` is ``q - 128`` as int8), so
  no separate int8 copy of the weight exists. ``tl.dot`` on int8 operands accumulates in int32
  (exact for ``K < 2**17``).
* **fp8** (``fp8_e4m3`` weights, ``act_format="fp8_e4m3"``): ``qweight`` is ``float8_e4m3fn``
  ``(N, K)``; activations are scaled to +-448 and rounded to E4M3; ``tl.dot`` on fp8 operands
  accumulates in float32. Needs a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper).

``scales`` is ``(N, 1)`` (one scale per output channel, ``group_size == in_features``) or ``(1, 1)``
(per tensor, ``group_size == -1``). Activation quantization follows
:func:`~piecewise_quant.kernels.reference.quantize_activation` exactly: ``dynamic_per_token`` takes
``s_x = clip_ratio * max|x_row| / qmax``, ``static_per_tensor`` the calibrated ``act_scale``; codes
are ``clamp(round_half_even(x / s_x), -qmax, qmax)`` (int8) or ``clamp(x / s_x, -448, 448)`` rounded
to E4M3, and a zero scale gives a zero row. The output is ``(acc * s_x[m] * s_w[n] + bias)`` in
``x``'s dtype: the reference's math up to float rounding (it rounds the dequantized operands to
``x``'s dtype before a float matmul). ``act_topk > 0`` is not handled here (the backend falls back).

Import this module lazily (it imports Triton); nothing here touches a GPU at import time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packing import packed_length
from .triton_common import INTERPRET, bucket_m, on_device, prune_by_m_bucket

__all__ = ["w8a8_linear", "quantize_activation_8bit", "W8A8_PAIRS", "FP8_MAX"]

FP8_MAX = 448.0
INT8_MAX = 127.0
# (weight_format, act_format) pairs this module runs
W8A8_PAIRS = (("uniform_sym", "int8"), ("fp8_e4m3", "fp8_e4m3"))
ACT_BLOCK = 1024


@triton.jit
def _round_half_even(v):
    """Round float32 ``v`` (``|v| < 2**22``) to the nearest integer, ties to even, as ``torch.round``."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _round_to_e4m3_grid(v):
    """Round float32 ``v`` (``|v| <= 448``) to the nearest E4M3 value, ties to even, in float32.
    Only used under the interpreter, whose float32 -> fp8 cast is wrong when rounding carries into
    the exponent (31.5 -> 16 instead of 32); on a GPU the hardware conversion is used."""
    exp_bits = v.to(tl.int32, bitcast=True) & 0x7F800000
    step = (exp_bits - (3 << 23)).to(tl.float32, bitcast=True)  # 2**(e - 3): three mantissa bits
    step = tl.maximum(step, 0.001953125)  # subnormals (and zero) step by 2**-9
    return _round_half_even(v / step) * step


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, act_scale_ptr, K, stride_xm, stride_qm, clip_ratio,
    QMAX: tl.constexpr, STATIC: tl.constexpr, FP8: tl.constexpr, FP8_GRID_FIX: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    offs = tl.arange(0, BLOCK)
    if STATIC:
        scale = tl.load(act_scale_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.math.div_rn(tl.max(amax, axis=0) * clip_ratio, QMAX)
    safe = tl.where(scale > 0, scale, 1.0)
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, safe)
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        if FP8:
            if FP8_GRID_FIX:
                v = _round_to_e4m3_grid(v)
            q = v.to(q_ptr.dtype.element_ty)
        else:
            q = _round_half_even(v).to(tl.int8)
        tl.store(q_ptr + row * stride_qm + k0 + offs, q, mask=mask)
    tl.store(s_ptr + row, scale)


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): decode-sized first
        (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 128, 4, 4),
        (64, 128, 128, 4, 4), (64, 256, 128, 8, 3), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3),
        (128, 128, 64, 4, 4), (256, 128, 128, 8, 3),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "FP8"],
                 prune_configs_by={"early_config_prune": prune_by_m_bucket})
@triton.jit
def _w8a8_kernel(
    a_ptr, b_ptr, sx_ptr, sw_ptr, bias_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_bn, stride_sw, stride_ym,
    FP8: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if FP8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # the (BLOCK_K, BLOCK_N) tile of W^T; padded columns multiply zero activations
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None], mask=mask_n[None, :] & mask_k[:, None])
        if FP8:
            acc = tl.dot(a, b, acc)
        else:
            acc = tl.dot(a, (b ^ 0x80).to(tl.int8, bitcast=True), acc, out_dtype=tl.int32)
    sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0)
    sw = tl.load(sw_ptr + offs_n * stride_sw, mask=mask_n, other=0.0).to(tl.float32)
    out = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def quantize_activation_8bit(
    x: torch.Tensor,
    act_format: str,
    act_mode: str = "dynamic_per_token",
    act_scale: torch.Tensor | None = None,
    clip_ratio: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D ``x`` to int8 or E4M3 codes, one float32 scale per row (the producer of the
    W8A8 GEMM). ``q * s[:, None]`` equals ``reference.quantize_activation(x, ...)`` up to the final
    rounding to ``x``'s dtype; rows whose scale is 0 dequantize to 0."""
    if act_format not in ("int8", "fp8_e4m3"):
        raise ValueError(f"act_format must be 'int8' or 'fp8_e4m3', not {act_format!r}")
    if act_mode not in ("dynamic_per_token", "static_per_tensor"):
        raise ValueError(f"act_mode must be 'dynamic_per_token' or 'static_per_tensor', not {act_mode!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (tokens, features), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16/bfloat16/float32, got {x.dtype}")
    static = act_mode == "static_per_tensor"
    if static and (act_scale is None or act_scale.numel() != 1):
        raise ValueError("static_per_tensor activation quantization needs a one-element act_scale")
    fp8 = act_format == "fp8_e4m3"
    M, K = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, s
    scale_arg = act_scale.to(device=x.device, dtype=torch.float32).reshape(1) if static else s
    block = min(ACT_BLOCK, triton.next_power_of_2(max(K, 1)))
    with on_device(x):
        _act_quant_kernel[(M,)](
            x, q, s, scale_arg, K, x.stride(0), q.stride(0), float(clip_ratio),
            QMAX=FP8_MAX if fp8 else INT8_MAX, STATIC=static, FP8=fp8, FP8_GRID_FIX=INTERPRET and fp8, BLOCK=block,
        )
    return q, s


def w8a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    weight_format: str,
    group_size: int,
    in_features: int,
    act_format: str,
    act_mode: str = "dynamic_per_token",
    act_scale: torch.Tensor | None = None,
    clip_ratio: float = 1.0,
) -> torch.Tensor:
    """``quantize_activation(x) @ dequantize(W)^T + bias`` in ``x``'s dtype, as an 8-bit GEMM.

    ``(weight_format, act_format)`` is ``("uniform_sym", "int8")`` (8-bit codes, offset 128) or
    ``("fp8_e4m3", "fp8_e4m3")``; ``group_size`` is ``in_features`` (per-channel scales ``(N, 1)``)
    or ``-1`` (one scale ``(1, 1)``). ``x`` may have any leading dims.
    """
    if (weight_format, act_format) not in W8A8_PAIRS:
        raise ValueError(f"w8a8_linear runs (weight_format, act_format) in {W8A8_PAIRS}, not {(weight_format, act_format)}")
    K = in_features
    if group_size not in (K, -1):
        raise ValueError(f"w8a8_linear needs per-channel (group_size == in_features == {K}) or per-tensor (-1) "
                         f"weight scales, got group_size={group_size}")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, expected {K}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"w8a8_linear needs a float16/bfloat16/float32 input, got {x.dtype}")
    N = qweight.shape[0]
    fp8 = weight_format == "fp8_e4m3"
    want = (torch.float8_e4m3fn, (N, K)) if fp8 else (torch.uint8, (N, packed_length(K, 8)))
    if qweight.dim() != 2 or (qweight.dtype, tuple(qweight.shape)) != want:
        raise ValueError(f"qweight must be {want[0]} {want[1]}, got {qweight.dtype} {tuple(qweight.shape)}")
    want_scales = (N, 1) if group_size == K else (1, 1)
    if tuple(scales.shape) != want_scales:
        raise ValueError(f"scales must have shape {want_scales}, got {tuple(scales.shape)}")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"bias must have {N} elements, got {bias.numel()}")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    xq, sx = quantize_activation_8bit(x2, act_format, act_mode, act_scale, clip_ratio)
    qweight = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    bias_arg = bias.to(x.dtype).contiguous() if bias is not None else y
    m_bucket = bucket_m(M)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    with on_device(x):
        _w8a8_kernel[grid](
            xq, qweight, sx, scales, bias_arg, y,
            M, N, K, m_bucket,
            xq.stride(0), qweight.stride(0), scales.stride(0) if scales.shape[0] > 1 else 0, y.stride(0),
            FP8=fp8, HAS_BIAS=bias is not None,
        )
    return y.reshape(*lead, N)
