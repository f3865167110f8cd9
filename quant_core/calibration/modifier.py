"""The modifier interface: one calibration algorithm that reacts to the block runner's lifecycle.

A modifier is a small frozen dataclass: its fields are the algorithm's settings, its methods the
hooks the runner (:mod:`.engine`) calls. The runner calls each hook on every modifier of the
recipe, in the modifiers' :attr:`Modifier.order`, and one phase ends for all of them before the next
begins:

1. ``setup(run)``: once, before any work (the plan is made and the blocks are found): look things
   up, refuse what cannot work.
2. ``start(run)``: once, the first block's inputs are captured (mixed precision's sensitivity pass).
3. Per block, with the block's layer statistics collected:

   * ``before_block(block)``: before any group parameters exist (SmoothQuant/LET fold scales);
   * the runner fits every calibrated layer's group parameters;
   * ``process_block(block)``: change parameters or choose stored tensors for the whole block
     (LWC/LET training, breakpoint refinement, GPTQ, then scale tuning on GPTQ's tensors);
   * ``process_layer(block, record)``: per calibrated layer, just before it is swapped for a
     ``QuantLinear`` (a plugin's calibration algorithm);
   * ``after_block(block)``: the block's ``QuantLinear`` layers are in place (static activation
     scales).

This module imports nothing heavy: ``CalibrationConfig`` reads modifiers without importing torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

if TYPE_CHECKING:
    from ..config import CalibrationConfig
    from .state import BlockState, LayerRecord, RunState

__all__ = ["Modifier", "flat_fields"]


class Modifier:
    """Base class of the calibration algorithms (see the module docstring for the lifecycle).

    Subclasses are frozen dataclasses. Class attributes:
        order: position in the pipeline; the runner calls modifiers in increasing order, whatever
            the order they were listed in (they act at different points, and the flat keyword form
            cannot carry an order).
        needs_hessian: the block statistics must include each layer's ``X^T X``.
    """

    order: ClassVar[int] = 100
    needs_hessian: ClassVar[bool] = False

    def setup(self, run: RunState) -> None:
        """Before any work: the plan is made and the blocks are found."""

    def start(self, run: RunState) -> None:
        """The first block's inputs are captured, no block is calibrated yet."""

    def before_block(self, block: BlockState) -> None:
        """The block's layer statistics are collected; no group parameters exist yet."""

    def process_block(self, block: BlockState) -> None:
        """Every calibrated layer has fitted group parameters (``record.params``)."""

    def process_layer(self, block: BlockState, record: LayerRecord) -> None:
        """One calibrated layer, just before it becomes a ``QuantLinear``."""

    def after_block(self, block: BlockState) -> None:
        """The block's ``QuantLinear`` layers are in place."""

    def flat(self) -> dict[str, Any]:
        """The flat ``CalibrationConfig`` keywords this modifier stands for (what ``to_dict`` saves)."""
        raise NotImplementedError(f"{type(self).__name__} has no flat CalibrationConfig form")

    @classmethod
    def from_flat(cls, cal: CalibrationConfig) -> Modifier | None:
        """This modifier as the flat keywords of ``cal`` describe it, or ``None`` when they leave it out."""
        raise NotImplementedError(f"{cls.__name__} has no flat CalibrationConfig form")


def flat_fields(modifiers: Iterable[Any]) -> dict[str, Any]:
    """The flat ``CalibrationConfig`` keywords of a list of modifiers; ``ValueError`` for anything
    that is not a modifier, a modifier listed twice, or two modifiers that disagree on a shared
    keyword (LWC and LET train together, with one ``epochs``)."""
    if isinstance(modifiers, (str, bytes, dict)) or not isinstance(modifiers, Iterable):
        raise ValueError(f"calibration modifiers must be a list such as [GPTQ(), StaticActScales()]; got {modifiers!r}")
    out: dict[str, Any] = {}
    owner: dict[str, Modifier] = {}
    seen: set[type] = set()
    for m in modifiers:
        if not isinstance(m, Modifier):
            raise ValueError(
                f"calibration modifiers must be modifier configs such as GPTQ(), LWC() or SmoothQuant(0.5) from "
                f"piecewise_quant.calibration; got {m!r}"
            )
        if type(m) in seen:
            raise ValueError(f"calibration modifier {type(m).__name__} is listed twice; keep one")
        seen.add(type(m))
        for key, value in m.flat().items():
            if key in out and out[key] != value:
                raise ValueError(
                    f"calibration modifiers {type(owner[key]).__name__} and {type(m).__name__} disagree on {key} "
                    f"({out[key]!r} vs {value!r}); they run together, give both the same {key}"
                )
            out[key], owner[key] = value, m
    return out


# ---- field checks shared by the modifier configs ---------------------------------------------


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be True or False; got {value!r}")


def check_positive(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive number; got {value!r}")


def check_epochs(owner: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}.epochs must be an integer >= 0; got {value!r}")
