"""The on-the-fly quantize op transformers runs on each planned layer's float weight while loading.

transformers (v5) routes every checkpoint tensor for which ``HfQuantizer.param_needs_quantization``
is true through ``HfQuantizer.get_quantize_ops().convert(...)``. Ours receives one float
``<layer>.weight``, quantizes it with the layer's format and swaps the (still float, usually meta)
``nn.Linear`` for a :class:`~piecewise_quant.QuantLinear` holding the packed tensors. It returns no
tensor to set (the module swap already placed them) and discards ``<layer>.weight`` from the
missing keys, so nothing is random-initialised afterwards.

Imported lazily (only when a model is quantized on load): ``transformers.core_model_loading`` must
not be imported from inside the autoload hook.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.core_model_loading import ConversionOps

__all__ = ["PiecewiseQuantizeOp"]


class PiecewiseQuantizeOp(ConversionOps):
    def __init__(self, hf_quantizer: Any) -> None:
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(
        self,
        input_dict: dict[str, Any],
        full_layer_name: str | None = None,
        model: torch.nn.Module | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        if model is None:
            raise RuntimeError("piecewise quantize op: transformers did not pass the model being loaded")
        out: dict[str, torch.Tensor] = {}
        for key, value in input_dict.items():
            weight = value[0] if isinstance(value, (list, tuple)) else value
            module_name, _, tensor_name = key.rpartition(".")
            if tensor_name != "weight" or not self.hf_quantizer.quantize_layer_on_load(model, module_name, weight):
                out[key] = weight  # not ours: let transformers set it as usual
                continue
            if missing_keys is not None:
                missing_keys.discard(key)
        return out
