"""Per-layer activation clipping chosen on the calibration data (flat form:
``CalibrationConfig(act_clip_search=True)``).

``act_clip_ratio`` shrinks every token's dynamic range before its activations are rounded: at 4
bits a little clipping trades a few saturated values for a finer step on all the others, and how
much pays differs from layer to layer (a rotated ``down_proj`` input is close to Gaussian, a
``q_proj`` input after a norm is not). One ratio for the whole model is a compromise. Once a
block's ``QuantLinear`` layers are in place (GPTQ done), this step runs the block on its inputs
along the quantized chain, keeps an evenly spaced sample of each layer's input rows, and gives each
layer with dynamic integer activations the ratio of :data:`ACT_CLIP_RATIOS` (or the configured
one) whose output is closest, in squared error, to the same layer's output on unquantized
inputs. The chosen ratios are written to the config as per-layer overrides, so a saved checkpoint
reloads them everywhere. Layers outside the repeated blocks (quantized data-free) keep the
configured ratio.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..config import LayerSpec
from ..qlinear import QuantLinear
from .modifier import Modifier

if TYPE_CHECKING:
    from ..config import CalibrationConfig
    from .state import BlockState, RunState

__all__ = ["ActClipSearch", "ACT_CLIP_RATIOS", "searchable"]

logger = logging.getLogger(__name__)

ACT_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # the candidates, besides the configured ratio
_SAMPLE_ROWS = 2048  # input rows per layer the ratios are compared on (evenly spaced over the calibration tokens)


def searchable(layer: LayerSpec) -> bool:
    """Whether the search chooses ``layer``'s clip ratio: dynamic integer activations without
    top-k clipping (static scales, fp8 and FP4 activations keep theirs)."""
    a = layer.spec.act_args
    return a is not None and a.dynamic and a.format == "int" and a.topk == 0


@dataclass(frozen=True)
class ActClipSearch(Modifier):
    """Choose each block layer's ``act_clip_ratio`` on the calibration data (see the module
    docstring)."""

    order = 85  # the block's QuantLinear layers exist (after GPTQ and scale tuning); before static scales (90)

    def setup(self, run: RunState) -> None:
        inside = set(run.plan) - set(run.outside())
        if not any(searchable(run.plan[n]) for n in inside):
            raise ValueError(
                "act_clip_search chooses the clip ratio of dynamic integer activations, and no calibrated layer has "
                "them; set act_bits (e.g. 4) with act_mode='dynamic_per_token' or 'dynamic_per_token_asym', or drop "
                "act_clip_search"
            )

    def after_block(self, block: BlockState) -> None:
        layers = {r.name: block.linear(r) for r in block.records.values()}
        layers = {n: m for n, m in layers.items()
                  if isinstance(m, QuantLinear) and m.act_quantizer is not None and searchable(m.layer_spec)}
        if not layers:
            return
        rows = _sample_inputs(block, layers, _SAMPLE_ROWS)
        chosen: dict[str, LayerSpec] = {}
        for name, m in layers.items():
            if name not in rows:  # it saw no tokens (a routed expert): keeps the configured ratio
                continue
            ratio = choose_ratio(m, rows[name])
            if ratio != m.layer_spec.spec.act_clip_ratio:
                set_clip_ratio(m, ratio)
                chosen[name] = m.layer_spec
        if chosen:
            _record(block.run, chosen)
        logger.debug("block %d: activation clip ratios %s", block.index,
                     {n: layer.spec.act_clip_ratio for n, layer in chosen.items()})

    def flat(self) -> dict[str, Any]:
        return {"act_clip_search": True}

    @classmethod
    def from_flat(cls, cal: CalibrationConfig) -> ActClipSearch | None:
        return cls() if cal.act_clip_search else None


@torch.no_grad()
def _sample_inputs(block: BlockState, layers: dict[str, QuantLinear], rows: int) -> dict[str, torch.Tensor]:
    """About ``rows`` evenly spaced input rows of each layer, from one block pass on the quantized chain."""
    total = sum(h[..., 0].numel() for h in block.q)
    step = max(1, total // rows)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def keep(name: str):
        def hook(_m: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            seen[name].append(x.reshape(-1, x.shape[-1])[::step].clone())  # as the layer sees them: its dtype, its device
        return hook

    handles = [m.register_forward_pre_hook(keep(n)) for n, m in layers.items()]
    try:
        block.run_block(block.q)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items() if v and sum(t.shape[0] for t in v) > 0}


@torch.no_grad()
def choose_ratio(layer: QuantLinear, x: torch.Tensor, ratios: tuple[float, ...] = ACT_CLIP_RATIOS) -> float:
    """The ratio among ``ratios`` and the layer's own whose output on ``x`` is closest (squared
    error, float64 sums) to the layer's output on unquantized ``x``; the layer's own ratio wins ties.
    The layer is left as it was."""
    aq = layer.act_quantizer
    own = layer.layer_spec.spec.act_clip_ratio
    layer.act_quantizer = None
    try:
        ref = layer(x).double()
    finally:
        layer.act_quantizer = aq
    args = aq.args
    best, best_err = own, None
    try:
        for r in (own, *[r for r in ratios if r != own]):
            aq.args = dataclasses.replace(args, clip_ratio=float(r))
            err = float((layer(x).double() - ref).pow(2).sum())
            if best_err is None or err < best_err:
                best, best_err = float(r), err
    finally:
        aq.args = args
    return best


def set_clip_ratio(layer: QuantLinear, ratio: float) -> None:
    """Give ``layer`` the activation clip ratio ``ratio`` (its spec and its quantizer)."""
    spec = dataclasses.replace(layer.layer_spec.spec, act_clip_ratio=float(ratio))
    layer.layer_spec = dataclasses.replace(layer.layer_spec, spec=spec)
    layer.act_quantizer.args = dataclasses.replace(layer.act_quantizer.args, clip_ratio=float(ratio))


def _record(run: RunState, chosen: dict[str, LayerSpec]) -> None:
    """Write the layers' new schemes to the run's plan and to its config as per-layer overrides.

    An override replaces the default scheme for the layers it matches (the first match wins), so
    each layer's override carries everything in which its scheme differs from the config's."""
    default = run.config.default_spec
    run.plan.update(chosen)
    run.config = run.config.with_overrides({name: layer.spec.changes_from(default) for name, layer in chosen.items()})
