"""Calibration: data-driven choices of quantization schemes (scales, ranges, bit allocation).

``piecewise_quant.calibrate`` runs a block runner (:mod:`.engine`) with a recipe of modifiers, one
per algorithm; the recipe is a :class:`~piecewise_quant.CalibrationConfig`, given by flat keywords,
a preset, or a list of the modifier configs exported here::

    from piecewise_quant.calibration import GPTQ, LWC
    pq.CalibrationConfig(modifiers=[LWC(epochs=2), GPTQ(act_order=False)], n_samples=128)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY = {
    "Modifier": ".modifier",
    "SmoothQuant": ".smoothquant",
    "LET": ".let",
    "LWC": ".lwc",
    "GPTQ": ".gptq",
    "RefineBreakpoints": ".refine",
    "StaticActScales": ".static_act",
    "StaticKVScales": ".kv_scales",
    "MixedPrecision": ".mixed_precision",
    "Algorithm": ".algorithm",
    "TuneScales": ".tune_scales",
    "ActClipSearch": ".act_clip",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .act_clip import ActClipSearch
    from .algorithm import Algorithm
    from .gptq import GPTQ
    from .kv_scales import StaticKVScales
    from .let import LET
    from .lwc import LWC
    from .mixed_precision import MixedPrecision
    from .modifier import Modifier
    from .refine import RefineBreakpoints
    from .smoothquant import SmoothQuant
    from .static_act import StaticActScales
    from .tune_scales import TuneScales

__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
