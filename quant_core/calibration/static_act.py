"""Static activation scales as a calibration modifier.

A layer with ``act_mode="static_per_tensor"`` quantizes its inputs with one scale fixed at
calibration. Once a block's ``QuantLinear`` layers are in place, the block runs on its inputs along
the quantized chain while every such layer observes its inputs, and each scale is set from what it
saw (:meth:`~piecewise_quant.QuantLinear.finish_observing`). Always part of a recipe: listing it
changes nothing, and layers without static activations ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import LayerSpec
from ..qlinear import QuantLinear
from .modifier import Modifier

if TYPE_CHECKING:
    from ..config import CalibrationConfig
    from .state import BlockState, RunState

__all__ = ["StaticActScales"]


def _static(layer: LayerSpec) -> bool:
    args = layer.spec.act_args
    return args is not None and not args.dynamic


@dataclass(frozen=True)
class StaticActScales(Modifier):
    """Set every static activation scale from the block's inputs on the quantized chain."""

    order = 90

    def setup(self, run: RunState) -> None:
        for name in run.outside():
            if _static(run.plan[name]):
                raise ValueError(
                    f"layer {name!r} lies outside the calibrated blocks ({run.blocks_path}) and cannot get a static "
                    "activation scale; keep it in float (modules_to_not_convert) or give it act_mode='dynamic_per_token'"
                )

    def before_block(self, block: BlockState) -> None:
        for rec in block.records.values():
            if rec.stats.tokens == 0 and _static(rec.layer):
                raise ValueError(
                    f"layer {rec.name!r} received no calibration tokens, so its static activation scale is unknown; give more "
                    "varied calibration data or use act_mode='dynamic_per_token' for it (overrides)"
                )

    def after_block(self, block: BlockState) -> None:
        static = [m for m in block.block.modules() if isinstance(m, QuantLinear) and m.act_scale is not None]
        if not static:
            return
        for m in static:
            m.start_observing()
        try:
            block.run_block(block.q)
        except BaseException:
            for m in static:
                m.stop_observing()
            raise
        for m in static:
            m.finish_observing()

    def flat(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_flat(cls, cal: CalibrationConfig) -> StaticActScales:
        return cls()
