"""Learnable weight clipping (LWC) and learnable equivalent transformation (LET), trained per block.

Both come from OmniQuant (Shao et al., "OmniQuant: Omnidirectionally Calibrated Quantization for
Large Language Models", ICLR 2024). Per block, the loss is the mean squared error between the
block's output with fake-quantized weights (and activations) and the float block's output on the
float inputs; rounding uses a straight-through estimator (the LSQ gradient for the step size).

* **LWC** learns a clipping strength per weight group: for the uniform grid ``sigmoid(gamma)`` and
  ``sigmoid(beta)`` shrink the group's max and min; for the piecewise grid a factor in ``(0, 2)``
  of the scale that covers the group with its breakpoint (chosen before training, kept fixed).
  FP8 layers keep their fitted scales.
* **LET** learns a per-channel scale ``s`` (initialised from SmoothQuant with alpha 0.5) and, where
  the producer and every consumer have a bias, a per-channel shift ``delta`` (initialised to the
  channel's (max + min) / 2) of each fold group
  (see :mod:`.smoothing`): the consumers see ``(x - delta) / s``, their weights become ``W s``
  and their biases ``b + W delta``. After training the transformation is folded for good.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..config import LayerSpec
from ..formats.base import WeightFormat, round_scale, scale_dtype_of
from ..formats.groups import group_view
from ..formats.piecewise import outer_levels
from ..kernels import reference as ref
from ..observers import uniform_scale, zero_point
from .smoothing import FoldGroup, apply_fold

__all__ = ["LayerClip", "train_block"]

logger = logging.getLogger(__name__)


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(0.02, 0.98)
    return torch.log(p / (1 - p))


class LayerClip(nn.Module):
    """Learnable clipping of one layer's weight groups (LWC); ``learn=False`` only fake-quantizes
    with the fitted parameters (gradients still reach the weight through the straight-through
    estimator, which LET needs)."""

    def __init__(self, layer: LayerSpec, fmt: WeightFormat, weight: torch.Tensor, params: dict[str, torch.Tensor], learn: bool):
        super().__init__()
        self.layer, self.fmt, self.learn = layer, fmt, learn
        self.grid = layer.spec.grid if layer.spec.grid in ("uniform", "piecewise") else "other"
        if not learn or self.grid == "other":
            self.learn = False
            self.fixed = {k: v.detach() for k, v in params.items()}
            return
        g = group_view(weight.detach().float(), layer)
        bits = layer.spec.bits
        if self.grid == "uniform":
            mn = g.amin(dim=1).clamp(max=0)
            mx = g.amax(dim=1).clamp(min=0)
            full = uniform_scale(mn, mx, bits, bool(layer.spec.symmetric)).abs()
            f0 = params["scale"].abs() / full.clamp(min=1e-12)
            self.gamma = nn.Parameter(_logit(f0))
            self.beta = nn.Parameter(_logit(f0.clone()))
        else:
            self.register_buffer("breakpoint", params["breakpoint"].clone())
            self.register_buffer("sign", torch.where(params["scale"] < 0, -1.0, 1.0))
            base = self._cover(g)
            self.gamma = nn.Parameter(_logit(params["scale"].abs() / (2 * base.clamp(min=1e-12))))

    def _cover(self, g: torch.Tensor) -> torch.Tensor:
        neg_outer, _ = outer_levels(self.layer.spec.bits, g.device)
        return g.abs().amax(dim=1) / neg_outer[self.breakpoint]

    def params(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable per-group parameters for ``weight`` (scales not yet rounded)."""
        if not self.learn:
            return self.fixed
        g = group_view(weight.float(), self.layer)
        bits, sym = self.layer.spec.bits, bool(self.layer.spec.symmetric)
        if self.grid == "uniform":
            lo = torch.sigmoid(self.beta) * g.amin(dim=1).clamp(max=0)
            hi = torch.sigmoid(self.gamma) * g.amax(dim=1).clamp(min=0)
            s = uniform_scale(lo, hi, bits, sym)
            z = zero_point(lo.detach(), s.detach(), bits, sym)
            return {"scale": s, "zero": z}
        s = self.sign * 2 * torch.sigmoid(self.gamma) * self._cover(g.detach())
        return {"scale": s, "breakpoint": self.breakpoint}

    def fake(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantized weight with the straight-through estimator: inside the grid's range the
        gradient reaches the weight unchanged and the scale gets ``level - value`` (in units of the
        scale, as in LSQ/OmniQuant); a clipped weight passes no gradient to itself and gives the
        scale its level."""
        g = group_view(weight.float(), self.layer)
        p = self.params(weight)
        pd = {k: v.detach() for k, v in p.items()}
        with torch.no_grad():
            q = self.fmt.fake_quantize(g.detach(), pd, self.layer)
        s = p["scale"]
        if not self.learn or not s.requires_grad:
            out = g + (q - g).detach()
        else:
            safe = torch.where(s.detach() != 0, s, torch.ones_like(s)).unsqueeze(1)
            with torch.no_grad():
                sd = safe.detach()
                big = (g.abs().amax(dim=1, keepdim=True) + 1.0) * 1e3
                ends = self.fmt.fake_quantize(torch.cat([big, -big], dim=1), pd, self.layer) / sd
                u = g.detach() / sd
                clipped = (u > ends.amax(dim=1, keepdim=True)) | (u < ends.amin(dim=1, keepdim=True))
                level = q / sd
            u_live = g / safe
            out = torch.where(clipped, safe * level, safe * (u_live + (level - u_live).detach()))
        return out.reshape(weight.shape).to(weight.dtype)

    @torch.no_grad()
    def final_params(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stored-precision parameters for the final (folded) weight."""
        if not self.learn:
            return self.fixed
        p = self.params(weight)
        s = round_scale(p["scale"].detach(), scale_dtype_of(self.layer.spec), self.layer.name).to(torch.float32)
        if self.grid == "uniform":
            g = group_view(weight.float(), self.layer)
            lo = torch.sigmoid(self.beta) * g.amin(dim=1).clamp(max=0)
            return {"scale": s, "zero": zero_point(lo, s, self.layer.spec.bits, bool(self.layer.spec.symmetric))}
        return {"scale": s, "breakpoint": self.breakpoint.clone()}


def _fake_act(x: torch.Tensor, spec) -> torch.Tensor:
    fmt = f"int{spec.act_bits}" if spec.act_format == "int" else "fp8_e4m3"
    if spec.act_mode == "static_per_tensor":
        qmax = ref.ACT_QMAX[fmt]
        mag = x.detach().abs().reshape(-1)
        k = min(spec.act_topk + 1, mag.numel())
        scale = (mag.topk(k).values[-1] * spec.act_clip_ratio / qmax).clamp(min=1e-12)
        q = ref.quantize_activation(x.detach(), fmt, "static_per_tensor", scale, 1.0, 0)
    else:
        q = ref.quantize_activation(x.detach(), fmt, "dynamic_per_token", None, spec.act_clip_ratio, spec.act_topk)
    return x + (q - x).detach()


def train_block(
    block: nn.Module,
    layers: dict[str, LayerSpec],
    fmts: dict[str, WeightFormat],
    init_params: dict[str, dict[str, torch.Tensor]],
    groups: list[FoldGroup],
    call: Callable[[nn.Module, int, torch.Tensor], torch.Tensor],
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    *,
    lwc: bool,
    let: bool,
    epochs: int,
    lwc_lr: float,
    let_lr: float,
    seed: int,
) -> tuple[dict[str, LayerClip], float, float]:
    """Train LWC/LET for one block; folds the learned LET transform into the block and returns the
    per-layer clip modules (for their final parameters) and the loss before/after."""
    torch.manual_seed(seed)
    # with LET alone the clip modules still follow the changing weights, but are not trained
    clips = {
        n: LayerClip(layers[n], fmts[n], block.get_submodule(n).weight, init_params[n], learn=lwc or let) for n in layers
    }
    let_scales: list[nn.Parameter] = []
    let_shifts: list[nn.Parameter | None] = []
    if let:
        # the engine has already folded SmoothQuant's alpha=0.5 scales: LET starts from identity
        for grp in groups:
            let_scales.append(nn.Parameter(torch.zeros(grp.channels)))
            let_shifts.append(nn.Parameter(grp.act_mean.clone().float()) if grp.shift_ok and grp.act_mean is not None else None)
    params: dict[str, nn.Parameter] = dict(block.named_parameters())
    base = {k: v.detach() for k, v in params.items()}

    def effective() -> dict[str, torch.Tensor]:
        w = {k: v for k, v in base.items()}
        if let:
            for grp, th, d in zip(groups, let_scales, let_shifts):
                s = torch.exp(th)
                for c in grp.consumers:
                    wc = w[f"{c}.weight"]
                    if d is not None:
                        w[f"{c}.bias"] = w[f"{c}.bias"] + (base[f"{c}.weight"].float() @ d).to(wc.dtype)
                    w[f"{c}.weight"] = wc * s.unsqueeze(0).to(wc.dtype)
                pw = w[f"{grp.producer}.weight"]
                shp = (-1,) if grp.kind == "norm" else (-1, 1)
                w[f"{grp.producer}.weight"] = pw / s.reshape(shp).to(pw.dtype)
                bkey = f"{grp.producer}.bias"
                if bkey in w and w[bkey] is not None:
                    b = w[bkey] - (d if d is not None else 0.0)
                    w[bkey] = b / s.to(b.dtype)
        for n, clip in clips.items():
            w[f"{n}.weight"] = clip.fake(w[f"{n}.weight"])
        return w

    hooks = []
    for n, lay in layers.items():
        if lay.spec.act_bits is not None:
            spec = lay.spec
            hooks.append(block.get_submodule(n).register_forward_pre_hook(lambda m, a, spec=spec: (_fake_act(a[0], spec),) + a[1:]))
    trainable = [p for c in clips.values() for p in c.parameters()] if lwc else []
    if not lwc:
        for c in clips.values():
            c.requires_grad_(False)
    init_state = {n: {k: v.detach().clone() for k, v in c.named_parameters()} for n, c in clips.items()}
    init_thetas = [th.detach().clone() for th in let_scales]
    init_shifts = [None if d is None else d.detach().clone() for d in let_shifts]
    groups_opt = []
    if trainable:
        groups_opt.append({"params": trainable, "lr": lwc_lr})
    let_params = let_scales + [d for d in let_shifts if d is not None]
    if let_params:
        groups_opt.append({"params": let_params, "lr": let_lr})

    def loss_on(i: int) -> torch.Tensor:
        out = call(lambda *a, **k: functional_call(block, effective(), a, k), i, inputs[i])
        return (out.float() - targets[i].float()).pow(2).mean()

    for p in params.values():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            before = sum(float(loss_on(i)) for i in range(len(inputs))) / len(inputs)
        after = before
        if groups_opt and epochs > 0:
            opt = torch.optim.AdamW(groups_opt, weight_decay=0.0)
            g = torch.Generator().manual_seed(seed)
            for _ in range(epochs):
                total = 0.0
                for i in torch.randperm(len(inputs), generator=g).tolist():
                    opt.zero_grad(set_to_none=True)
                    loss = loss_on(i)
                    if not math.isfinite(float(loss.detach())):
                        raise FloatingPointError("LWC/LET training produced a non-finite loss")
                    loss.backward()
                    opt.step()
                    total += loss.item()
            with torch.no_grad():
                after = sum(float(loss_on(i)) for i in range(len(inputs))) / len(inputs)
            if after > before:
                logger.info("LWC/LET did not lower the block loss (%.4g -> %.4g); keeping the initial parameters", before, after)
                with torch.no_grad():
                    for n, c in clips.items():
                        for k, v in c.named_parameters():
                            v.copy_(init_state[n][k])
                    for th, t0 in zip(let_scales, init_thetas):
                        th.copy_(t0)
                    for d, d0 in zip(let_shifts, init_shifts):
                        if d is not None:
                            d.copy_(d0)
                after = before
    finally:
        for h in hooks:
            h.remove()
    if let and let_scales:
        for grp, th, d in zip(groups, let_scales, let_shifts):
            apply_fold(block, grp, torch.exp(th.detach()), None if d is None else d.detach())
    return clips, before, after
