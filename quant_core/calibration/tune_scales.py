"""Scale tuning: with the codes fixed, learn each layer's stored group scales against the block's
float output (flat form: ``CalibrationConfig(tune_scales=True, tune_epochs=..., tune_lr=...)``).

GPTQ (or the plain fit) chooses the integer codes one layer at a time, each against its own
output; the scales it stores are the ones the codes were rounded with. Once every layer of a block
is quantized, the scales are continuous parameters that the block's output depends on linearly per
group, and a few passes of AdamW over the calibration batches move them to where the *block*
matches the float block best: the scale half of EfficientQAT's block-wise training (Chen et al.,
"EfficientQAT: Efficient Quantization-Aware Training for Large Language Models", 2024) and of
PEQA, without touching the codes. The loss is the mean squared error between the block's output
(quantized-chain inputs, quantized weights, fake-quantized activations where the layer quantizes
them) and the float block's output on the float inputs, as for LWC/LET. A tuning that does not
lower that loss is undone. Nothing about the stored format changes: the tuned scales are rounded to
the layer's scale dtype and stored where the old ones were.

A layer whose dequantized weight is not affine in its stored scales (a format with integer
exponent scales, such as MX FP4) keeps its scales; the report names it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from .lwc import BlockTrainer, _act_hooks
from .modifier import Modifier, check_epochs, check_positive
from .state import FIT_LABELS

if TYPE_CHECKING:
    from ..config import CalibrationConfig
    from .state import BlockState, LayerRecord

__all__ = ["TuneScales", "ScaleMap", "scale_map"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneScales(Modifier):
    """Learn the stored group scales of every calibrated layer against the block output, codes
    fixed (see the module docstring).

    Attributes:
        epochs: passes over the calibration batches per block; 0 keeps the scales.
        lr: AdamW learning rate of the relative scale change (each scale is ``s0 * (1 + t)``).
    """

    epochs: int = 10
    lr: float = 1e-3

    order = 80  # after GPTQ (60) and the runner's fit; before static activation scales (90)

    def __post_init__(self) -> None:
        check_epochs("TuneScales", self.epochs)
        check_positive("TuneScales", "lr", self.lr)

    def process_block(self, block: BlockState) -> None:
        tune_block(block, self)

    def flat(self) -> dict[str, Any]:
        return {"tune_scales": True, "tune_epochs": self.epochs, "tune_lr": self.lr}

    @classmethod
    def from_flat(cls, cal: CalibrationConfig) -> TuneScales | None:
        return cls(cal.tune_epochs, cal.tune_lr) if cal.tune_scales else None


@dataclass
class ScaleMap:
    """A layer's dequantized weight as an affine function of its stored scales:
    ``W(s) = a + expand(s) * b`` (float32, ``(out, in)``; ``a`` is ``None`` where it is zero, as
    for every format without outliers)."""

    a: torch.Tensor | None
    b: torch.Tensor
    expand: Callable[[torch.Tensor], torch.Tensor]

    def weight(self, s: torch.Tensor) -> torch.Tensor:
        w = self.expand(s) * self.b
        return w if self.a is None else w + self.a


def _expander(scales: torch.Tensor, n: int, k: int, group_size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Maps a scale tensor to the ``(n, k)`` weight it multiplies, or ``None`` for a layout this does
    not know (then the layer keeps its scales)."""
    if scales.numel() == 1:
        return lambda s: s.reshape(1, 1)
    if scales.dim() == 1 and scales.shape[0] == n:
        return lambda s: s.reshape(n, 1)
    if scales.dim() == 2 and scales.shape[0] == n and group_size > 0 and scales.shape[1] == -(-k // group_size):
        return lambda s: s.repeat_interleave(group_size, dim=1)[:, :k]
    return None


@torch.no_grad()
def scale_map(rec: LayerRecord, tensors: dict[str, torch.Tensor]) -> ScaleMap | None:
    """``rec``'s dequantized weight as an affine function of ``tensors["scales"]``, checked against
    the format's own dequantization at the stored scales; ``None`` when it is not one (integer
    scales, a layout of scales this does not know, a format whose weight is not affine in them)."""
    s0 = tensors.get("scales")
    if s0 is None or not s0.is_floating_point():
        return None
    fmt, layer = rec.fmt, rec.layer
    w0 = fmt.dequantize(tensors, layer, torch.float32)
    expand = _expander(s0, w0.shape[0], w0.shape[1], layer.group_size)
    if expand is None:
        return None
    w1 = fmt.dequantize({**tensors, "scales": torch.ones_like(s0)}, layer, torch.float32)
    w2 = fmt.dequantize({**tensors, "scales": torch.full_like(s0, 2.0)}, layer, torch.float32)
    b = w2 - w1
    a = w1 - b
    m = ScaleMap(a if bool(a.any()) else None, b, expand)
    tol = 1e-5 * float(w0.abs().max().clamp(min=1e-30))
    if not bool(torch.isfinite(b).all()) or float((m.weight(s0.float()) - w0).abs().max()) > tol:
        return None
    return m


def _round(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``s`` in the stored scale dtype; a scale that would leave its range keeps the old value."""
    out = s.to(like.dtype)
    bad = ~torch.isfinite(out) | ((out == 0) & (like != 0))
    return torch.where(bad, like, out)


def _tunable(block: BlockState) -> dict[str, tuple[LayerRecord, dict[str, torch.Tensor], ScaleMap]]:
    """The block's calibrated layers whose weight is affine in their stored scales, with the
    tensors they would store now; the others get a report note and keep their scales."""
    layers = {}
    for rec in block.calibrated:
        tensors = block.tensors(rec)
        m = scale_map(rec, tensors)
        if m is None:
            rec.note = "; ".join(x for x in (rec.note, "scales not tuned (not affine in the stored scales)") if x)
            continue
        layers[rec.rel] = (rec, tensors, m)
    return layers


class _ScaleTrainer(BlockTrainer):
    """The relative scale changes ``t`` of a block's tunable layers (each scale ``s0 * (1 + t)``),
    applied functionally over the block's frozen parameters."""

    def __init__(self, block: BlockState, layers: dict[str, tuple[LayerRecord, dict[str, torch.Tensor], ScaleMap]]):
        super().__init__(block)
        self.layers = layers
        self.dtypes = {rel: block.linear(rec).weight.dtype for rel, (rec, _, _) in layers.items()}
        self.s0 = {rel: t["scales"].detach().float() for rel, (_, t, _) in layers.items()}
        self.t = {rel: torch.zeros_like(s, requires_grad=True) for rel, s in self.s0.items()}

    def weights(self) -> dict[str, torch.Tensor]:
        w = dict(self.base)
        for rel, (_, _, m) in self.layers.items():
            w[f"{rel}.weight"] = m.weight(self.s0[rel] * (1 + self.t[rel])).to(self.dtypes[rel])
        return w

    def train(self, cfg: TuneScales, seed: int) -> dict[str, torch.Tensor]:
        """AdamW over the batches, ``cfg.epochs`` passes; returns the scales rounded to their stored
        dtype, which the trainer then holds (so ``mean_loss`` is the stored model's)."""
        self.optimise([{"params": list(self.t.values()), "lr": cfg.lr}], cfg.epochs, seed,
                      f"scale tuning of block {self.state.index} produced a non-finite loss; lower tune_lr or check "
                      "the calibration data")
        with torch.no_grad():
            tuned = {rel: _round(self.s0[rel] * (1 + self.t[rel]), t["scales"]) for rel, (_, t, _) in self.layers.items()}
            for rel, s in tuned.items():
                s0 = self.s0[rel]
                self.t[rel].copy_(torch.where(s0 != 0, s.float() / s0.where(s0 != 0, torch.ones_like(s0)) - 1, 0.0))
        return tuned


def tune_block(block: BlockState, cfg: TuneScales) -> tuple[float, float] | None:
    """Tune the scales of ``block``'s calibrated layers (their codes fixed); returns the block
    loss before and after (``None`` when nothing was tuned)."""
    if cfg.epochs == 0 or not block.calibrated:
        return None
    layers = _tunable(block)
    if not layers:
        return None
    seed = block.run.cal.seed
    trainer = _ScaleTrainer(block, layers)
    hooks = _act_hooks(block)
    grads = {k: p.requires_grad for k, p in block.block.named_parameters()}
    for p in block.block.parameters():
        p.requires_grad_(False)
    try:
        before = trainer.mean_loss()
        tuned = trainer.train(cfg, seed)
        after = trainer.mean_loss()
    finally:
        for h in hooks:
            h.remove()
        for k, p in block.block.named_parameters():
            p.requires_grad_(grads[k])
    if not after < before:
        logger.info("scale tuning did not lower block %d's loss (%.4g -> %.4g); keeping the scales", block.index,
                    before, after)
        return before, before
    for rel, (rec, tensors, m) in layers.items():
        rec.tensors = {**tensors, "scales": tuned[rel]}
        learned = rec.tensors_by or (rec.params_by if rec.params_by in FIT_LABELS else None)
        rec.tensors_by = f"{learned}+tune" if learned else "tune"
        with torch.no_grad():  # the float weight follows (what later steps and the chain read)
            block.linear(rec).weight.data.copy_(m.weight(tuned[rel].float()).to(trainer.dtypes[rel]))
    return before, after
