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
from ..kernels.grids import outer_levels, piecewise_levels
from .base import TensorLayout, WeightFormat, round_scale, scale_dtype_of
from .defaults import BUILTIN_DEFAULTS
from .groups import group_view, round_half_even

__all__ = ["PiecewiseFormat", "FORMAT_VERSION", "outer_levels"]

FORMAT_VERSION = 1
CHUNK_GROUPS = 1 << 14
MAX_STAGE1_IDS = 32


def _encode(x: torch.Tensor, h: torch.Tensor, r: torch.Tensor, half: float) -> torch.Tensor:
    """Nearest centred code ``d`` for ``x`` (in units of the scale) on the (h, r) grid."""
    a = x.abs()
    centre = torch.clamp(round_half_even(x), -h, h)
    j = torch.clamp(round_half_even((a - h) / r), min=1.0)
    tail = torch.sign(x) * (h + j)
    d = torch.where(a <= h + r / 2, centre, tail)
    return torch.clamp(d, -half, half - 1)


def _sq_error(xo: torch.Tensor, s: torch.Tensor, h: torch.Tensor, r: torch.Tensor, neg_outer: torch.Tensor,
              pos_outer: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error of rounding oriented groups ``xo`` ``(n, g)`` to the (h, r) grid at each of the
    non-negative scales ``s`` ``(n, F)``; grid parameters are ``(n, 1)``. Returns ``(n, F)``.
    Works on level values (no codes needed), all F scales in one pass."""
    s3 = s.unsqueeze(-1)
    safe = torch.where(s3 > 0, s3, torch.ones_like(s3))
    x = xo.unsqueeze(1) / safe
    h, r = h.unsqueeze(-1), r.unsqueeze(-1)
    a = x.abs()
    centre = torch.clamp(round_half_even(x), -h, h)
    tail = torch.copysign(h + r * torch.clamp(round_half_even((a - h) / r), min=1.0), x)
    level = torch.clamp(torch.where(a <= h + r / 2, centre, tail), -neg_outer.unsqueeze(-1), pos_outer.unsqueeze(-1))
    sq = (level - x).square()
    if importance is not None:
        sq = sq * importance.unsqueeze(1)
    return sq.sum(dim=-1) * safe.squeeze(-1).square()


def _finer_scales(xo, errs, coarse, shape_params, importance, best):
    """Stage 3 of :meth:`PiecewiseFormat.search`: a finer scale search around the best coarse
    scale, for the two best breakpoint ids of each group. Returns the improved ``(scale, id)``."""
    best_err, best_s, best_k = best
    rows = torch.arange(xo.shape[0])
    step = float(coarse[0] - coarse[1])
    deltas = torch.linspace(-step, step, 7, dtype=torch.float32)
    for kk in errs.amin(dim=2).topk(min(2, errs.shape[1]), dim=1, largest=False).indices.t():
        h, r, no, po, cover = shape_params(kk.unsqueeze(1))
        f0 = coarse[errs[rows, kk].argmin(dim=1)]
        f = (f0.unsqueeze(1) + deltas).clamp(min=0.05, max=1.0)
        e, j = _sq_error(xo, cover * f, h, r, no, po, importance).min(dim=1)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_s = torch.where(better, cover.squeeze(1) * f[rows, j], best_s)
        best_k = torch.where(better, kk, best_k)
    return best_s, best_k


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

    aux_tensor = "breakpoint_ids"
    default_bits, default_group_size, default_symmetric = BUILTIN_DEFAULTS["piecewise"]

    def kernel_format(self, spec: QuantSpec) -> str:
        return "piecewise"

    def _shapes(self, tensors: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
        """Each group's ``(h, r)`` row of the breakpoint table: ``(rows, n_groups, 2)``."""
        rows = 1 if layer.group_size == -1 else layer.out_features
        ids = ref.unpack_group_field(tensors["breakpoint_ids"], layer.spec.bits, rows, layer.n_groups).long()
        return piecewise_table(layer.spec.bits, ids.device)[ids]

    def levels(self, tensors: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
        half = 1 << (layer.spec.bits - 1)
        hr = self._shapes(tensors, layer)
        s = tensors["scales"].to(torch.float32).unsqueeze(-1)
        d = torch.arange(-half, half, dtype=torch.float32, device=s.device).view(1, 1, -1)
        return piecewise_levels(d, hr[..., :1], hr[..., 1:]) * s

    def breakpoints(self, tensors: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
        return (self._shapes(tensors, layer)[..., 0] * tensors["scales"].to(torch.float32)).abs()

    def layout(self, layer: LayerSpec) -> dict[str, TensorLayout]:
        bits = layer.spec.bits
        rows = 1 if layer.group_size == -1 else layer.out_features
        return {
            "qweight": TensorLayout((layer.out_features, packed_length(layer.in_features, bits)), torch.uint8),
            "scales": TensorLayout((rows, layer.n_groups), scale_dtype_of(layer.spec)),
            "breakpoint_ids": TensorLayout((layer.n_groups, packed_length(rows, bits)), torch.uint8),
        }

    def search(
        self, groups: torch.Tensor, bits: int, observer: str, importance: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best (signed scale, breakpoint id) per group of ``groups`` ``(n, g)`` (float32);
        ``importance`` ``(n, g)`` weights each weight's squared error.

        ``minmax``: every breakpoint id with the scale that covers the group. ``mse``: every id at
        a coarse set of scales, then a finer scale search around the best coarse scale for the two
        best ids of each group.
        """
        table = piecewise_table(bits, groups.device)
        lo = groups.amin(dim=1).clamp(max=0)
        hi = groups.amax(dim=1).clamp(min=0)
        neg_big = (-lo) >= hi
        # orient so the larger-magnitude side lies on the negative code side (it has one more level)
        sign = torch.where(neg_big, 1.0, -1.0)
        big = torch.where(neg_big, -lo, hi).unsqueeze(1)
        small = torch.where(neg_big, hi, -lo).unsqueeze(1)
        xo = groups * sign.unsqueeze(1)
        h_all, r_all = table[:, 0], table[:, 1]
        neg_outer_all, pos_outer_all = outer_levels(bits, groups.device)
        n_ids = table.shape[0]

        def shape_params(k: torch.Tensor):  # k: (n, 1) ids -> per-group (h, r, neg_outer, pos_outer, cover)
            h, r = h_all[k], r_all[k]
            no, po = neg_outer_all[k], pos_outer_all[k]
            return h, r, no, po, torch.maximum(big / no, small / po)

        lowest = {2: 0.3, 3: 0.45}.get(bits, 0.55) if observer == "mse" else 1.0
        coarse = torch.linspace(1.0, lowest, 6, dtype=torch.float32) if observer == "mse" else torch.ones(1, dtype=torch.float32)
        n, n_f = groups.shape[0], coarse.numel()
        rows = torch.arange(n)
        # stage 1: every id at the two largest scales; stage 2: the 3 best ids at the other scales
        errs = torch.full((n, n_ids, n_f), float("inf"), dtype=torch.float32)
        # with 256 ids (8 bits) stage 1 looks at an even subset of the table, uniform grid included
        stride = max(1, n_ids // MAX_STAGE1_IDS)
        for k in range(0, n_ids, stride):
            h, r, no, po, cover = shape_params(torch.full_like(big, k, dtype=torch.int64))
            errs[:, k, :2] = _sq_error(xo, cover * coarse[:2], h, r, no, po, importance)
        if n_f > 2:
            for kk in errs[:, :, :2].amin(dim=2).topk(min(3, n_ids), dim=1, largest=False).indices.t():
                h, r, no, po, cover = shape_params(kk.unsqueeze(1))
                errs[rows, kk, 2:] = _sq_error(xo, cover * coarse[2:], h, r, no, po, importance)
        best_err, best_idx = errs.reshape(n, -1).min(dim=1)
        best_k = best_idx // n_f
        _, _, _, _, cover = shape_params(best_k.unsqueeze(1))
        best_s = cover.squeeze(1) * coarse[best_idx % n_f]
        if observer == "mse":
            best_s, best_k = _finer_scales(xo, errs, coarse, shape_params, importance, (best_err, best_s, best_k))
        return best_s * sign, best_k

    def fit(self, groups: torch.Tensor, layer: LayerSpec, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Signed scale (stored value, as float32) and breakpoint id per group."""
        spec = layer.spec
        scales, ids = [], []
        imp_chunks = importance.split(CHUNK_GROUPS) if importance is not None else [None] * len(groups.split(CHUNK_GROUPS))
        for chunk, imp in zip(groups.split(CHUNK_GROUPS), imp_chunks):
            s, k = self.search(chunk, spec.bits, spec.observer, imp)
            scales.append(s)
            ids.append(k)
        s = round_scale(torch.cat(scales), scale_dtype_of(spec), layer.name).to(torch.float32)
        return {"scale": s, "breakpoint": torch.cat(ids)}

    def codes(self, x: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
        """Centred codes ``d`` (float) of ``x`` ``(n, c)``; the grid value is ``levels(d) * scale``."""
        bits = layer.spec.bits
        table = piecewise_table(bits, x.device)
        s, k = params["scale"], params["breakpoint"]
        safe = torch.where(s != 0, s, torch.ones_like(s)).unsqueeze(1)
        return _encode(x / safe, table[k, 0].unsqueeze(1), table[k, 1].unsqueeze(1), float(1 << (bits - 1)))

    def fake_quantize(self, x: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
        table = piecewise_table(layer.spec.bits, x.device)
        s, k = params["scale"], params["breakpoint"]
        d = self.codes(x, params, layer)
        return ref.piecewise_levels(d, table[k, 0].unsqueeze(1), table[k, 1].unsqueeze(1)) * s.unsqueeze(1)

    def encode(self, weight: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec) -> dict[str, torch.Tensor]:
        bits = layer.spec.bits
        half = float(1 << (bits - 1))
        groups = group_view(weight.detach().to(torch.float32), layer)
        d = self.codes(groups, params, layer)
        codes = (d + half).to(torch.int32).reshape(layer.out_features, layer.in_features)
        rows = 1 if layer.group_size == -1 else layer.out_features
        return {
            "qweight": pack_codes(codes, bits),
            "scales": params["scale"].to(scale_dtype_of(layer.spec)).reshape(rows, layer.n_groups),
            "breakpoint_ids": ref.pack_group_field(params["breakpoint"].to(torch.int32).reshape(rows, layer.n_groups), bits),
        }

    def quantize(self, weight: torch.Tensor, layer: LayerSpec) -> dict[str, torch.Tensor]:
        groups = group_view(weight.detach().to(torch.float32), layer)
        return self.encode(weight, self.fit(groups, layer), layer)

    def dequantize(self, tensors: dict[str, torch.Tensor], layer: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
        return ref.dequantize(
            tensors["qweight"], tensors["scales"], tensors["breakpoint_ids"], "piecewise",
            layer.spec.bits, layer.group_size, layer.in_features, dtype,
        )

    # ---- calibration hooks (LWC)
    # Learnable weight clipping (piecewise_quant.calibration.lwc) learns a clipping strength in
    # (0, 1) per group: the scale is ``2 * strength`` times the one that covers the group with its
    # breakpoint, which (with the scale's sign) stays as fitted.
    # Breakpoint refinement (piecewise_quant.calibration.refine) applies to this format.
    breakpoint_refinement = True

    def lwc_init(self, groups: torch.Tensor, layer: LayerSpec, params: dict[str, torch.Tensor],
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The clipping strength that reproduces the fitted ``params``, and the fixed breakpoint and sign."""
        fixed = {"breakpoint": params["breakpoint"].clone(), "sign": torch.where(params["scale"] < 0, -1.0, 1.0)}
        cover = self._lwc_cover(groups, layer, fixed["breakpoint"])
        return {"scale": params["scale"].abs() / (2 * cover.clamp(min=1e-12))}, fixed

    def lwc_params(self, groups: torch.Tensor, layer: LayerSpec, strength: dict[str, torch.Tensor],
                   fixed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Differentiable group parameters (scale not yet rounded) for the clipping ``strength``."""
        cover = self._lwc_cover(groups.detach(), layer, fixed["breakpoint"])
        return {"scale": fixed["sign"] * 2 * strength["scale"] * cover, "breakpoint": fixed["breakpoint"]}

    def lwc_final_params(self, groups: torch.Tensor, layer: LayerSpec, strength: dict[str, torch.Tensor],
                         fixed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stored-precision group parameters: the rounded scale and the fixed breakpoint."""
        p = self.lwc_params(groups, layer, strength, fixed)
        s = round_scale(p["scale"].detach(), scale_dtype_of(layer.spec), layer.name).to(torch.float32)
        return {"scale": s, "breakpoint": fixed["breakpoint"].clone()}

    def _lwc_cover(self, groups: torch.Tensor, layer: LayerSpec, breakpoint: torch.Tensor) -> torch.Tensor:
        """Per group, the scale whose outer level with ``breakpoint`` reaches the group's largest magnitude."""
        neg_outer, _ = outer_levels(layer.spec.bits, groups.device)
        return groups.abs().amax(dim=1) / neg_outer[breakpoint]
