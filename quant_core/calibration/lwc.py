"""Learnable weight clipping (LWC) as a calibration modifier, and the per-block training it shares
with the learnable equivalent transformation (LET, :mod:`.let`).

Both come from OmniQuant (Shao et al., "OmniQuant: Omnidirectionally Calibrated Quantization for
Large Language Models", ICLR 2024). Per block, the loss is the mean squared error between the
block's output with fake-quantized weights (and activations) and the float block's output on the
float inputs; rounding uses a straight-through estimator (the LSQ gradient for the step size).

* **LWC** learns clipping strengths per weight group, ``sigmoid`` of a learned logit; the format
  says what they clip (its ``lwc_*`` calibration hooks): for the uniform grid the group's max and
  min, for the piecewise grid a factor in ``(0, 2)`` of the scale that covers the group with its
  breakpoint (chosen before training, kept fixed). Formats without the hooks (FP8) keep their
  fitted scales.
* **LET** learns a per-channel scale ``s`` (initialised from SmoothQuant with alpha 0.5) and, where
  the producer and every consumer have a bias, a per-channel shift ``delta`` (initialised to the
  channel's (max + min) / 2) of each fold group
  (see :mod:`.smoothing`): the consumers see ``(x - delta) / s``, their weights become ``W s``
  and their biases ``b + W delta``. After training the transformation is folded for good.

When both run they are learned together: one optimiser, one loss. Both modifiers join the block's
:class:`BlockTraining` before the block, and the first of them to reach ``process_block`` runs it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call

from ..config import LayerSpec
from ..formats.base import WeightFormat
from ..formats.groups import group_view
from ..kernels import reference as ref
from .modifier import Modifier, check_epochs, check_positive
from .smoothing import FoldGroup, apply_fold

if TYPE_CHECKING:
    from ..args import ActArgs
    from ..config import CalibrationConfig
    from .let import LET
    from .state import BlockState

__all__ = ["LWC", "LayerClip", "BlockTraining", "join_training", "train_once", "train_block"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LWC(Modifier):
    """Learn per-group clipping strengths against the block output (flat form:
    ``CalibrationConfig(lwc=True, lwc_lr=..., epochs=...)``).

    Attributes:
        lr: AdamW learning rate of the clipping logits.
        epochs: passes over the calibration batches per block (shared with LET when both run).
    """

    lr: float = 5e-3
    epochs: int = 5

    order = 40

    def __post_init__(self) -> None:
        check_positive("LWC", "lr", self.lr)
        check_epochs("LWC", self.epochs)

    def before_block(self, block: BlockState) -> None:
        join_training(block, lwc=self)

    def process_block(self, block: BlockState) -> None:
        train_once(block)

    def flat(self) -> dict[str, Any]:
        return {"lwc": True, "lwc_lr": self.lr, "epochs": self.epochs}

    @classmethod
    def from_flat(cls, cal: CalibrationConfig) -> LWC | None:
        return cls(cal.lwc_lr, cal.epochs) if cal.lwc else None


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(0.02, 0.98)
    return torch.log(p / (1 - p))


class LayerClip(nn.Module):
    """Learnable clipping of one layer's weight groups (LWC); ``learn=False``, or a format without
    the ``lwc_*`` hooks, only fake-quantizes with the fitted parameters (gradients still reach the
    weight through the straight-through estimator, which LET needs)."""

    def __init__(self, layer: LayerSpec, fmt: WeightFormat, weight: torch.Tensor, params: dict[str, torch.Tensor], learn: bool):
        super().__init__()
        self.layer, self.fmt = layer, fmt
        self.learn = learn and hasattr(fmt, "lwc_init")
        if not self.learn:
            self.frozen = {k: v.detach() for k, v in params.items()}
            return
        strength, self.fixed = fmt.lwc_init(group_view(weight.detach().float(), layer), layer, params)
        self.names = list(strength)
        for k, v in strength.items():
            self.register_parameter(f"clip_{k}", nn.Parameter(_logit(v)))

    def strengths(self) -> dict[str, torch.Tensor]:
        return {k: torch.sigmoid(getattr(self, f"clip_{k}")) for k in self.names}

    def params(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable per-group parameters for ``weight`` (scales not yet rounded)."""
        if not self.learn:
            return self.frozen
        return self.fmt.lwc_params(group_view(weight.float(), self.layer), self.layer, self.strengths(), self.fixed)

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
            return self.frozen
        return self.fmt.lwc_final_params(group_view(weight.float(), self.layer), self.layer, self.strengths(), self.fixed)


def _fake_act(x: torch.Tensor, args: ActArgs) -> torch.Tensor:
    """Fake-quantized activations with a straight-through gradient; a static scale is the one the
    calibration of this batch would give."""
    if not args.dynamic:
        mag = x.detach().abs().reshape(-1)
        k = min(args.topk + 1, mag.numel())
        scale = (mag.topk(k).values[-1] * args.clip_ratio / args.qmax).clamp(min=1e-12)
        q = ref.quantize_activation(x.detach(), args.kernel_format, args.kernel_mode, scale, 1.0, 0)
    else:
        q = ref.quantize_activation(x.detach(), args.kernel_format, args.kernel_mode, None, args.clip_ratio, args.topk)
    return x + (q - x).detach()


# ---- the joint block training ------------------------------------------------------------------


@dataclass
class BlockTraining:
    """What the block's LWC and LET modifiers asked to learn; trained once, by the first of them."""

    lwc: LWC | None = None
    let: LET | None = None
    done: bool = False

    @property
    def epochs(self) -> int:
        return (self.lwc or self.let).epochs  # equal when both are given (CalibrationConfig checks)


def join_training(block: BlockState, *, lwc: LWC | None = None, let: LET | None = None) -> None:
    """Add LWC or LET to the block's joint training (before the block)."""
    training = block.training if block.training is not None else BlockTraining()
    training.lwc = lwc or training.lwc
    training.let = let or training.let
    block.training = training


def train_once(block: BlockState) -> None:
    """Run the block's joint training if it has not run yet; then every calibrated layer gets its
    learned clipping (LWC) or a fit of its transformed weight (LET only)."""
    training = block.training
    if training is None or training.done or not block.calibrated:
        return
    training.done = True
    clips, before, after = train_block(block, training)
    block.lwc_loss = (before, after)
    if training.let is not None and block.fold_groups:
        block.collect_stats()
    for rec in block.calibrated:
        clip = clips[rec.rel]
        if training.lwc is not None and clip.learn:
            rec.params = clip.final_params(block.linear(rec).weight)
            rec.params_by, rec.params_fixed = "lwc", True
        else:
            rec.params = block.fit(rec)


class BlockTrainer:
    """Training against the float block: a subclass's ``weights()`` (the block's parameters with its
    learnable pieces applied) run functionally over the block, on the quantized-chain inputs,
    against the float block's outputs. Shared by LWC/LET and scale tuning."""

    def __init__(self, block: BlockState) -> None:
        self.state = block
        self.base = {k: v.detach() for k, v in block.block.named_parameters()}

    def weights(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss_on(self, i: int) -> torch.Tensor:
        st = self.state
        out = st.run.inputs.call(lambda *a, **k: functional_call(st.block, self.weights(), a, k), i, st.q[i])
        return (out.float() - st.fp_out[i].float()).pow(2).mean()

    @torch.no_grad()
    def mean_loss(self) -> float:
        n = len(self.state.q)
        return sum(float(self.loss_on(i)) for i in range(n)) / n

    def optimise(self, param_groups: list[dict[str, Any]], epochs: int, seed: int, nonfinite: str) -> None:
        """AdamW over the batches in a seeded order, ``epochs`` passes; a non-finite loss raises
        ``FloatingPointError(nonfinite)``."""
        opt = torch.optim.AdamW(param_groups, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for i in torch.randperm(len(self.state.q), generator=g).tolist():
                opt.zero_grad(set_to_none=True)
                loss = self.loss_on(i)
                if not math.isfinite(float(loss.detach())):
                    raise FloatingPointError(nonfinite)
                loss.backward()
                opt.step()


class _Trainer(BlockTrainer):
    """One block's learnable pieces: LWC's clip modules and LET's per-group scales (log) and shifts,
    applied functionally over the block's frozen parameters."""

    def __init__(self, block: BlockState, clips: dict[str, LayerClip], groups: list[FoldGroup]) -> None:
        super().__init__(block)
        self.clips, self.groups = clips, groups
        self.scales = [nn.Parameter(torch.zeros(g.channels)) for g in groups]
        self.shifts = [nn.Parameter(g.act_mean.clone().float()) if g.shift_ok and g.act_mean is not None else None
                       for g in groups]

    def weights(self) -> dict[str, torch.Tensor]:
        """The block's parameters with LET's transformation and LWC's fake quantization applied."""
        w = {k: v for k, v in self.base.items()}
        for grp, th, d in zip(self.groups, self.scales, self.shifts):
            _transform(w, self.base, grp, torch.exp(th), d)
        for n, clip in self.clips.items():
            w[f"{n}.weight"] = clip.fake(w[f"{n}.weight"])
        return w

    def learnable(self) -> list[torch.Tensor]:
        return [p for c in self.clips.values() for p in c.parameters()] + self.scales + [d for d in self.shifts if d is not None]


def _transform(w: dict[str, torch.Tensor], base: dict[str, torch.Tensor], grp: FoldGroup, s: torch.Tensor,
               d: torch.Tensor | None) -> None:
    """LET on one fold group: consumers see ``(x - d) / s`` (weights ``W s``, biases ``b + W d``)."""
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


def _act_hooks(block: BlockState) -> list[Any]:
    """Fake-quantize the inputs of the calibrated layers that quantize activations."""
    hooks = []
    for rec in block.calibrated:
        args = rec.layer.spec.act_args
        if args is not None:
            hooks.append(block.linear(rec).register_forward_pre_hook(lambda m, a, args=args: (_fake_act(a[0], args),) + a[1:]))
    return hooks


def train_block(block: BlockState, training: BlockTraining) -> tuple[dict[str, LayerClip], float, float]:
    """Train LWC/LET for one block; folds the learned LET transform into the block and returns the
    per-layer clip modules (for their final parameters) and the loss before/after. A training that
    does not lower the loss is undone."""
    seed = block.run.cal.seed
    torch.manual_seed(seed)
    lwc, let = training.lwc, training.let
    # with LET alone the clip modules still follow the changing weights, but are not trained
    clips = {r.rel: LayerClip(r.layer, r.fmt, block.linear(r).weight, r.params, learn=True) for r in block.calibrated}
    # the SmoothQuant alpha=0.5 scales are folded already: LET starts from identity
    trainer = _Trainer(block, clips, block.fold_groups if let is not None else [])
    hooks = _act_hooks(block)
    if lwc is None:
        for c in clips.values():
            c.requires_grad_(False)
    param_groups = []
    trainable = [p for c in clips.values() for p in c.parameters()] if lwc is not None else []
    if trainable:
        param_groups.append({"params": trainable, "lr": lwc.lr})
    let_params = trainer.scales + [d for d in trainer.shifts if d is not None]
    if let_params:
        param_groups.append({"params": let_params, "lr": let.lr})
    initial = [p.detach().clone() for p in trainer.learnable()]
    for p in block.block.parameters():
        p.requires_grad_(False)
    try:
        before = after = trainer.mean_loss()
        if param_groups and training.epochs > 0:
            trainer.optimise(param_groups, training.epochs, seed, "LWC/LET training produced a non-finite loss")
            after = trainer.mean_loss()
            if after > before:
                logger.info("LWC/LET did not lower the block loss (%.4g -> %.4g); keeping the initial parameters", before, after)
                with torch.no_grad():
                    for p, p0 in zip(trainer.learnable(), initial):
                        p.copy_(p0)
                after = before
    finally:
        for h in hooks:
            h.remove()
    for grp, th, d in zip(trainer.groups, trainer.scales, trainer.shifts):
        apply_fold(block.block, grp, torch.exp(th.detach()), None if d is None else d.detach())
    return clips, before, after
