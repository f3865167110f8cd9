"""Learnable equivalent transformation (LET) as a calibration modifier (OmniQuant, Shao et al.,
"OmniQuant: Omnidirectionally Calibrated Quantization for Large Language Models", ICLR 2024).

Before a block's layers get group parameters, LET folds SmoothQuant's alpha-0.5 scales
(:mod:`.smoothquant`); then it learns a per-channel scale (and, where biases can absorb it, a
shift) of each fold group against the float block's output and folds the result in for good. With
LWC in the recipe both are learned together, in one optimisation (:func:`.lwc.train_once`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .lwc import join_training, train_once
from .modifier import Modifier, check_epochs, check_positive
from .smoothquant import fold_smoothquant_scales

if TYPE_CHECKING:
    from ..config import CalibrationConfig
    from .state import BlockState

__all__ = ["LET"]

# LET's starting point: SmoothQuant's scales with this migration strength
LET_INIT_ALPHA = 0.5


@dataclass(frozen=True)
class LET(Modifier):
    """Learn per-channel scales and shifts folded into the previous norm/Linear (flat form:
    ``CalibrationConfig(let=True, let_lr=..., epochs=...)``).

    Attributes:
        lr: AdamW learning rate of the scales and shifts.
        epochs: passes over the calibration batches per block (shared with LWC when both run).
    """

    lr: float = 2e-3
    epochs: int = 5

    order = 30

    def __post_init__(self) -> None:
        check_positive("LET", "lr", self.lr)
        check_epochs("LET", self.epochs)

    def before_block(self, block: BlockState) -> None:
        fold_smoothquant_scales(block, LET_INIT_ALPHA)
        join_training(block, let=self)

    def process_block(self, block: BlockState) -> None:
        train_once(block)

    def flat(self) -> dict[str, Any]:
        return {"let": True, "let_lr": self.lr, "epochs": self.epochs}

    @classmethod
    def from_flat(cls, cal: CalibrationConfig) -> LET | None:
        return cls(cal.let_lr, cal.epochs) if cal.let else None
