"""Weight-range observers: choose each group's clipping range ``[lo, hi]`` (``lo <= 0 <= hi``).

``minmax`` keeps every weight representable; ``mse`` shrinks the range by the factor (from 1.0 down
to 0.4) that minimises the group's squared quantization error, trading a few clipped outliers for a
finer step (the "MSE-optimal clip" of GPTQ/AWQ-style toolkits). Observers are looked up by name in
the plugin registry, so a plugin can add its own.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .kernels.reference import round_half_even

__all__ = [
    "minmax_observer",
    "mse_observer",
    "percentile_observer",
    "uniform_codes",
    "uniform_fake_quant",
    "uniform_params",
    "uniform_scale",
    "zero_point",
    "MSE_SHRINK_FACTORS",
]

Observer = Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]]
MSE_SHRINK_FACTORS = torch.linspace(1.0, 0.4, 31, dtype=torch.float32)


def minmax_observer(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    lo = groups.amin(dim=1).clamp(max=0)
    hi = groups.amax(dim=1).clamp(min=0)
    return lo, hi


def uniform_scale(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Scale of the uniform grid for the range ``[lo, hi]`` (float32).

    Asymmetric (plain round-to-nearest): ``s = (hi - lo) / (2**b - 1)``, codes ``0..2**b-1``,
    ``w = (q - z) * s``. Symmetric: the scale is signed and ``w = (q - 2**(b-1)) * s``; the sign
    puts the extra negative level on the larger side.
    """
    if symmetric:
        half = float(1 << (bits - 1))
        big_neg = (-lo) >= hi  # the larger side gets the A levels of the negative code side
        big = torch.where(big_neg, -lo, hi)
        small = torch.where(big_neg, hi, -lo)
        mag = torch.maximum(big / half, small / (half - 1.0))
        return torch.where(big_neg, mag, -mag)
    return (hi - lo) / float((1 << bits) - 1)


def uniform_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point for the range ``[lo, hi]`` (zero is always a level)."""
    s = uniform_scale(lo, hi, bits, symmetric)
    return s, zero_point(lo, s, bits, symmetric)


def zero_point(lo: torch.Tensor, s: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """The integer zero point for scale ``s``: ``round(-lo / s)`` (``2**(b-1)`` when symmetric).
    Rounding it shifts the grid by at most half a step, so with ``s >= (hi - lo) / (2**b - 1)``
    both ends of ``[lo, hi]`` stay within half a step of the outermost levels."""
    if symmetric:
        return torch.full_like(s, float(1 << (bits - 1)))
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.clamp(round_half_even(-lo / safe), 0, float((1 << bits) - 1))


def uniform_codes(groups: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest uniform codes (float, ``0..2**b-1``) of ``groups`` ``(n, g)`` for per-group scale
    ``s`` and zero point ``z``; a zero scale (an all-zero group) maps everything to ``z``."""
    safe = torch.where(s != 0, s, torch.ones_like(s)).unsqueeze(1)
    return torch.clamp(round_half_even(groups / safe) + z.unsqueeze(1), 0, float((1 << bits) - 1))


def uniform_fake_quant(groups: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    return (uniform_codes(groups, s, z, bits) - z.unsqueeze(1)) * s.unsqueeze(1)


def mse_observer(
    groups: torch.Tensor, bits: int, symmetric: bool, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shrunk range with the smallest squared error per group; with ``importance`` ``(n, g)``
    each weight's squared error is weighted (activation-aware clipping)."""
    lo, hi = minmax_observer(groups, bits, symmetric)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for f in MSE_SHRINK_FACTORS.tolist():
        s, z = uniform_params(lo * f, hi * f, bits, symmetric)
        sq = (uniform_fake_quant(groups, s, z, bits) - groups).pow(2)
        err = (sq if importance is None else sq * importance).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * f, best_lo)
        best_hi = torch.where(better, hi * f, best_hi)
    return best_lo, best_hi


def percentile_observer(groups: torch.Tensor, bits: int, symmetric: bool, q: float = 0.999) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip each group to the ``q`` quantile of its values on each side (0.999 by default): robust
    to a single extreme weight in a large group or per-channel row."""
    g = groups.shape[1]
    k_hi = min(g, max(1, math.ceil(q * g)))
    k_lo = max(1, g + 1 - k_hi)
    lo = groups.kthvalue(k_lo, dim=1).values.clamp(max=0)
    hi = groups.kthvalue(k_hi, dim=1).values.clamp(min=0)
    return lo, hi
