"""The piecewise grid tables: which (centre half-width, tail step ratio) each breakpoint id means.

A piecewise group stores b-bit codes ``q``, one signed scale ``s`` and one b-bit breakpoint id ``k``.
With ``A = 2**(b-1)``, ``d = q - A`` lies in ``[-A, A-1]`` and, with ``(h, r) = TABLE[b][k]``::

    w = s * d                                   if |d| <= h   (dense centre, step |s|)
    w = s * sign(d) * (h + r * (|d| - h))       otherwise     (sparse tails, step r*|s|)

so the breakpoint is ``p = h*|s|``, the centre has ``2h+1`` levels (zero is always one of them) and
the remaining ``2**b - 2h - 1`` codes are spread over the two tails. The sign of ``s`` picks which
side gets the extra level. Entry 0 of every table is the plain uniform grid (``h = A``).

The tables were chosen greedily to minimise the weight MSE of 128-weight groups of real
(tiny-llama-pydoc, all-MiniLM-L6-v2) and Gaussian weights; they are part of the checkpoint format
(``FORMAT_VERSION`` in ``piecewise_quant.formats.piecewise``): changing one needs a version bump.
"""

from __future__ import annotations

import torch

__all__ = ["PIECEWISE_TABLES", "piecewise_table", "piecewise_levels", "outer_levels"]


def _eight_bit_table() -> list[tuple[float, float]]:
    entries: list[tuple[float, float]] = [(128.0, 1.0)]
    ratios = [1.125 + i * (5.0 - 1.125) / 16 for i in range(17)]
    for h in range(8, 128, 8):
        for r in ratios:
            entries.append((float(h), round(r, 6)))
    return entries


PIECEWISE_TABLES: dict[int, list[tuple[float, float]]] = {
    2: [(2.0, 1.0), (1.0, 1.5), (1.0, 2.0), (1.0, 3.0)],
    3: [(4.0, 1.0), (1.0, 1.5), (2.0, 1.25), (2.0, 1.5), (2.0, 1.75), (2.0, 2.0), (3.0, 1.75), (3.0, 2.5)],
    4: [
        (8.0, 1.0),
        (3.0, 1.5), (3.0, 1.75),
        (4.0, 1.5), (4.0, 1.75), (4.0, 2.0),
        (5.0, 1.25), (5.0, 1.5), (5.0, 1.75), (5.0, 2.0), (5.0, 2.5),
        (6.0, 1.75), (6.0, 2.5), (6.0, 3.0),
        (7.0, 3.0), (7.0, 4.0),
    ],
    8: _eight_bit_table(),
}

for _b, _t in PIECEWISE_TABLES.items():
    assert len(_t) == 2**_b, (_b, len(_t))

_cache: dict[tuple[int, torch.device], torch.Tensor] = {}


def piecewise_table(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``float32`` tensor of shape ``(2**bits, 2)``: columns are ``h`` and ``r``."""
    if bits not in PIECEWISE_TABLES:
        raise ValueError(f"piecewise grids exist for bits in {sorted(PIECEWISE_TABLES)}, not {bits}")
    key = (bits, torch.device(device))
    t = _cache.get(key)
    if t is None:
        t = torch.tensor(PIECEWISE_TABLES[bits], dtype=torch.float32, device=device)
        _cache[key] = t
    return t


def piecewise_levels(d: torch.Tensor, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Map centred codes ``d`` to grid levels in units of the scale (the formula above)."""
    a = d.abs()
    return torch.where(a <= h, d, torch.sign(d) * (h + r * (a - h)))


def outer_levels(bits: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per breakpoint id, the outermost level (in units of the scale) on the negative code side
    (``2**(b-1)`` codes) and on the positive side (one fewer)."""
    table = piecewise_table(bits, device)
    h, r = table[:, 0], table[:, 1]
    half = float(1 << (bits - 1))
    neg = torch.where(h < half, h + r * (half - h), torch.full_like(h, half))
    pos = torch.where(h < half - 1, h + r * (half - 1 - h), torch.full_like(h, half - 1))
    return neg, pos
