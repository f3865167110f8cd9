"""Put a model back exactly as it was when calibration fails half-way.

Calibration changes a model in place: it swaps ``nn.Linear`` layers for ``QuantLinear`` block by
block, folds SmoothQuant/LET scales into norms and Linear weights, and GPTQ rewrites weights
before they are encoded. An exception (a ``KeyboardInterrupt`` included) half-way would leave a
model that runs and is wrong. :class:`ModelUndo` records, before any change, every module's
children, parameters and buffers (the objects, and a copy of the values of those that may be
changed in place), and :meth:`ModelUndo.restore` puts all of it back.

The copies cost one float copy of the calibrated blocks while calibration runs (they are freed
when it ends).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ModelUndo"]


class ModelUndo:
    def __init__(self) -> None:
        self._saved: dict[
            int, tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any], set[str], dict[str, torch.Tensor]]
        ] = {}

    @torch.no_grad()
    def record(self, root: nn.Module, copy_values: bool) -> None:
        """Record ``root`` and all its submodules; ``copy_values`` also copies their tensors' values
        (needed where calibration changes tensors in place)."""
        for module in root.modules():
            if id(module) in self._saved:
                continue
            copies: dict[str, torch.Tensor] = {}
            if copy_values:
                for kind, tensors in (("p", module._parameters), ("b", module._buffers)):
                    for name, t in tensors.items():
                        if t is not None and not t.is_meta:
                            copies[f"{kind}:{name}"] = t.detach().clone()
            self._saved[id(module)] = (
                module, dict(module._modules), dict(module._parameters), dict(module._buffers),
                set(module._non_persistent_buffers_set), copies,
            )

    def record_children(self, module: nn.Module) -> None:
        """Record only which children ``module`` has (for a parent whose child gets swapped)."""
        if id(module) not in self._saved:
            self._saved[id(module)] = (
                module, dict(module._modules), dict(module._parameters), dict(module._buffers),
                set(module._non_persistent_buffers_set), {},
            )

    @torch.no_grad()
    def restore(self) -> None:
        for module, children, params, buffers, non_persistent, copies in self._saved.values():
            module._modules.clear()
            module._modules.update(children)
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
            module._non_persistent_buffers_set.clear()
            module._non_persistent_buffers_set.update(non_persistent)
            for key, value in copies.items():
                kind, name = key.split(":", 1)
                t = (params if kind == "p" else buffers)[name]
                if t.shape != value.shape:
                    t.data = value
                else:
                    t.data.copy_(value)
        self._saved.clear()
