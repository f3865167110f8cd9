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
``piecewise`` ``d = q - A``, ``(h, r) = table[k]``, ``w = s * (d if |d| <= h else sign(d)(h + r(|d| - h)))``;
``mxfp4`` / ``nvfp4`` (4-bit E2M1 codes, :mod:`.fp4`) ``w = e2m1(q) * s`` where ``s`` is decoded in the
kernel from the stored ``uint8`` E8M0 exponent (``2**(e-127)``) or E4M3 bits times the float32
per-tensor scale passed as ``aux`` (``(1,)``), exactly as :func:`.reference.dequantize` computes it.
The weight is dequantized in float32 and rounded to ``x``'s dtype (as the reference does); products
accumulate in float32. Supported: bits 2, 3, 4, 8; x float16/bfloat16/float32.

Two kernels, chosen by the number of rows ``M`` of ``x`` (:func:`choose_path`):

* **skinny** (``M <= SKINNY_MAX_M = 16``, decode): split-K GEMV. A program owns ``BLOCK_N`` outputs
  and a run of K tiles; it loads each packed byte of its weight slice exactly once, contiguously
  along K, and splits every byte (or 3-byte word for 3 bits) into its codes by shifting ("phases"):
  phase ``p`` of byte ``j`` is column ``k0 + j * codes_per_byte + p``, so the matching columns of
  ``x`` are loaded strided instead of reordering the codes. Rows of ``x`` (padded to a power of
  two) multiply the dequantized phase by broadcast-multiply and ``tl.sum`` on CUDA cores (``tl.dot``
  needs 16 rows); with 9-16 rows ``tl.dot`` on the padded 16 rows takes over. The fp32 partial
  sums of the K splits are added atomically into a zeroed fp32 buffer (bias by split 0), then cast
  to ``x``'s dtype. The number of splits is chosen so there are about two programs per SM.
* **large** (``M > 16``, prefill): tiles of ``(BLOCK_M, BLOCK_N)`` outputs, each weight tile
  dequantized once per program inside the K loop and fed to ``tl.dot``.

Import this module lazily (it imports Triton); nothing here touches a GPU at import time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grids import piecewise_table
from .packing import packed_length
from .triton_common import INTERPRET, bucket_m, on_device, prune_by_m_bucket

__all__ = ["triton_linear", "choose_path", "FORMAT_IDS", "SUPPORTED_BITS", "SKINNY_MAX_M"]

FORMAT_IDS = {"uniform_sym": 0, "uniform_asym": 1, "piecewise": 2, "mxfp4": 3, "nvfp4": 4}
FP4_IDS = (3, 4)
SUPPORTED_BITS = (2, 3, 4, 8)
SKINNY_MAX_M = 16
# the broadcast-multiply of the skinny kernel materialises BLOCK_M x BLOCK_N x (codes per phase)
# float32 products: keep that within ~64 registers per thread at 4 warps
SKINNY_MAX_PRODUCT = 8192


def _configs() -> list[triton.Config]:
    if INTERPRET:  # the CPU interpreter: one config, no benchmarking
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    shapes = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages): decode-sized first, then prefill-sized
        (16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 3),
        (32, 64, 4, 4), (32, 128, 4, 3),
        (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


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


@triton.jit
def _fp4_scale(raw, glob, FMT: tl.constexpr):
    """float32 block scales from their stored bits: E8M0 (``FMT == 3``) or E4M3 times ``glob``."""
    b = raw.to(tl.int32)
    if FMT == 3:  # 2**(b - 127), built from the bits (b == 0: the subnormal 2**-127)
        s = tl.where(b == 0, 5.877471754111438e-39, (b << 23).to(tl.float32, bitcast=True))
    else:  # E4M3: sign, 4 exponent bits (bias 7), 3 mantissa bits; subnormals are m * 2**-9
        e = (b >> 3) & 15
        m = b & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
        s = tl.where((b & 128) != 0, -mag, mag) * glob
    return s


@triton.jit
def _e2m1(q):
    """The E2M1 value of 4-bit codes ``q`` (int32): sign bit 3, exponent bits 2-1, mantissa bit 0."""
    e = (q >> 1) & 3
    m = (q & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (2.0 + m) * tl.where(e == 1, 0.5, tl.where(e == 2, 1.0, 2.0)))
    return tl.where(q >= 8, -mag, mag)


@triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_K", "BITS", "FMT"],
    prune_configs_by={"early_config_prune": prune_by_m_bucket},
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
        qi = _extract(qw_ptr + offs_n[None, :] * stride_qn, offs_k[:, None], BITS, mask_n[None, :])
        q = qi.to(tl.float32)
        # one group per K tile: a scale (and an aux field) per output column
        g = k0 // GROUP_SIZE
        if FMT == 3 or FMT == 4:
            raw = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0)
            if FMT == 4:
                s = _fp4_scale(raw, tl.load(aux_ptr), FMT)
            else:
                s = _fp4_scale(raw, 1.0, FMT)
        else:
            s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        if FMT == 3 or FMT == 4:
            lev = _e2m1(qi)
        elif FMT == 0:  # uniform_sym
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


# ------------------------------------------------------------------------------ skinny (decode) path
def _skinny_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    shapes = [(16, 4), (32, 4), (64, 4), (128, 4), (128, 8), (256, 8)]  # (BLOCK_N, num_warps)
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=3) for n, w in shapes]


def _codes_per_unit(bits: int) -> int:
    """Codes in the smallest whole-byte unit of the packing: a byte, or 8 codes in 3 bytes."""
    return 8 if bits == 3 else 8 // bits


def _skinny_block_k(group_size: int, bits: int, m_bucket: int) -> int:
    """K tile of the skinny kernel: a power of two dividing ``group_size`` (one scale per tile),
    long for a single row (long contiguous loads), shorter as rows add register pressure."""
    return max(min(group_size & -group_size, 128 if m_bucket <= 4 else 64), _codes_per_unit(bits))


def _prune_skinny(configs, named_args, **kwargs):
    """Keep configs whose broadcast products fit in registers (the tl.dot branch at 16 rows has no limit)."""
    block_m = named_args["M_BUCKET"]
    per_phase = kwargs["BLOCK_K"] // _codes_per_unit(kwargs["BITS"])
    kept = [c for c in configs if block_m >= 16 or block_m * c.kwargs["BLOCK_N"] * per_phase <= SKINNY_MAX_PRODUCT]
    return kept or configs[:1]


def _tiles_per_split(args) -> int:
    """K tiles per program: enough K splits for about ``TARGET_PROGRAMS`` programs in all."""
    n_tiles = triton.cdiv(args["N"], args["BLOCK_N"])
    k_tiles = args["K"] // args["BLOCK_K"]
    splits = min(k_tiles, max(1, triton.cdiv(args["TARGET_PROGRAMS"], n_tiles)))
    return triton.cdiv(k_tiles, splits)


@triton.autotune(
    configs=_skinny_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_K", "BITS", "FMT"],
    prune_configs_by={"early_config_prune": _prune_skinny},
    reset_to_zero=["acc_ptr"],
)
@triton.heuristics({"TILES_PER_SPLIT": _tiles_per_split})
@triton.jit
def _skinny_kernel(
    x_ptr, qw_ptr, s_ptr, aux_ptr, table_ptr, bias_ptr, acc_ptr,
    M, N, K, M_BUCKET, TARGET_PROGRAMS,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_sg, stride_ag, TILES_PER_SPLIT,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, FMT: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    CODES: tl.constexpr = 8 if BITS == 3 else 8 // BITS  # codes per packing unit
    UNIT: tl.constexpr = 3 if BITS == 3 else 1  # bytes per packing unit
    PER_PHASE: tl.constexpr = BLOCK_K // CODES  # units per row of a K tile
    USE_DOT: tl.constexpr = BLOCK_M >= 16 and PER_PHASE >= 16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_u = tl.arange(0, PER_PHASE)
    mask_n = offs_n < N
    mask_m = offs_m < M
    half = (1 << (BITS - 1)) * 1.0
    x_dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_begin = pid_k * TILES_PER_SPLIT
    t_end = tl.minimum(t_begin + TILES_PER_SPLIT, K // BLOCK_K)
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        g = k0 // GROUP_SIZE
        if FMT == 3 or FMT == 4:
            raw = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0)
            if FMT == 4:
                s = _fp4_scale(raw, tl.load(aux_ptr), FMT)[:, None]
            else:
                s = _fp4_scale(raw, 1.0, FMT)[:, None]
        else:
            s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        if FMT == 1:
            z = _extract(aux_ptr + g * stride_ag, offs_n, BITS, mask_n).to(tl.float32)[:, None]
        elif FMT == 2:
            kid = _extract(aux_ptr + g * stride_ag, offs_n, BITS, mask_n)
            h = tl.load(table_ptr + kid * 2, mask=mask_n, other=1.0)[:, None]
            r = tl.load(table_ptr + kid * 2 + 1, mask=mask_n, other=1.0)[:, None]
        # the (BLOCK_N, PER_PHASE) packing units of this tile: every byte is read once, along K
        unit_ptrs = qw_ptr + offs_n[:, None] * stride_qn + ((k0 // CODES) + offs_u[None, :]) * UNIT
        word = tl.load(unit_ptrs, mask=mask_n[:, None], other=0).to(tl.int32)
        if UNIT == 3:
            word |= tl.load(unit_ptrs + 1, mask=mask_n[:, None], other=0).to(tl.int32) << 8
            word |= tl.load(unit_ptrs + 2, mask=mask_n[:, None], other=0).to(tl.int32) << 16
        for p in tl.static_range(CODES):
            qi = (word >> (p * BITS)) & ((1 << BITS) - 1)
            q = qi.to(tl.float32)
            if FMT == 3 or FMT == 4:
                lev = _e2m1(qi)
            elif FMT == 0:
                lev = q - half
            elif FMT == 1:
                lev = q - z
            else:
                d = q - half
                a = tl.abs(d)
                tail = h + r * (a - h)
                lev = tl.where(a <= h, d, tl.where(d < 0, -tail, tail))
            w = (lev * s).to(x_dtype)  # (BLOCK_N, PER_PHASE): columns k0 + u * CODES + p
            offs_k = k0 + offs_u * CODES + p
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None], other=0.0)
            if USE_DOT:
                if DOT_FP32:  # the interpreter's tl.dot multiplies bfloat16 bit patterns (triton#11584)
                    acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)

    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, b, 0.0)[None, :]
    out_ptrs = acc_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.atomic_add(out_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :], sem="relaxed")


_SM_COUNT: dict[int, int] = {}


def _target_programs(device: torch.device) -> int:
    """About two programs per SM keep every SM streaming weights; the interpreter gets a small
    target so the tests exercise several K splits."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]


def choose_path(m: int) -> str:
    """``"skinny"`` (split-K GEMV) for ``m <= SKINNY_MAX_M`` rows, ``"large"`` (``tl.dot`` tiles) above."""
    return "skinny" if m <= SKINNY_MAX_M else "large"


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
    if fmt in FP4_IDS:
        if bits != 4:
            raise ValueError(f"{weight_format} has 4-bit codes, not {bits}")
        want = torch.uint8 if fmt == 3 else torch.float8_e4m3fn
        if scales.dtype != want:
            raise ValueError(f"{weight_format} scales must be {want}, got {scales.dtype}")
        scales = scales.contiguous().view(torch.uint8)  # the kernel decodes the bits itself
        if fmt == 4:
            if aux is None or aux.numel() != 1 or aux.dtype != torch.float32:
                raise ValueError("nvfp4 needs its float32 per-tensor scale (one element) as aux")
            aux = aux.reshape(1).contiguous()
    elif fmt != 0:
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
    aux_arg = aux if fmt not in (0, 3) else qweight
    bias_arg = bias.to(x.dtype).contiguous() if bias is not None else y
    # float32 follows torch's matmul setting (TF32 off by default); the knob is moot for 16-bit inputs
    exact = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    precision = "ieee" if exact else "tf32"
    m_bucket = bucket_m(M)
    meta = dict(GROUP_SIZE=group_size, BITS=bits, FMT=fmt, HAS_BIAS=bias is not None, PRECISION=precision,
                DOT_FP32=INTERPRET and x.dtype == torch.bfloat16)
    with on_device(x):  # launch on x's GPU
        if choose_path(M) == "skinny":
            y = _launch_skinny(x2, qweight, scales, aux_arg, table, bias_arg, M, N, K, m_bucket, meta)
        else:
            _launch_large(x2, qweight, scales, aux_arg, table, bias_arg, y, M, N, K, m_bucket, meta, group_size)
    return y.reshape(*lead, N)


def _launch_large(x2, qweight, scales, aux_arg, table, bias_arg, y, M, N, K, m_bucket, meta, group_size):
    def grid(m):
        return (triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(N, m["BLOCK_N"]))

    _dequant_matmul_kernel[grid](
        x2, qweight, scales, aux_arg, table, bias_arg, y,
        M, N, K, m_bucket,
        x2.stride(0), x2.stride(1), qweight.stride(0), scales.stride(0), scales.stride(1),
        aux_arg.stride(0), y.stride(0), BLOCK_K=_block_k(group_size), **meta,
    )


def _launch_skinny(x2, qweight, scales, aux_arg, table, bias_arg, M, N, K, m_bucket, meta) -> torch.Tensor:
    acc = torch.zeros((M, N), dtype=torch.float32, device=x2.device)

    def grid(m):
        return (triton.cdiv(N, m["BLOCK_N"]), triton.cdiv(K // m["BLOCK_K"], m["TILES_PER_SPLIT"]))

    _skinny_kernel[grid](
        x2, qweight, scales, aux_arg, table, bias_arg, acc,
        M, N, K, m_bucket, _target_programs(x2.device),
        x2.stride(0), x2.stride(1), qweight.stride(0), scales.stride(0), scales.stride(1), aux_arg.stride(0),
        BLOCK_M=m_bucket, BLOCK_K=_skinny_block_k(meta["GROUP_SIZE"], meta["BITS"], m_bucket), **meta,
    )
    return acc if x2.dtype == torch.float32 else acc.to(x2.dtype)
