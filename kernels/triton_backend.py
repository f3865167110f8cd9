"""The Triton dequantize-matmul as a CUDA backend of ``piecewise_quant::linear`` (registered by
the built-in plugin through the ``piecewise_quant_register_kernel_backends`` hook).

Triton is imported only when a CUDA call first asks whether the backend supports it, so importing
the package stays cheap and works without Triton or a GPU.
"""

from __future__ import annotations

import functools

import torch

from .backends import KernelBackend

TRITON_FORMATS = ("uniform_sym", "uniform_asym", "piecewise")
TRITON_BITS = (2, 4, 8)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def _supports(weight_format: str, bits: int, group_size: int, dtype: torch.dtype, act_format: str) -> bool:
    return (
        weight_format in TRITON_FORMATS
        and bits in TRITON_BITS
        and group_size > 0
        and group_size % 16 == 0
        and dtype in TRITON_DTYPES
        and act_format == "none"
        and triton_available()
    )


def _linear(x, qweight, scales, aux, bias, act_scale, weight_format, bits, group_size, in_features,
            act_format, act_mode, act_clip_ratio, act_topk):
    from .triton_dequant_matmul import triton_linear

    return triton_linear(x, qweight, scales, aux, bias, weight_format, bits, group_size, in_features)


def triton_backend() -> KernelBackend:
    return KernelBackend("triton", "cuda", _supports, _linear, priority=10)
