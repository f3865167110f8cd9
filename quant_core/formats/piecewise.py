"""Piecewise grid: a dense uniform centre and sparse uniform tails, at the cost of a uniform grid.

Per group the format stores b-bit codes, one signed scale ``s`` and one b-bit *breakpoint id*
selecting ``(h, r)`` from a fixed table (``piecewise_quant.kernels.grids``): the centre
``[-h|s|, h|s|]`` has step ``|s|``, the tails step ``r|s|``; the breakpoint is ``p = h|s|``. So a b-bit
piecewise weight costs exactly what a b-bit asymmetric uniform weight costs (the b-bit field holds
the breakpoint instead of a zero point): ``b + (16 + b) / group_size`` bits with float16 scales.

Quantization searches, per group, every breakpoint id and a range of scales, and keeps the pair
with the smallest squared weight error (the ``minmax`` observer searches breakpoints only, with
the scale that covers the whole group). Inspired by piecewise linear quantization (Fang et al.,
ECCV 2020), with the region split and breakpoint stored per group instead of an extra index bit.
"""

from __future__ import annotations

import torch

from ..config import LayerSpec, QuantSpec
from ..kernels import pack_codes, packed_length, piecewise_table
from ..kernels import reference as ref
from .base import TensorLayout, WeightFormat, round_scale_up, scale_dtype_of
from .groups import group_view, round_half_even

__all__ = ["PiecewiseFormat", "FORMAT_VERSION", "SCALE_FACTORS"]

FORMAT_VERSION = 1
CHUNK_GROUPS = 1 << 14
# fraction of the covering scale tried by the "mse" observer (1.0 keeps every weight in range)
SCALE_FACTORS = torch.linspace(1.0, 0.55, 16)


def _encode(x: torch.Tensor, h: torch.Tensor, r: torch.Tensor, half: float) -> torch.Tensor:
    """Nearest centred code ``d`` for ``x`` (in units of the scale) on the (h, r) grid."""
    a = x.abs()
    centre = torch.clamp(round_half_even(x), -h, h)
    j = torch.clamp(round_half_even((a - h) / r), min=1.0)
    tail = torch.sign(x) * (h + j)
    d = torch.where(a <= h + r / 2, centre, tail)
    return torch.clamp(d, -half, half - 1)


class PiecewiseFormat(WeightFormat):
    name = "piecewise"
    supported_bits = (2, 3, 4, 8)

    def validate(self, spec: QuantSpec) -> None:
        super().validate(spec)
        if spec.symmetric is False:
            raise ValueError(
                "symmetric=False is not available for grid 'piecewise': its b-bit per-group field holds the "
                "breakpoint, and the signed scale already puts the extra level on the larger side"
            )
        if spec.observer not in ("mse", "minmax"):
            raise ValueError(f"grid 'piecewise' supports observer 'mse' or 'minmax', not {spec.observer!r}")

    def kernel_format(self, spec: QuantSpec) -> str:
        return "piecewise"

    def layout(self, layer: LayerSpec) -> dict[str, TensorLayout]:
        bits = layer.spec.bits
        rows = 1 if layer.group_size == -1 else layer.out_features
        return {
            "qweight": TensorLayout((layer.out_features, packed_length(layer.in_features, bits)), torch.uint8),
            "scales": TensorLayout((rows, layer.n_groups), scale_dtype_of(layer.spec)),
            "breakpoint_ids": TensorLayout((layer.n_groups, packed_length(rows, bits)), torch.uint8),
        }

    def search(self, groups: torch.Tensor, bits: int, observer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Best (signed scale, breakpoint id) per group of ``groups`` ``(n, g)`` (float32)."""
        table = piecewise_table(bits, groups.device)
        half = float(1 << (bits - 1))
        lo = groups.amin(dim=1).clamp(max=0)
        hi = groups.amax(dim=1).clamp(min=0)
        neg_big = (-lo) >= hi
        # orient so the larger-magnitude side lies on the negative code side (it has one more level)
        sign = torch.where(neg_big, 1.0, -1.0)
        big = torch.where(neg_big, -lo, hi)
        small = torch.where(neg_big, hi, -lo)
        factors = SCALE_FACTORS.tolist() if observer == "mse" else [1.0]
        best_err = torch.full_like(lo, float("inf"))
        best_s = torch.zeros_like(lo)
        best_k = torch.zeros_like(lo, dtype=torch.int64)
        x_oriented = groups * sign.unsqueeze(1)  # now the larger side is negative
        for k in range(table.shape[0]):
            h, r = float(table[k, 0]), float(table[k, 1])
            neg_outer = h + r * (half - h) if half > h else half  # |level| of d = -A
            pos_outer = h + r * (half - 1 - h) if half - 1 > h else half - 1  # level of d = A-1 (>= 1)
            cover = torch.maximum(big / neg_outer, small / pos_outer)
            ht, rt = torch.tensor(h), torch.tensor(r)
            for f in factors:
                s = cover * f
                safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)
                d = _encode(x_oriented / safe, ht, rt, half)
                err = ref.piecewise_levels(d, ht, rt) * safe - x_oriented
                err = torch.where(s.unsqueeze(1) > 0, err, x_oriented).pow(2).sum(dim=1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_s = torch.where(better, s, best_s)
                best_k = torch.where(better, torch.full_like(best_k, k), best_k)
        return best_s * sign, best_k

    def quantize(self, weight: torch.Tensor, layer: LayerSpec) -> dict[str, torch.Tensor]:
        spec = layer.spec
        bits = spec.bits
        half = float(1 << (bits - 1))
        groups = group_view(weight.detach().to(torch.float32), layer)
        table = piecewise_table(bits, groups.device)
        scales, ids = [], []
        for chunk in groups.split(CHUNK_GROUPS):
            s, k = self.search(chunk, bits, spec.observer)
            scales.append(s)
            ids.append(k)
        s = round_scale_up(torch.cat(scales), scale_dtype_of(spec), layer.name)
        k = torch.cat(ids)
        sf = s.to(torch.float32)
        safe = torch.where(sf != 0, sf, torch.ones_like(sf)).unsqueeze(1)
        h = table[k, 0].unsqueeze(1)
        r = table[k, 1].unsqueeze(1)
        d = _encode(groups / safe, h, r, half)
        codes = (d + half).to(torch.int32).reshape(layer.out_features, layer.in_features)
        rows = 1 if layer.group_size == -1 else layer.out_features
        return {
            "qweight": pack_codes(codes, bits),
            "scales": s.reshape(rows, layer.n_groups),
            "breakpoint_ids": ref.pack_group_field(k.to(torch.int32).reshape(rows, layer.n_groups), bits),
        }

    def dequantize(self, tensors: dict[str, torch.Tensor], layer: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
        return ref.dequantize(
            tensors["qweight"], tensors["scales"], tensors["breakpoint_ids"], "piecewise",
            layer.spec.bits, layer.group_size, layer.in_features, dtype,
        )
