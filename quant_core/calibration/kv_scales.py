"""Static FP8 KV-cache scales as a calibration modifier.

With ``kv_cache=KVArgs(bits=8, format="fp8", static_scales=True, residual_length=0)`` every
attention layer stores one float32 scale for its keys and one for its values
(:mod:`piecewise_quant.kv_static`). Once a block's ``QuantLinear`` layers (and their static
activation scales) are in place, the block runs once more on its inputs along the quantized chain
while each attention module's new post-RoPE keys and values are observed, exactly what would enter
the cache; ``k_scale = max |K| / 448`` and ``v_scale = max |V| / 448`` over all calibration tokens.

The runner adds it to the recipe whenever the config declares static KV scales
(:func:`kv_scale_modifiers`); it has no flat ``CalibrationConfig`` keyword, so nothing is stored
for it in ``calibration``: ``kv_cache.static_scales`` already says it ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .modifier import Modifier

if TYPE_CHECKING:
    from ..config import CalibrationConfig, PiecewiseQuantConfig
    from .state import BlockState, RunState

__all__ = ["StaticKVScales", "kv_scale_modifiers"]


def _declared(config: PiecewiseQuantConfig) -> bool:
    kv = config.kv_cache
    return kv is not None and kv.static_scales


@dataclass(frozen=True)
class StaticKVScales(Modifier):
    """Set every attention layer's static FP8 ``k_scale``/``v_scale`` from the block's inputs on
    the quantized chain (max |K| / 448, max |V| / 448)."""

    order = 95  # after StaticActScales: the keys come from the fully quantized block

    def setup(self, run: RunState) -> None:
        from ..kv_static import attention_modules

        if not _declared(run.config):
            return
        if not any(attention_modules(block) for block in run.blocks):
            raise ValueError(
                f"kv_cache.static_scales=True, but the calibrated blocks ({run.blocks_path}) hold no attention module "
                "(a module with layer_idx whose forward takes past_key_values); static KV scales need one"
            )

    def after_block(self, block: BlockState) -> None:
        from ..kv_static import attention_modules, observe_kv_amax, scale_from_amax, set_kv_scales

        if not _declared(block.run.config):
            return
        found = attention_modules(block.block)
        if not found:
            return
        with observe_kv_amax(found) as amax:
            block.run_block(block.q)
        for name, module, _ in found:
            s = scale_from_amax(amax[name])
            set_kv_scales(module, s[0], s[1])

    def flat(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_flat(cls, cal: CalibrationConfig) -> None:
        return None  # not a flat keyword: kv_scale_modifiers adds it from the quantization config


def kv_scale_modifiers(config: PiecewiseQuantConfig) -> tuple[Modifier, ...]:
    """``(StaticKVScales(),)`` when ``config`` declares static KV scales, else ``()``."""
    return (StaticKVScales(),) if _declared(config) else ()
