"""The built-in modifiers, and a ``CalibrationConfig``'s recipe as a tuple of them.

The flat keyword form (``CalibrationConfig(gptq=True, lwc=True)``) and the list form
(``CalibrationConfig(modifiers=[GPTQ(), LWC()])``) describe the same recipe: the flat fields are
what is stored (``to_dict`` and checkpoints keep them), and :func:`modifiers_of` (``config.recipe``) reads
the recipe back as modifiers, in pipeline order, for the runner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .act_clip import ActClipSearch
from .algorithm import Algorithm
from .gptq import GPTQ
from .let import LET
from .lwc import LWC
from .mixed_precision import MixedPrecision
from .modifier import Modifier
from .refine import RefineBreakpoints
from .smoothquant import SmoothQuant
from .static_act import StaticActScales
from .tune_scales import TuneScales

if TYPE_CHECKING:
    from ..config import CalibrationConfig

__all__ = ["BUILTIN_MODIFIERS", "modifiers_of"]

BUILTIN_MODIFIERS: tuple[type[Modifier], ...] = tuple(sorted(
    (MixedPrecision, SmoothQuant, LET, LWC, RefineBreakpoints, GPTQ, Algorithm, TuneScales, ActClipSearch,
     StaticActScales),
    key=lambda cls: cls.order,
))


def modifiers_of(cal: CalibrationConfig) -> tuple[Modifier, ...]:
    """The recipe of ``cal`` as modifiers in pipeline order (static activation scales always last)."""
    found = (cls.from_flat(cal) for cls in BUILTIN_MODIFIERS)
    return tuple(m for m in found if m is not None)
