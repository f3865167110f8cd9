"""The Triton kernels as a CUDA backend of ``piecewise_quant::linear`` (registered by
the built-in plugin through the ``piecewise_quant_register_kernel_backends`` hook).

Routing (a call that none of these fits runs the reference):

* ``act_format == "none"``, uniform or piecewise weights of 2/4/8 bits, group size a multiple of
  16, or FP4 (``mxfp4`` / ``nvfp4``) weights: the dequantize-GEMM (:mod:`.triton_dequant_matmul`;
  split-K skinny kernel for M <= 16, ``tl.dot`` tiles above);
* ``uniform_sym`` 8-bit weights with ``act_format == "int8"``, and ``fp8_e4m3`` weights with
  ``act_format == "fp8_e4m3"`` on a GPU of compute capability 8.9+: the W8A8 GEMM
  (:mod:`.triton_w8a8`), when the weight scales are per channel or per tensor and ``act_topk == 0``;
  other calls with these formats fall back to :func:`.reference.linear` inside ``_linear``.

Triton is imported only when a CUDA call first asks whether the backend supports it, so importing
the package stays cheap and works without Triton or a GPU.
"""

from __future__ import annotations

import functools

import torch

from . import reference
from .backends import KernelBackend

TRITON_FORMATS = ("uniform_sym", "uniform_asym", "piecewise", "mxfp4", "nvfp4")
# the kernels also handle 3-bit codes (checked under the interpreter); routing 3-bit to them waits
# for the GPU test (tests/kernels/test_triton_dequant_matmul.py -m gpu) to pass on a real device
TRITON_BITS = (2, 4, 8)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (weight_format, bits, act_format) run by the W8A8 GEMM of triton_w8a8
W8A8_ROUTES = (("uniform_sym", 8, "int8"), ("fp8_e4m3", 8, "fp8_e4m3"))
FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada, Hopper and later


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports (it is an optional dependency)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def _supports(weight_format: str, bits: int, group_size: int, dtype: torch.dtype, act_format: str) -> bool:
    """Weight-only dequantize-GEMM for float activations; the W8A8 GEMM for int8 / FP8 activations.
    Call details ``supports`` cannot see are checked again by :func:`_linear`."""
    if dtype not in TRITON_DTYPES or not triton_available():
        return False
    if act_format == "none":
        return weight_format in TRITON_FORMATS and bits in TRITON_BITS and group_size > 0 and group_size % 16 == 0
    return (weight_format, bits, act_format) in W8A8_ROUTES


def w8a8_runs(x: torch.Tensor, weight_format: str, group_size: int, in_features: int, act_mode: str,
              act_scale: torch.Tensor | None, act_topk: int) -> bool:
    """Whether the W8A8 kernel handles this call: per-channel or per-tensor weight scales, no top-k
    activation clipping, a calibrated scale in static mode, and FP8 tensor cores for FP8."""
    if act_topk != 0 or group_size not in (in_features, -1):
        return False
    if act_mode == "static_per_tensor" and act_scale is None:
        return False  # the reference raises the user-facing error
    if act_mode not in ("dynamic_per_token", "static_per_tensor"):
        return False
    if weight_format == "fp8_e4m3":
        return x.is_cuda and torch.cuda.get_device_capability(x.device) >= FP8_MIN_CAPABILITY
    return True


def _linear(x, qweight, scales, aux, bias, act_scale, weight_format, bits, group_size, in_features,
            act_format, act_mode, act_clip_ratio, act_topk):
    if act_format == "none":
        from .triton_dequant_matmul import triton_linear

        return triton_linear(x, qweight, scales, aux, bias, weight_format, bits, group_size, in_features)
    if w8a8_runs(x, weight_format, group_size, in_features, act_mode, act_scale, act_topk):
        from .triton_w8a8 import w8a8_linear

        return w8a8_linear(x, qweight, scales, bias, weight_format, group_size, in_features, act_format,
                           act_mode, act_scale, act_clip_ratio)
    return reference.linear(x, qweight, scales, aux, bias, act_scale, weight_format, bits, group_size, in_features,
                            act_format, act_mode, act_clip_ratio, act_topk)


def triton_backend() -> KernelBackend:
    """The built-in Triton backend for CUDA tensors (priority 10)."""
    return KernelBackend("triton", "cuda", _supports, _linear, priority=10)
