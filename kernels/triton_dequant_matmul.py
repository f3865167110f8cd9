"""Triton dequantize-matmul: ``y = x @ W^T + bias`` with ``W`` dequantized tile by tile inside the GEMM.

Layout assumptions (the same as :mod:`.reference`, see :mod:`.packing` and :mod:`.grids`):

* ``qweight``: ``uint8`` ``(N, packed_length(K, bits))``, row ``n`` holds the ``K`` codes of output
  ``n``; code ``k`` occupies bits ``[k*bits, (k+1)*bits)`` of the row's little-endian bit stream
  (for 2/4/8 bits a byte holds 4/2/1 codes, low bits first; 3-bit codes may straddle two bytes).
* ``scales``: ``(N, K // group_size)`` float16/bfloat16/float32, one (signed) scale per group of
  ``group_size`` consecutive input columns of one output row.
* ``aux``: the per-group ``bits``-bit field (zero points for ``uniform_asym``, breakpoint ids for
  ``piecewise``) transposed and packed along N: ``uint8`` ``(K // group_size, packed_length(N, bits))``.
  ``None`` for ``uniform_sym``.
* ``K`` is a multiple of ``group_size`` and ``group_size`` a multiple of 16, so a K tile of
  ``BLOCK_K`` (a power of two dividing ``group_size``) lies inside one group and never needs a mask.

Formats, with ``A = 2**(bits-1)``: ``uniform_sym`` ``w = (q - A) s``; ``uniform_asym`` ``w = (q - z) s``;
``piecewise`` ``d = q - A``, ``(h, r) = table[k]``, ``w = s * (d if |d| <= h else sign(d)(h + r(|d| - h)))``.
The weight is dequantized in float32, rounded to ``x``'s dtype (as the reference does) and fed to
``tl.dot`` with float32 accumulation. Supported: bits 2, 3, 4, 8; x float16/bfloat16/float32.

Import this module lazily (it imports Triton); nothing here touches a GPU at import time.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .grids import piecewise_table
from .packing import packed_length

__all__ = ["triton_linear", "FORMAT_IDS", "SUPPORTED_BITS"]

FORMAT_IDS = {"uniform_sym": 0, "uniform_asym": 1, "piecewise": 2}
SUPPORTED_BITS = (2, 3, 4, 8)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_M_BUCKET = 256


def _configs() -> list[triton.Config]:
    if INTERPRET:  # the CPU interpreter: one config, no benchmarking
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    shapes = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages): decode-sized first, then prefill-sized
        (16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 3),
        (32, 64, 4, 4), (32, 128, 4, 3),
        (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    """Drop configs whose M tile is much larger than the (bucketed) number of rows."""
    limit = max(16, named_args["M_BUCKET"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= limit]
    return kept or configs[:1]


@triton.jit
def _extract(base_ptr, idx, BITS: tl.constexpr, mask):
    """The ``BITS``-bit code number ``idx`` of a densely packed little-endian row at ``base_ptr``."""
    if 8 % BITS == 0:  # 2, 4, 8 bits: 8 // BITS whole codes per byte (idx // c keeps the loads coalesced)
        word = tl.load(base_ptr + idx // (8 // BITS), mask=mask, other=0).to(tl.int32)
        shift = (idx % (8 // BITS)) * BITS
    else:  # 3 bits: a code may straddle two bytes
        bit = idx * BITS
        shift = bit % 8
        lo = tl.load(base_ptr + bit // 8, mask=mask, other=0).to(tl.int32)
        hi = tl.load(base_ptr + bit // 8 + 1, mask=mask & (shift + BITS > 8), other=0).to(tl.int32)
        word = lo | (hi << 8)
    return (word >> shift) & ((1 << BITS) - 1)


@triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_K", "BITS", "FMT"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _dequant_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, aux_ptr, table_ptr, bias_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_sg, stride_ag, stride_ym,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, FMT: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    half = (1 << (BITS - 1)) * 1.0

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None], other=0.0)
        # codes of the (BLOCK_K, BLOCK_N) tile of W^T
        q = _extract(qw_ptr + offs_n[None, :] * stride_qn, offs_k[:, None], BITS, mask_n[None, :]).to(tl.float32)
        # one group per K tile: a scale (and an aux field) per output column
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        if FMT == 0:  # uniform_sym
            lev = q - half
        elif FMT == 1:  # uniform_asym: aux is the zero point
            z = _extract(aux_ptr + g * stride_ag, offs_n, BITS, mask_n).to(tl.float32)
            lev = q - z[None, :]
        else:  # piecewise: aux is the breakpoint id into the (h, r) table
            kid = _extract(aux_ptr + g * stride_ag, offs_n, BITS, mask_n)
            h = tl.load(table_ptr + kid * 2, mask=mask_n, other=1.0)[None, :]
            r = tl.load(table_ptr + kid * 2 + 1, mask=mask_n, other=1.0)[None, :]
            d = q - half
            a = tl.abs(d)
            tail = h + r * (a - h)
            lev = tl.where(a <= h, d, tl.where(d < 0, -tail, tail))
        w = (lev * s[None, :]).to(x.dtype)
        if DOT_FP32:  # the CPU interpreter's tl.dot multiplies bfloat16 bit patterns (triton#11584)
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _block_k(group_size: int) -> int:
    """The largest power of two dividing ``group_size``, capped (64 keeps shared memory modest)."""
    return min(group_size & -group_size, 64)


def triton_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    aux: torch.Tensor | None,
    bias: torch.Tensor | None,
    weight_format: str,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ W^T + bias`` in ``x``'s dtype (float32 accumulation); ``x`` may have any leading dims."""
    if weight_format not in FORMAT_IDS:
        raise ValueError(f"triton_linear supports weight formats {tuple(FORMAT_IDS)}, not {weight_format!r}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"triton_linear supports bits in {SUPPORTED_BITS}, not {bits}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"triton_linear needs a float16/bfloat16/float32 input, got {x.dtype}")
    K, N = in_features, qweight.shape[0]
    if group_size <= 0 or group_size % 16 or K % group_size:
        raise ValueError(f"group_size must be a positive multiple of 16 dividing in_features={K}, got {group_size}")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, expected {K}")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"bias must have {N} elements, got {bias.numel()}")
    n_groups = K // group_size
    if qweight.dtype != torch.uint8 or tuple(qweight.shape) != (N, packed_length(K, bits)):
        raise ValueError(f"qweight must be uint8 {(N, packed_length(K, bits))}, got {qweight.dtype} {tuple(qweight.shape)}")
    if tuple(scales.shape) != (N, n_groups):
        raise ValueError(f"scales must have shape {(N, n_groups)}, got {tuple(scales.shape)}")
    fmt = FORMAT_IDS[weight_format]
    if fmt != 0:
        if aux is None or aux.dtype != torch.uint8 or tuple(aux.shape) != (n_groups, packed_length(N, bits)):
            got = None if aux is None else (aux.dtype, tuple(aux.shape))
            raise ValueError(f"{weight_format} needs uint8 aux of shape {(n_groups, packed_length(N, bits))}, got {got}")
        aux = aux.contiguous()

    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    qweight = qweight.contiguous()
    table = piecewise_table(bits, x.device) if fmt == 2 else qweight  # dummy pointers are never read
    aux_arg = aux if fmt != 0 else qweight
    bias_arg = bias.to(x.dtype).contiguous() if bias is not None else y
    # float32 follows torch's matmul setting (TF32 off by default); the knob is moot for 16-bit inputs
    exact = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    precision = "ieee" if exact else "tf32"
    m_bucket = min(triton.next_power_of_2(M), MAX_M_BUCKET)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # launch on x's GPU
        _dequant_matmul_kernel[grid](
            x2, qweight, scales, aux_arg, table, bias_arg, y,
            M, N, K, m_bucket,
            x2.stride(0), x2.stride(1), qweight.stride(0), scales.stride(0), scales.stride(1),
            aux_arg.stride(0), y.stride(0),
            GROUP_SIZE=group_size, BITS=bits, FMT=fmt, HAS_BIAS=bias is not None,
            PRECISION=precision, DOT_FP32=INTERPRET and x.dtype == torch.bfloat16, BLOCK_K=_block_k(group_size),
        )
    return y.reshape(*lead, N)
