"""SmoothQuant as a calibration modifier (Xiao et al., "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", ICML 2023).

Before a block's layers get group parameters, each fold group's input channels are divided by
``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` and the consumers' weight columns multiplied by it;
the division is folded into the producing norm or Linear (:mod:`.smoothing`), and a fold that
changes the block's output is undone. LET (:mod:`.let`) starts from the same folds with alpha 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .modifier import Modifier
from .smoothing import find_fold_groups, smoothquant_scales, verify_folds

if TYPE_CHECKING:
    from ..config import CalibrationConfig
    from .state import BlockState

__all__ = ["SmoothQuant", "fold_smoothquant_scales"]


@dataclass(frozen=True)
class SmoothQuant(Modifier):
    """Migrate activation outliers into the weights with strength ``alpha`` in [0, 1]
    (flat form: ``CalibrationConfig(smoothquant=alpha)``)."""

    alpha: float = 0.5

    order = 20

    def __post_init__(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            raise ValueError(f"SmoothQuant.alpha (migration strength) must be in [0, 1]; got {a!r}")

    def before_block(self, block: BlockState) -> None:
        fold_smoothquant_scales(block, self.alpha)

    def flat(self) -> dict[str, Any]:
        return {"smoothquant": self.alpha}

    @classmethod
    def from_flat(cls, cal: CalibrationConfig) -> SmoothQuant | None:
        return None if cal.smoothquant is None else cls(cal.smoothquant)


def fold_smoothquant_scales(block: BlockState, alpha: float) -> None:
    """Fold SmoothQuant scales into every verified fold group of the block whose consumers are
    all calibrated; record the groups (with their activation statistics, which LET starts from)
    and collect the layers' statistics again on the scaled inputs."""
    calibrated = {r.rel for r in block.calibrated}
    if not calibrated:
        return
    mod = block.block
    groups = find_fold_groups(mod, block.call_first, calibrated)
    scales = [
        smoothquant_scales(block.records[g.consumers[0]].stats.absmax, [mod.get_submodule(c).weight for c in g.consumers], alpha)
        for g in groups
    ]
    groups = verify_folds(mod, groups, block.call_first, scales, [None] * len(groups))
    block.folded = len(groups)
    if groups:
        block.collect_stats()
        for g in groups:
            st = block.records[g.consumers[0]].stats
            g.act_absmax, g.act_mean = st.absmax, (st.amax + st.amin) / 2
    block.fold_groups = groups
