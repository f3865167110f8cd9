"""What the CPU kernel tests compare against: the float64 product of the dequantized weight (on
``sys.path`` through pytest's ``pythonpath``)."""

from __future__ import annotations

import torch


def relerr(y: torch.Tensor, ref: torch.Tensor) -> float:
    """The relative error of ``y`` against the float64 ``ref``, in the Frobenius norm."""
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def expected(q, x: torch.Tensor) -> torch.Tensor:
    """``q(x)`` in float64: ``x`` times the dequantized weight, plus the bias if ``q`` has one."""
    y = x.double() @ q.dequantize(torch.float64).t()
    if q.bias is not None:
        y = y + q.bias.double()
    return y
