"""Helpers shared by the grid formats: views of a weight as quantization groups."""

from __future__ import annotations

import torch

from ..config import LayerSpec
from ..kernels.reference import round_half_even

__all__ = ["group_view", "observer_for", "round_half_even"]


def group_view(weight: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    """``(n_groups_total, group)`` view: rows of ``group_size`` consecutive input weights, or one
    row holding the whole tensor when ``group_size == -1``."""
    if weight.shape != (layer.out_features, layer.in_features):
        raise ValueError(
            f"layer {layer.name!r}: weight has shape {tuple(weight.shape)}, expected {(layer.out_features, layer.in_features)}"
        )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"layer {layer.name!r}: the weight contains NaN or Inf; quantizing it would corrupt the model")
    if layer.group_size == -1:
        return weight.reshape(1, -1)
    return weight.reshape(-1, layer.group_size)


def observer_for(name: str):
    from ..registry import get_observer

    return get_observer(name)

