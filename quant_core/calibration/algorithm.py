"""A plugin's calibration algorithm as a calibration modifier.

A plugin registers a function ``(weight, ctx) -> tensors`` (hook
``piecewise_quant_register_calibration_algorithms``, docs/plugins.md); ``CalibrationConfig(
algorithm=name)`` (or ``Algorithm(name)`` in a modifier list) runs it on every calibrated layer, in
place of the format's encoding of the fitted group parameters, with a :class:`LayerCalibration`
describing the layer. GPTQ and breakpoint refinement are such steps themselves: they do not combine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from .modifier import Modifier

if TYPE_CHECKING:
    from ..config import CalibrationConfig, LayerSpec
    from .state import BlockState, LayerRecord, RunState

__all__ = ["Algorithm", "LayerCalibration"]


@dataclass(frozen=True)
class LayerCalibration:
    """What a plugin calibration algorithm knows about one layer (see ``CalibrationConfig.algorithm``).

    Attributes:
        name: the layer's full module name.
        layer: its :class:`~piecewise_quant.config.LayerSpec` (scheme, shape, resolved group size).
        fmt: its weight format; ``fmt.fake_quantize`` / ``fmt.encode`` work with ``params``.
        params: per-group parameters already chosen (activation-aware fit, or LWC's learned clip),
            in the format's ``fit`` layout; a good starting point or a baseline.
        hessian: ``2 X^T X / n`` over the layer's ``n`` calibration input rows ``X`` (float32,
            ``(in, in)``): the squared output error of a weight change ``D`` is ``tr(D H D^T) / 2``.
        importance: mean squared input per column (float32, ``(in,)``), the diagonal of ``H / 2``.
        tokens: how many input rows the statistics saw.
    """

    name: str
    layer: LayerSpec
    fmt: Any
    params: dict[str, torch.Tensor]
    hessian: torch.Tensor
    importance: torch.Tensor
    tokens: int


@dataclass(frozen=True)
class Algorithm(Modifier):
    """Run the plugin calibration algorithm registered as ``name`` on every calibrated layer
    (flat form: ``CalibrationConfig(algorithm=name)``)."""

    name: str

    order = 70
    needs_hessian = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Algorithm.name must be the name of a registered calibration algorithm; got {self.name!r}")

    def setup(self, run: RunState) -> None:
        from ..registry import get_calibration_algorithm

        run.cache[self] = get_calibration_algorithm(self.name)  # an unknown name fails before any work

    def process_layer(self, block: BlockState, record: LayerRecord) -> None:
        if record.tensors is not None:
            return
        st = record.stats
        ctx = LayerCalibration(record.name, record.layer, record.fmt, record.params, st.hessian(), st.importance(), st.tokens)
        record.tensors = _run_algorithm(self.name, block.run.cache[self], block.linear(record).weight.detach(), ctx)
        record.tensors_by, record.tensors_from = self.name, f"calibration algorithm {self.name!r}"

    def flat(self) -> dict[str, Any]:
        return {"algorithm": self.name}

    @classmethod
    def from_flat(cls, cal: CalibrationConfig) -> Algorithm | None:
        return None if cal.algorithm is None else cls(cal.algorithm)


def _run_algorithm(name: str, algorithm: Callable, weight: torch.Tensor, ctx: LayerCalibration) -> dict[str, torch.Tensor]:
    """Call a plugin algorithm on a copy of the weight (it cannot corrupt the model) and check
    that it returned finite tensors by name; shapes and dtypes are checked on loading."""
    with torch.no_grad():
        tensors = algorithm(weight.clone(), ctx)
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise TypeError(
            f"calibration algorithm {name!r} must return a dict of tensor name -> Tensor for layer {ctx.name!r}, "
            f"got {type(tensors).__name__}"
        )
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"calibration algorithm {name!r} returned NaN or Inf in {bad} for layer {ctx.name!r}")
    return tensors
