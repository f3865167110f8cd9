"""The CPU kernel backend of ``piecewise_quant::linear``: fused dequantize-and-multiply kernels in C.

The kernels live in the compiled extension ``piecewise_quant.kernels._pq_cpu`` (``kernels/csrc/pq_cpu.c``),
built when the package is installed; nothing is compiled at run time. They read the checkpoint's
packed layout directly (no repacking, no float copy of the weight) and pick their instruction set
from CPUID when the extension loads:

* ``avx512-vnni`` (AVX-512 with VNNI, VBMI and BF16: Intel Ice Lake / Sapphire Rapids and later, AMD
  Zen 4 and later): for a few activation rows, an integer kernel multiplies the stored codes (or a
  piecewise group's 16-entry level table) with the activations split into int8 pieces (three for
  fp32 inputs, two for bf16/fp16; one, with the reference's own scale, for int8/int4 activations).
  Groups of 16, 32 and 64 (3/4/8-bit, FP4) run the same kernel with the group scales applied lane by
  lane; other group sizes that are not multiples of 128 (and 2-bit groups under 128) use a bf16
  dot-product kernel instead.
* ``avx2`` (AVX2 + FMA + F16C): int16 weights times int16 activation pieces (``VPMADDWD``) where the
  group size allows, else fp32 levels and fp32 FMAs.

Many activation rows (prefill, training) are multiplied by torch's own GEMM on blocks of rows that
the kernels dequantize exactly as :func:`reference.dequantize` does, into a reused buffer.

FP4 weights (``mxfp4``, ``nvfp4``) run as level tables: E2M1 codes times a block scale is a 16-entry
level table times a group scale, so the backend hands the kernels the stored codes as they are, the
E2M1 table as the one table of a symmetric layer (the float kernels look levels up in table 0
without reading a per-group field; the integer kernel reads its ``4 * level + 64`` bytes, as for
piecewise) and the block scales decoded once per layer (:func:`_fp4_operands`: bfloat16 for MXFP4's
powers of two, float32 for NVFP4's E4M3 times the tensor scale).

Calls the kernels cannot serve (another device, an unsupported group size, NaN in the activations on
the integer path) run :func:`reference.linear`. If the extension is missing or the CPU lacks AVX2,
the backend is unavailable and one warning names the reason; ``PIECEWISE_QUANT_KERNEL_BACKEND=reference``
turns it off.
"""

from __future__ import annotations

import functools
import threading
import warnings

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import backends, reference
from .backends import KernelBackend
from .fp4 import e2m1_levels
from .grids import PIECEWISE_TABLES

__all__ = ["cpu_backend", "status", "explain", "prepack_int8", "onednn_int8_status", "GEMV_MAX_ROWS"]

KINDS = {"uniform_sym": 0, "uniform_asym": 1, "piecewise": 2, "fp8_e4m3": 3}
# FP4 weights run as symmetric layers (kind 0) whose one level table is E2M1's (see _fp4_operands)
FP4_FORMATS = ("mxfp4", "nvfp4")
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ACT_QMAX = {"int8": 127.0, "int4": 7.0}
# activation rows up to which the fused kernels run; above, dequantized blocks + torch's GEMM
# (measured crossover on a 2-core Sapphire Rapids; see docs/performance.md)
GEMV_MAX_ROWS = 16
# FP4's blocks of 16/32 apply a scale per 16/32 weights in the fused kernels, which lose to dequantized
# blocks + torch's GEMM from about 8 rows (benchmarks/cpu_kernels.py, docs/formats.md)
FP4_GEMV_MAX_ROWS = 8
# W8A8 (symmetric 8-bit weights per channel, integer activations) from this many rows: torch's int8 GEMM
# (up to 16 rows the fused integer kernel was faster: 0.47 against 1.57 ms at 4 rows, 4096x4096)
INT8_GEMM_MIN_ROWS = GEMV_MAX_ROWS + 1
# a W8A8 layer prepacked for oneDNN (prepack_int8) takes oneDNN's GEMM from this many rows instead (4096x4096,
# AMD EPYC, 2 threads: 0.74 against 0.80 ms at 8 rows, 1.05 against 1.72 at 16; the fused kernel wins at 1-4)
ONEDNN_MIN_ROWS = 8
# the operand order of that GEMM: ``None`` chooses by shape (the weight on the left when out_features >=
# in_features, see _int8_gemm); True / False force one order (benchmarks/int8_gemm_order.py compares them)
INT8_GEMM_WEIGHT_LEFT: bool | None = None
# elements of one dequantized block for the GEMM path
TILE_ELEMENTS = 4 << 20


@functools.lru_cache(maxsize=1)
def _extension():
    """(module, None) or (None, reason)."""
    try:
        from . import _pq_cpu
    except ImportError as exc:
        return None, (
            f"the compiled extension piecewise_quant.kernels._pq_cpu is missing ({exc}); reinstall "
            "piecewise-quant where a C compiler is available (pip needs gcc or clang to build it)"
        )
    tier, _vnni, desc = _pq_cpu.features()
    if tier < 1:
        return None, f"this CPU has no AVX2/FMA/F16C ({desc})"
    _share_torch_threads(_pq_cpu)
    return _pq_cpu, None


def _openmp_library() -> str | None:
    """The path of the OpenMP runtime this process has loaded (torch's), from ``/proc/self/maps``."""
    import re

    torch.get_num_threads()  # torch's OpenMP runtime is loaded with libtorch; make sure it is initialised
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if re.search(r"/lib(gomp|iomp5)[^/]*\.so", line)}
    except OSError:
        return None
    return sorted(paths)[0] if len(paths) == 1 else None


def side_call_ok(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether an add into ``y`` from ``x`` outside the layer kernels (the outlier and low-rank adds) may
    run in the extension for this call: both on CPU in a kernel dtype, not traced by ``torch.compile``,
    and no gradient to carry (the adds write ``y`` in place)."""
    return (x.device.type == "cpu" and y.device.type == "cpu" and x.dtype in _DTYPES and y.dtype in _DTYPES
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)))


def side_extension():
    """The extension for those adds, or ``None`` where the CPU backend may not run (unregistered, or
    another backend forced by ``PIECEWISE_QUANT_KERNEL_BACKEND``) or the extension is unavailable."""
    return _extension()[0] if backends.allows("cpu") else None


def _share_torch_threads(ext) -> None:
    """Run the kernels' parallel parts on torch's own OpenMP threads (GNU ``GOMP_parallel``, which
    Intel's runtime also provides) rather than on a second thread pool: torch's threads keep spinning
    for a while after each of its ops, and a second pool's worker would wait for a free core.
    ``PIECEWISE_QUANT_CPU_THREADS=own`` keeps the extension's own pool."""
    import ctypes
    import os

    if os.environ.get("PIECEWISE_QUANT_CPU_THREADS", "").strip().lower() == "own":
        return
    path = _openmp_library()
    if path is None:
        return
    try:
        lib = ctypes.CDLL(path)
        addrs = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                 for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")]
    except (OSError, AttributeError):
        return
    if all(addrs):
        ext.set_openmp(*addrs)


def status() -> dict:
    """Whether the CPU kernels run here, which instruction set they use, and why not if they do not."""
    ext, reason = _extension()
    if ext is None:
        return {"available": False, "isa": None, "reason": reason, "features": None}
    tier, vnni, desc = ext.features()
    isa = "avx512-vnni" if tier >= 2 and vnni else ("avx512-bf16" if tier >= 2 else "avx2")
    return {"available": True, "isa": isa, "reason": None, "features": desc}


_warned = False
_warn_lock = threading.Lock()


def _warn_unavailable(reason: str) -> None:
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    warnings.warn(
        f"piecewise-quant: the CPU kernels cannot run, so quantized layers use the slow pure-torch "
        f"reference on CPU: {reason}",
        RuntimeWarning,
        stacklevel=4,
    )


@functools.lru_cache(maxsize=None)
def _tables(kind: int, bits: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Level tables the kernels index by a group's table id: bf16 bits ``[T, 32]``, fp32 ``[T, 16]``
    and, for piecewise, the integer kernel's ``4 * level + 64`` bytes ``[T, 16]``. Piecewise 8-bit
    passes its ``(h, r)`` table instead. Kept for the life of the process (the kernels hold pointers)."""
    if kind == KINDS["fp8_e4m3"]:
        return None, None, None
    n = 1 << bits
    if bits == 8:
        if kind == KINDS["piecewise"]:
            return None, torch.tensor(PIECEWISE_TABLES[8], dtype=torch.float32).contiguous(), None
        return None, None, None
    codes = torch.arange(n, dtype=torch.float32)
    half = float(n // 2)
    if kind == KINDS["uniform_sym"]:
        levels = (codes - half).reshape(1, n)
    elif kind == KINDS["uniform_asym"]:
        levels = codes.reshape(1, n) - codes.reshape(n, 1)  # row z: codes - z
    else:
        tab = torch.tensor(PIECEWISE_TABLES[bits], dtype=torch.float32)
        levels = reference.piecewise_levels((codes - half).reshape(1, n), tab[:, :1], tab[:, 1:])
    lut32 = torch.zeros(levels.shape[0], 16, dtype=torch.float32)
    lut32[:, :n] = levels
    bf = levels.to(torch.bfloat16)
    if not torch.equal(bf.to(torch.float32), levels):
        raise AssertionError(f"levels of format {kind} bits {bits} are not exact in bfloat16")
    lut16 = torch.zeros(levels.shape[0], 32, dtype=torch.int16)
    lut16[:, :n] = bf.view(torch.int16)
    lut8 = None
    if kind == KINDS["piecewise"]:
        biased = levels * 4 + 64
        if not (torch.equal(biased, biased.round()) and bool((biased >= 0).all()) and bool((biased <= 127).all())):
            raise AssertionError(f"piecewise {bits}-bit levels do not fit the integer kernel's table")
        lut8 = torch.zeros(levels.shape[0], 16, dtype=torch.uint8)
        lut8[:, :n] = biased.to(torch.uint8)
    return lut16.contiguous(), lut32.contiguous(), lut8.contiguous() if lut8 is not None else None


@functools.lru_cache(maxsize=1)
def _fp4_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The E2M1 level table (code -> value) in the three forms the kernels read: bf16 bits
    ``[1, 32]`` and fp32 ``[1, 16]`` for the float kernels, and the integer kernel's ``4 * level + 64``
    bytes ``[1, 16]`` (E2M1 levels are multiples of 0.5 up to 6: 40..88, exact)."""
    levels = e2m1_levels().reshape(1, 16)
    lut16 = torch.zeros(1, 32, dtype=torch.int16)
    lut16[:, :16] = levels.to(torch.bfloat16).view(torch.int16)
    biased = levels * 4 + 64
    if not (torch.equal(biased, biased.round()) and bool((biased >= 0).all()) and bool((biased <= 127).all())):
        raise AssertionError("E2M1 levels do not fit the integer kernel's table")
    return lut16.contiguous(), levels.contiguous(), biased.to(torch.uint8).contiguous()


# scales tensor -> (its version and aux's, float32 block scales)
_fp4_cache = WeakIdKeyDictionary()
_fp4_lock = threading.Lock()


def _version(t: torch.Tensor) -> int | None:
    """``t._version``; ``None`` for an inference tensor (made under ``torch.inference_mode()``), which has
    no version counter: the caches keyed on it are cleared by ``QuantLinear.load_quantized`` through
    :func:`forget` instead."""
    return None if t.is_inference() else t._version


def forget(t: torch.Tensor) -> None:
    """Drop what the backend worked out from ``t`` (an FP4 layer's decoded scales, a W8A8 layer's
    oneDNN-packed weight): its values are about to change."""
    if _onednn_packed:
        _onednn_packed.pop(t, None)
    if _fp4_cache:
        with _fp4_lock:
            _fp4_cache.pop(t, None)


def _fp4_key(scales: torch.Tensor, aux: torch.Tensor | None) -> tuple:
    return (_version(scales), _version(aux) if aux is not None else -1, aux.data_ptr() if aux is not None else 0)


def _fp4_operands(scales: torch.Tensor, aux: torch.Tensor | None, weight_format: str) -> torch.Tensor:
    """An FP4 layer's block scales as ``(n, G)`` floats (E8M0 ``2**(e-127)``, or E4M3 times the
    per-tensor scale, exactly as :func:`reference.dequantize` multiplies): bfloat16 where every scale
    is exact in it (MXFP4's powers of two), else float32. Worked out once per scales tensor
    (recomputed after an in-place change)."""
    key = _fp4_key(scales, aux)
    with _fp4_lock:
        hit = _fp4_cache.get(scales)
    if hit is not None and hit[0] == key:
        return hit[1]
    s = reference.fp4_scales(weight_format, scales, aux).contiguous()
    half = s.to(torch.bfloat16)
    if torch.equal(half.to(torch.float32), s):
        s = half  # MXFP4's powers of two are exact in bfloat16: half the bytes the kernels read per block
    with _fp4_lock:
        _fp4_cache[scales] = (key, s)
    return s


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _describe(ext, qweight, scales, aux, weight_format: str, bits: int, group_size: int, in_features: int):
    """The kernels' view of one layer (raw pointers: the tensors must stay alive during the call),
    or None when the kernels cannot take this layout."""
    kind = KINDS.get(weight_format)
    n = qweight.shape[0]
    fp4 = weight_format in FP4_FORMATS
    if fp4 and scales.dim() == 2 and bits == 4 and qweight.dtype == torch.uint8:
        # the caller keeps the scales tensor alive, and the cache keeps its translation with it
        scales, aux = _fp4_operands(scales, aux, weight_format), None
        kind = KINDS["uniform_sym"]
    if kind is None or n == 0 or in_features == 0:
        return None
    per_tensor = group_size == -1
    gs = in_features if per_tensor else group_size
    if in_features % gs:
        return None
    n_groups = in_features // gs
    if n_groups > 1 and gs % 8:
        return None
    if not (qweight.is_contiguous() and scales.is_contiguous() and (aux is None or aux.is_contiguous())):
        return None
    if scales.dtype not in _DTYPES or qweight.dtype not in (torch.uint8, torch.float8_e4m3fn):
        return None
    lut16, lut32, lut8 = _fp4_tables() if fp4 else _tables(kind, bits)
    return ext.layer(
        n, in_features, bits, gs, n_groups, kind, int(per_tensor), _DTYPES[scales.dtype],
        qweight.data_ptr(), qweight.stride(0), _ptr(aux), aux.stride(0) if aux is not None else 0,
        scales.data_ptr(), 0 if per_tensor else scales.stride(0), 1 << (bits - 1),
        _ptr(lut16), _ptr(lut32), _ptr(lut8),
    )


def _supports(weight_format: str, bits: int, group_size: int, dtype: torch.dtype, act_format: str) -> bool:
    if (weight_format not in KINDS and weight_format not in FP4_FORMATS) or dtype not in _DTYPES \
            or bits not in (2, 3, 4, 8):
        return False
    ext, reason = _extension()
    if ext is None:
        _warn_unavailable(reason)
        return False
    return True


_local = threading.local()


def _buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch tensor, reused across calls (a fresh large allocation per call costs
    page faults that take longer than the dequantization)."""
    key = (name, dtype)
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        # never an inference tensor: one made under torch.inference_mode() could not be written afterwards
        with torch.inference_mode(False):
            buf = cache[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _tiled(ext, desc, x2: torch.Tensor, n: int, k: int, threads: int) -> torch.Tensor:
    """``x2 @ W.T`` with W dequantized block by block (exactly as the reference) into a reused buffer.
    Each block goes through ``F.linear`` (torch's bf16 GEMMs are many times slower for the
    transposed product ``W @ x.T``)."""
    m = x2.shape[0]
    dtype = x2.dtype
    rows = max(16, min(n, TILE_ELEMENTS // max(k, 1)))
    w = _buffer("w", rows * k, dtype)
    if rows >= n:
        block = w[: n * k].view(n, k)
        ext.dequant(desc, 0, n, block.data_ptr(), _DTYPES[dtype], threads, -1)
        return torch.nn.functional.linear(x2, block)
    y = torch.empty(m, n, dtype=dtype)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        block = w[: (n1 - n0) * k].view(n1 - n0, k)
        ext.dequant(desc, n0, n1, block.data_ptr(), _DTYPES[dtype], threads, -1)
        y[:, n0:n1] = torch.nn.functional.linear(x2, block)
    return y


def _row_scales(x2: torch.Tensor, act_format: str, act_mode: str, act_scale, clip: float, topk: int) -> torch.Tensor:
    """Per-row activation scales exactly as :func:`reference.quantize_activation` computes them."""
    qmax = _ACT_QMAX[act_format]
    if act_mode == "static_per_tensor":
        return act_scale.to(torch.float32).reshape(1).expand(x2.shape[0]).contiguous()
    mag = x2.to(torch.float32).abs()
    k = min(topk + 1, mag.shape[-1])
    rng = mag.topk(k, dim=-1).values[..., -1]
    return (rng * clip / qmax).contiguous()


def _int8_gemm_applies(qweight, scales, weight_format: str, bits: int, group_size: int, in_features: int) -> bool:
    """Symmetric 8-bit weights with one scale per output channel (or per tensor): the SmoothQuant
    W8A8 layout, whose products are whole integers."""
    return (weight_format == "uniform_sym" and bits == 8 and group_size in (-1, in_features)
            and qweight.dtype == torch.uint8 and qweight.dim() == 2 and qweight.shape[1] == in_features
            and qweight.is_contiguous())


# qweight tensor -> (its ``_version`` when packed, oneDNN's packed int8 weight); see prepack_int8
_onednn_packed = WeakIdKeyDictionary()


@functools.lru_cache(maxsize=1)
def onednn_int8_status() -> tuple[bool, str]:
    """Whether oneDNN's u8 x s8 GEMM (``torch.ops.onednn.qlinear_pointwise``) runs here, and is exact.

    It is exact on CPUs with VNNI (or AMX), whose ``vpdpbusd`` adds the u8 x s8 products in 32 bits.
    Without VNNI oneDNN pairs them in saturating 16-bit adds (``vpmaddubsw``: 2 x 255 x 127 overflows),
    so a worst-case product is checked against an int64 reference once per process. Returns
    ``(ok, reason)``; ``reason`` names why not."""
    if not torch.backends.mkldnn.is_available():
        return False, "torch was built without oneDNN (mkldnn)"
    onednn = getattr(torch.ops, "onednn", None)
    if onednn is None or not hasattr(onednn, "qlinear_prepack") or not hasattr(onednn, "qlinear_pointwise"):
        return False, "this torch has no torch.ops.onednn.qlinear_pointwise"
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randint(-127, 128, (32, 256), dtype=torch.int8, generator=gen)
        w[:8] = 127
        w[8:16] = -127
        x = torch.randint(-127, 128, (24, 256), dtype=torch.int8, generator=gen)
        x[:8] = 127
        x[8:16] = -127
        got = _onednn_acc((x.to(torch.int16) + 128).to(torch.uint8), onednn.qlinear_prepack(w, None), 32)
        want = (x.to(torch.int64) @ w.to(torch.int64).T).to(torch.float32)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means: do not use it
        return False, f"oneDNN's int8 GEMM failed its probe ({type(exc).__name__}: {exc})"
    if not torch.equal(got, want):
        return False, ("oneDNN's int8 GEMM is not exact on this CPU (without VNNI it adds u8 x s8 pairs in "
                       "saturating 16-bit sums)")
    return True, ""


@functools.lru_cache(maxsize=8)
def _unit_channel_args(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False):  # cached across calls, in and out of inference mode
        return torch.ones(n, dtype=torch.float32), torch.zeros(n, dtype=torch.int64)


def _onednn_acc(qu: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """float32 ``(m, n)`` of the exact int32 sums ``(qu - 128) @ W^T``, converted to float as ``int32 *
    float`` in torch converts them (unit scales: oneDNN's ``s32 -> f32`` then ``x 1.0``)."""
    ones, zeros = _unit_channel_args(n)
    return torch.ops.onednn.qlinear_pointwise(qu, 1.0, 128, packed, ones, zeros, None, 1.0, 0, torch.float32,
                                              "none", [], "")


def _packed_for(qweight: torch.Tensor) -> torch.Tensor | None:
    entry = _onednn_packed.get(qweight)
    if entry is None:
        return None
    if entry[0] != _version(qweight):  # the codes were written in place since: the packed copy is stale
        _onednn_packed.pop(qweight, None)
        return None
    return entry[1]


def prepack_int8(model: torch.nn.Module, enable: bool = True) -> int:
    """Give every W8A8 layer of ``model`` on CPU (symmetric 8-bit weights per channel, symmetric int8/int4
    activations) a oneDNN-packed copy of its weight, for the batched path (from ``ONEDNN_MIN_ROWS``
    activation rows: prefill, batched decode, diffusion). oneDNN's u8 x s8 GEMM on the packed weight is
    1.2-2.2x the unpacked path there (docs/kernels.md#w8a8-prepacked-for-onednn), and exact: from
    ``INT8_GEMM_MIN_ROWS`` rows the results are the unpacked path's bits.

    **It costs memory**: each layer holds its codes (for saving, the decode kernels and every other
    path) and the packed copy, twice its 8-bit weight bytes; that is why it is opt-in. Writing a layer's
    codes in place (``load_quantized``, or a write that bumps the tensor's version counter, which
    inference tensors lack), or moving it (``.to()``), leaves the packed copy unused (the next call
    takes the unpacked path); call again to repack. ``enable=False`` drops the copies. Returns the bytes the
    packed copies hold after the call (0 when none applies). Raises ``RuntimeError`` when oneDNN's
    int8 GEMM is unavailable or inexact here (:func:`onednn_int8_status` says why)."""
    # quantized layers (QuantLinear and subclasses), found by what they expose: kernels never import the core
    layers = [m for m in model.modules()
              if callable(getattr(m, "quantized_tensors", None)) and hasattr(m, "fmt") and hasattr(m, "act_quantizer")]
    if enable:
        ok, reason = onednn_int8_status()
        if not ok:
            raise RuntimeError(f"cannot prepack for oneDNN's int8 GEMM: {reason}; the layers keep torch._int_mm")
    total = 0
    for layer in layers:
        w = layer.fmt.weight_operand(layer.quantized_tensors(), layer.layer_spec)
        aq = layer.act_quantizer
        if w is None or aq is None:
            continue
        if not enable:
            _onednn_packed.pop(w.qweight, None)
            continue
        if (w.qweight.device.type != "cpu" or aq.args.kernel_format not in _ACT_QMAX
                or aq.args.kernel_mode == "dynamic_per_token_asym"
                or not _int8_gemm_applies(w.qweight, w.scales, w.format, w.bits, w.group_size, w.in_features)):
            continue
        packed = _packed_for(w.qweight)
        if packed is None:
            levels = torch.bitwise_xor(w.qweight, 0x80).view(torch.int8)
            packed = torch.ops.onednn.qlinear_prepack(levels, None)
            _onednn_packed[w.qweight] = (_version(w.qweight), packed)
        total += w.qweight.numel()
    return total


def is_prepacked(qweight: torch.Tensor) -> bool:
    """Whether ``qweight`` has a current oneDNN-packed copy (:func:`prepack_int8`)."""
    return _packed_for(qweight) is not None


def _int8_gemm(x2, qweight, scales, act_format, act_mode, act_scale, clip: float, topk: int,
               packed: torch.Tensor | None = None) -> torch.Tensor | None:
    """W8A8 for many rows: activations quantized per row exactly as the reference does, the stored
    codes turned into signed levels (``code - 128`` is ``code ^ 0x80`` read as int8), and torch's int8
    GEMM, whose int32 sums are exact; one multiply by the row and channel scales at the end. ``packed``:
    the layer's oneDNN-packed weight (:func:`prepack_int8`), multiplied by oneDNN's GEMM instead."""
    qmax = _ACT_QMAX[act_format]
    xf = x2.to(torch.float32)
    bad = None
    if act_mode == "dynamic_per_token" and topk == 0:
        # the absolute maximum (NaN and Inf propagate into it, so a non-finite row shows here); abs().amax
        # is vectorized where linalg.vector_norm(ord=inf) is not (about 10x faster on a 64 x 4096 block)
        rng = xf.abs().amax(-1, keepdim=True)
        nonfinite = ~torch.isfinite(rng)
        if bool(nonfinite.any()):
            # as in reference.quantize_activation: a row holding NaN has a NaN scale, which is not > 0, so
            # its activations quantize to zero; a row holding Inf (and no NaN) has an infinite scale, and
            # Inf / Inf and 0 * Inf make its whole output NaN. The other rows still take the integer GEMM
            xf = xf.masked_fill(nonfinite, 0.0)
            bad = torch.isinf(rng)
            rng = rng.masked_fill(nonfinite, 0.0)
            if not bool(bad.any()):
                bad = None
        scale = rng * clip / qmax
    else:
        if not bool(torch.isfinite(xf).all()):
            return None  # clipped or static scales can keep a row with Inf finite: the reference decides
        scale = _row_scales(xf, act_format, act_mode, act_scale, clip, topk).unsqueeze(-1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    col_scales = scales.to(torch.float32).reshape(-1)
    if packed is not None:
        # oneDNN's u8 x s8 GEMM on the prepacked weight (prepack_int8): the levels shifted by 128 as u8 with
        # zero point 128; the same int32 sums and products
        qu = torch.div(xf, safe).round_().clamp_(-qmax, qmax).add_(128).to(torch.uint8)
        y = _onednn_acc(qu, packed, qweight.shape[0]).mul_(safe).mul_(col_scales.reshape(1, -1)).to(x2.dtype)
    else:
        qx = torch.div(xf, safe).round_().clamp_(-qmax, qmax).to(torch.int8)
        levels = _buffer("levels", qweight.numel(), torch.uint8).view(qweight.shape)
        torch.bitwise_xor(qweight, 0x80, out=levels)
        n, k = qweight.shape
        weight_left = (n >= k) if INT8_GEMM_WEIGHT_LEFT is None else INT8_GEMM_WEIGHT_LEFT
        if weight_left:
            # (W x^T)^T: the weight, as stored, is the left operand, so oneDNN packs the small x^T instead of the
            # transposed weight on every call: 1.2-1.6x faster layers at 17-64 rows on 4096x4096 and 11008x4096,
            # the other order 1.02-1.2x faster on 4096x11008 (docs/kernels.md). The same int32 sums and products
            acc_t = torch._int_mm(levels.view(torch.int8), qx.t().contiguous())
            y_t = torch.mul(acc_t, safe.reshape(1, -1)).mul_(col_scales.reshape(-1, 1))  # int32 -> float32, then x
            y = torch.empty(x2.shape[0], n, dtype=x2.dtype).copy_(y_t.t())
        else:
            acc = torch._int_mm(qx, levels.view(torch.int8).t())
            y = torch.mul(acc, safe).mul_(col_scales.reshape(1, -1)).to(x2.dtype)
    if bad is not None:
        y.masked_fill_(bad, float("nan"))
    return y


def _linear(x, qweight, scales, aux, bias, act_scale, weight_format, bits, group_size, in_features,
            act_format, act_mode, act_clip_ratio, act_topk):
    args = (x, qweight, scales, aux, bias, act_scale, weight_format, bits, group_size, in_features,
            act_format, act_mode, act_clip_ratio, act_topk)
    ext, _ = _extension()
    if x.device.type != "cpu" or qweight.device.type != "cpu":
        return reference.linear(*args)
    desc = _describe(ext, qweight, scales, aux, weight_format, bits, group_size, in_features)
    if desc is None:
        return reference.linear(*args)
    n = qweight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.numel() and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    threads = torch.get_num_threads()
    int_act = act_format in _ACT_QMAX
    asym = int_act and act_mode == "dynamic_per_token_asym"
    if act_format not in ("none",) and not int_act:
        # FP8 activations: the reference's own simulated quantization, then the float kernels
        x2 = reference.quantize_activation(x2, act_format, act_mode, act_scale, act_clip_ratio, act_topk)
    if int_act and act_mode == "static_per_tensor" and act_scale is None:
        return reference.linear(*args)  # raises the user-facing error
    b = bias.to(x.dtype).contiguous() if bias is not None else None
    packed = _packed_for(qweight) if int_act and m >= ONEDNN_MIN_ROWS and _onednn_packed else None
    if (int_act and not asym and (m >= INT8_GEMM_MIN_ROWS or packed is not None)
            and _int8_gemm_applies(qweight, scales, weight_format, bits, group_size, in_features)):
        y = _int8_gemm(x2, qweight, scales, act_format, act_mode, act_scale, float(act_clip_ratio), int(act_topk),
                       packed)
        if y is None:
            return reference.linear(*args)
        if b is not None:
            y += b
        return y.reshape(*lead, n)
    if 0 < m <= (FP4_GEMV_MAX_ROWS if weight_format in FP4_FORMATS else GEMV_MAX_ROWS):
        y = torch.empty(m, n, dtype=x.dtype)
        if int_act:
            if asym:
                amode, rs = 3, None  # rounded in the kernel as the reference does: ones, zeros and codes
            elif act_mode == "dynamic_per_token" and act_topk == 0:
                amode, rs = 1, None
            else:
                amode, rs = 2, _row_scales(x2, act_format, act_mode, act_scale, float(act_clip_ratio), int(act_topk))
        else:
            amode, rs = 0, None
        done = ext.gemv(
            desc, x2.data_ptr(), _DTYPES[x.dtype], m, x2.stride(0), y.data_ptr(), _DTYPES[x.dtype], n,
            _ptr(b), _DTYPES[x.dtype] if b is not None else 0, threads, -1,
            amode, _ACT_QMAX.get(act_format, 127.0), float(act_clip_ratio), _ptr(rs), 0, -1,
        )
        if done:
            return y.reshape(*lead, n)
        if not int_act:
            return reference.linear(*args)
    if int_act:
        x2 = reference.quantize_activation(x2, act_format, act_mode, act_scale, act_clip_ratio, act_topk)
    if m == 0:
        y = x2.new_empty((0, n))
    else:
        y = _tiled(ext, desc, x2, n, in_features, threads)
        if b is not None:
            y += b
    return y.reshape(*lead, n)


def _no_prepared() -> None:
    return None


class Prepared:
    """One layer's call into the CPU kernels with everything but the activations worked out once,
    for the decode loop where Python overhead is a large share of a small layer's time. It holds the
    layer's tensors (the descriptor points into them); :meth:`matches` says whether they are still the
    layer's. ``__call__`` returns ``None`` when the call is not a few float activation rows on CPU
    (the caller then takes the general path)."""

    __slots__ = ("tensors", "desc", "n", "k", "ext", "backends_version", "forced", "dtype_code", "keep")

    def __init__(self, ext, desc, tensors: tuple, n: int, k: int, backends_version: int, forced: str,
                 keep: tuple | None = None) -> None:
        self.ext, self.desc, self.tensors, self.n, self.k = ext, desc, tensors, n, k
        self.backends_version, self.forced = backends_version, forced
        # FP4: (the scales' versions, the translated tensors the descriptor points into)
        self.keep = keep

    def __deepcopy__(self, memo) -> None:
        return None  # a copied layer has new tensors: it prepares its own on its first call

    def __reduce__(self):
        return (_no_prepared, ())  # pickled layers (torch.save, multiprocessing) prepare again

    def matches(self, tensors: tuple, backends_version: int, forced: str) -> bool:
        mine = self.tensors
        return (
            len(mine) == len(tensors)
            and all(a is b for a, b in zip(mine, tensors))
            and backends_version == self.backends_version
            and forced == self.forced
            and (self.keep is None or self.keep[0] == _fp4_key(tensors[1], tensors[2]))
        )

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None, rotation=None,
                 act: tuple[float, float, bool] | None = None):
        """``rotation``: a :class:`~piecewise_quant.kernels.hadamard.Rotation` of the input, applied
        inside the same call (float32 rows in a scratch buffer); ``act``: ``(qmax, clip_ratio,
        symmetric)`` of dynamic per-token integer activations (the rows, rotated first, are quantized
        inside the call, as the op's path does for a few rows). ``None`` where the kernel does not
        take the call."""
        dt = _DTYPES.get(x.dtype)
        if dt is None or x.device.type != "cpu" or x.shape[-1] != self.k:
            return None
        x2 = x.reshape(-1, self.k)
        m = x2.shape[0]
        if not 0 < m <= (GEMV_MAX_ROWS if self.keep is None else FP4_GEMV_MAX_ROWS) or x2.stride(-1) != 1:
            return None
        if m >= ONEDNN_MIN_ROWS and act is not None and _onednn_packed and _packed_for(self.tensors[0]) is not None:
            return None  # the op's path runs oneDNN's GEMM on the prepacked weight
        y = torch.empty(m, self.n, dtype=x.dtype)
        if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
            bias = bias.to(x.dtype).contiguous()
        rot = () if rotation is None else rotation.kernel_args()
        amode, qmax, clip = (0, 127.0, 1.0) if act is None else (1 if act[2] else 3, float(act[0]), float(act[1]))
        done = self.ext.gemv(
            self.desc, x2.data_ptr(), dt, m, x2.stride(0), y.data_ptr(), dt, self.n,
            _ptr(bias), dt, torch.get_num_threads(), -1, amode, qmax, clip, 0, 0, -1, *rot,
        )
        return y.view(*x.shape[:-1], self.n) if done else None


def prepare(qweight, scales, aux, weight_format: str, bits: int, group_size: int, in_features: int,
            backends_version: int, forced: str) -> Prepared | None:
    """A :class:`Prepared` call for a weight-only layer, or ``None`` where the CPU kernels do not take it."""
    ext, _ = _extension()
    if ext is None or qweight.device.type != "cpu":
        return None
    keep = None
    if weight_format in FP4_FORMATS and scales.dim() == 2:
        keep = (_fp4_key(scales, aux), _fp4_operands(scales, aux, weight_format))
    desc = _describe(ext, qweight, scales, aux, weight_format, bits, group_size, in_features)
    if desc is None:
        return None
    return Prepared(ext, desc, (qweight, scales, aux), qweight.shape[0], in_features, backends_version, forced, keep)


def _small_groups(weight_format: str, bits: int, gs: int) -> bool:
    """Whether the integer kernel's small-group path (``i8_sg_ok`` in ``pq_cpu.c``) takes groups of
    ``gs`` < 128 weights: 16, 32 or 64 at 3, 4 or 8 bits (FP4 as 4-bit); piecewise 4-bit from 32 (its
    level tables go per 128-bit lane of 32 weights)."""
    if gs not in (16, 32, 64) or bits not in (3, 4, 8):
        return False
    return not (weight_format == "piecewise" and bits == 4 and gs < 32)


def explain(weight_format: str, bits: int, group_size: int, in_features: int, dtype: torch.dtype = torch.float32,
            act_format: str = "none", rows: int = 1, prepacked: bool = False) -> str:
    """Which CPU kernel a layer with this scheme runs for ``rows`` activation rows (1: decoding), e.g.
    ``"cpu avx512-vnni (integer)"``, ``"cpu int8 GEMM (torch._int_mm)"`` or ``"reference (<why>)"``;
    ``prepacked``: the layer's weight has a oneDNN-packed copy (:func:`prepack_int8`)."""
    st = status()
    if not st["available"]:
        return f"reference ({st['reason']})"
    if (weight_format not in KINDS and weight_format not in FP4_FORMATS) or dtype not in _DTYPES \
            or bits not in (2, 3, 4, 8):
        return f"reference (no CPU kernel for {weight_format} {bits}-bit with {dtype})"
    gs = in_features if group_size == -1 else group_size
    if in_features % gs or (in_features // gs > 1 and gs % 8):
        return f"reference (group size {group_size} is not a multiple of 8)"
    if (act_format in _ACT_QMAX and weight_format == "uniform_sym" and bits == 8 and group_size in (-1, in_features)):
        if prepacked and rows >= ONEDNN_MIN_ROWS:
            return "cpu int8 GEMM (oneDNN u8s8, prepacked)"
        if rows >= INT8_GEMM_MIN_ROWS:
            return "cpu int8 GEMM (torch._int_mm)"
    if rows > (FP4_GEMV_MAX_ROWS if weight_format in FP4_FORMATS else GEMV_MAX_ROWS):
        return f"cpu dequantized blocks + torch {str(dtype).removeprefix('torch.')} GEMM"
    isa = st["isa"]
    has_int = weight_format != "fp8_e4m3" and not (weight_format == "piecewise" and bits == 8)
    if isa == "avx2":  # the int16 kernel (i16_supported in pq_cpu.c): blocks of 16 weights
        integer = has_int and in_features % 16 == 0 and (gs == in_features or gs % 16 == 0)
    else:
        integer = (
            isa == "avx512-vnni" and has_int and in_features % 128 == 0
            and (gs == in_features or gs % 128 == 0 or _small_groups(weight_format, bits, gs))
        )
    if act_format in _ACT_QMAX and not integer:
        return f"cpu {isa} (float kernels on simulated {act_format} activations)"
    if integer:
        return f"cpu {isa} (integer)"
    if isa != "avx2" and (bits <= 4 or (bits == 8 and weight_format.startswith("uniform"))):
        return f"cpu {isa} (bf16 dot products)"
    return f"cpu {isa} (fp32)"


PRIORITY = 1  # a plugin's CPU backend with a higher priority takes the calls it supports


def cpu_backend() -> KernelBackend:
    """The built-in CPU backend (priority 1: plugins can take over formats they run better)."""
    return KernelBackend("cpu", "cpu", _supports, _linear, priority=PRIORITY)
