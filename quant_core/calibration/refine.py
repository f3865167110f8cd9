"""Piecewise breakpoint refinement against the layer and block output.

The data-free search (and the activation-aware fit) choose each group's breakpoint and scale to
minimise a per-weight error. Here each group's ``(breakpoint, scale)`` is chosen again to minimise
the layer's output error ``e^T H_gg e`` over the group's weights ``e = w - q``, with ``H_gg`` the
group's block of the input Hessian (so correlated input channels count together), over every
breakpoint id and a range of scales that cover the group. The new choice is kept only if the
block's output error on calibration data drops; otherwise the previous parameters stay.

As a calibration modifier (:class:`RefineBreakpoints`) it runs after the block's parameters are
fitted (and learned, with LWC), on every layer whose format has breakpoints to refine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..config import LayerSpec
from ..formats.base import WeightFormat, round_scale, scale_dtype_of
from ..formats.groups import group_view
from ..formats.piecewise import outer_levels
from .blocks import relative_error
from .modifier import Modifier

if TYPE_CHECKING:
    from ..config import CalibrationConfig
    from .state import BlockState

__all__ = ["RefineBreakpoints", "refine_breakpoints"]

MAX_IDS = 32
FACTORS = torch.linspace(1.0, 0.5, 11, dtype=torch.float32)


@torch.no_grad()
def _search(w: torch.Tensor, h: torch.Tensor, layer: LayerSpec, fmt: WeightFormat, current: dict[str, torch.Tensor]):
    """Best params per group under the H-weighted error; ``w`` is ``(rows, n_groups, g)``."""
    bits = layer.spec.bits
    neg_outer, pos_outer = outer_levels(bits, w.device)
    n_ids = neg_outer.shape[0]
    ids = list(range(0, n_ids, max(1, n_ids // MAX_IDS)))
    rows, n_groups, g = w.shape
    scale = current["scale"].reshape(rows, n_groups)
    bp = current["breakpoint"].reshape(rows, n_groups)
    best_s, best_k = scale.clone(), bp.clone()
    for j in range(n_groups):
        x = w[:, j]  # (rows, g)
        hj = h[j * g:(j + 1) * g, j * g:(j + 1) * g]
        sign = torch.where(scale[:, j] < 0, -1.0, 1.0)

        def err_of(s: torch.Tensor, k: torch.Tensor, x: torch.Tensor = x, hj: torch.Tensor = hj) -> torch.Tensor:
            q = fmt.fake_quantize(x, {"scale": s, "breakpoint": k}, layer)
            e = x - q
            return ((e @ hj) * e).sum(dim=1)

        best_e = err_of(scale[:, j], bp[:, j])
        # oriented so that the larger side sits on the negative codes, as the format's search does
        big = torch.where(sign > 0, -x.amin(dim=1).clamp(max=0), x.amax(dim=1).clamp(min=0))
        small = torch.where(sign > 0, x.amax(dim=1).clamp(min=0), -x.amin(dim=1).clamp(max=0))
        for k in ids:
            cover = torch.maximum(big / neg_outer[k], small / pos_outer[k])
            kk = torch.full((rows,), k, dtype=bp.dtype)
            for f in FACTORS.tolist():
                s = round_scale(sign * cover * f, scale_dtype_of(layer.spec), layer.name).to(torch.float32)
                e = err_of(s, kk)
                better = e < best_e
                best_e = torch.where(better, e, best_e)
                best_s[:, j] = torch.where(better, s, best_s[:, j])
                best_k[:, j] = torch.where(better, kk, best_k[:, j])
    return {"scale": best_s.reshape(-1), "breakpoint": best_k.reshape(-1)}


@torch.no_grad()
def refine_breakpoints(
    block: nn.Module,
    rel: str,
    layer: LayerSpec,
    fmt: WeightFormat,
    params: dict[str, torch.Tensor],
    hessian: torch.Tensor,
    probe: Callable[[], list[torch.Tensor]],
    targets: list[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Refined params for piecewise layer ``rel`` of ``block`` (its float weight is still in
    place); ``probe()`` runs the block on a few calibration batches, ``targets`` are the float
    block's outputs for them."""
    if layer.group_size == -1:
        return params
    linear = block.get_submodule(rel)
    w0 = linear.weight.data.clone()
    wf = w0.float()
    g = layer.group_size
    new = _search(wf.reshape(layer.out_features, layer.in_features // g, g), hessian.float(), layer, fmt, params)

    def block_error(p: dict[str, torch.Tensor]) -> float:
        q = fmt.fake_quantize(group_view(wf, layer), p, layer).reshape(w0.shape)
        linear.weight.data.copy_(q.to(w0.dtype))
        try:
            outs = probe()
        finally:
            linear.weight.data.copy_(w0)
        return relative_error(outs, targets)

    return new if block_error(new) < block_error(params) else params


@dataclass(frozen=True)
class RefineBreakpoints(Modifier):
    """Re-choose piecewise breakpoints against the layer and block output (flat form:
    ``CalibrationConfig(refine_breakpoints=True)``); does not combine with GPTQ, which refits
    every group itself."""

    order = 50
    needs_hessian = True

    def process_block(self, block: BlockState) -> None:
        # each layer is probed with every other layer of the block still in float
        for rec in sorted(block.calibrated, key=lambda r: r.rel):
            if getattr(rec.fmt, "breakpoint_refinement", False):
                rec.params = refine_breakpoints(
                    block.block, rec.rel, rec.layer, rec.fmt, rec.params, rec.stats.hessian(),
                    lambda: block.run_block(block.q[:2]), block.fp_out[:2],
                )
                rec.params_fixed = True

    def flat(self) -> dict[str, Any]:
        return {"refine_breakpoints": True}

    @classmethod
    def from_flat(cls, cal: CalibrationConfig) -> RefineBreakpoints | None:
        return cls() if cal.refine_breakpoints else None
