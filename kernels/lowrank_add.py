"""The low-rank branch of an SVDQuant layer on CPU: ``y += (x B^T) A^T`` from the stored float16 factors.

``_pq_cpu.lowrank_add`` reads ``lowrank_a`` (``out x r``) and ``lowrank_b`` (``r x in``) as stored,
converts them 8 at a time and accumulates in float32, rounding once into ``y``'s dtype. For the
few activation rows of decode it replaces two ``F.linear`` calls on float32 (or bfloat16) copies of
the factors, so the layer keeps no second copy of its branch (docs/low-rank.md). Many rows
(:data:`MAX_ROWS`), gradients, ``torch.compile``, the forced reference backend and other devices
keep the ``F.linear`` path.
"""

from __future__ import annotations

import torch

from .cpu_backend import _DTYPES, GEMV_MAX_ROWS, side_call_ok, side_extension

__all__ = ["MAX_ROWS", "add"]

#: activation rows up to which the kernel runs; above, torch's GEMM on cast factors
MAX_ROWS = GEMV_MAX_ROWS


def add(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``y + (x B^T) A^T`` for ``x`` ``(..., in)`` and ``y`` ``(..., out)``, written into ``y``
    (returned), or ``None`` where this call needs the ``F.linear`` path.

    Raises:
        ValueError: the shapes of ``x``, ``y``, ``A`` and ``B`` do not fit one another.
    """
    if a.dtype != torch.float16 or b.dtype != torch.float16 or a.device.type != "cpu" or b.device.type != "cpu" \
            or not (a.is_contiguous() and b.is_contiguous() and y.is_contiguous()) or not side_call_ok(x, y):
        return None
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or x.shape[-1] != b.shape[1] \
            or y.shape[-1] != a.shape[0] or y.numel() * b.shape[1] != x.numel() * a.shape[0]:
        raise ValueError(
            f"low-rank branch: x {tuple(x.shape)}, y {tuple(y.shape)}, A {tuple(a.shape)} and B {tuple(b.shape)} "
            "do not fit y += (x B^T) A^T (A is out x r, B is r x in): the factors belong to another layer"
        )
    k = b.shape[1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > MAX_ROWS:
        return None
    ext = side_extension()
    if ext is None:
        return None
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    ext.lowrank_add(x2.data_ptr(), _DTYPES[x2.dtype], m, x2.stride(0), y.data_ptr(), _DTYPES[y.dtype], a.shape[0],
                    a.data_ptr(), b.data_ptr(), a.shape[0], a.shape[1], k, torch.get_num_threads())
    return y
