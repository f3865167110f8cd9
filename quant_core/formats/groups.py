"""Helpers shared by the grid formats: views of a weight as quantization groups."""

from __future__ import annotations

import torch

from ..config import LayerSpec
from ..kernels.reference import round_half_even

__all__ = ["group_view", "importance_view", "observer_for", "round_half_even"]


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


def importance_view(column_importance: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    """Per-input-column importance ``(in_features,)`` laid out like :func:`group_view`'s groups."""
    imp = column_importance.detach().to(torch.float32).reshape(-1)
    if imp.numel() != layer.in_features:
        raise ValueError(f"layer {layer.name!r}: importance has {imp.numel()} entries, expected in_features={layer.in_features}")
    if layer.group_size == -1:
        return imp.repeat(layer.out_features).reshape(1, -1)
    return imp.reshape(-1, layer.group_size).repeat(layer.out_features, 1)


def observer_for(name: str):
    from ..registry import get_observer

    return get_observer(name)

