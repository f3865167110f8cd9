"""What a quantized model costs: bits per weight and bytes, per layer and in total."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .qlinear import QuantLinear

__all__ = ["SizeReport", "model_size_report"]


@dataclass(frozen=True)
class SizeReport:
    quantized_weights: int  # number of weights stored quantized
    quantized_bits: int  # exact bits those take, metadata included
    float_bytes: int  # bytes of every other parameter/buffer (embeddings, norms, lm_head, biases)

    @property
    def bits_per_weight(self) -> float:
        """Average over the quantized layers (metadata included)."""
        return self.quantized_bits / self.quantized_weights if self.quantized_weights else float("nan")

    @property
    def total_bytes(self) -> int:
        return (self.quantized_bits + 7) // 8 + self.float_bytes


def model_size_report(model: nn.Module) -> SizeReport:
    qweights = qbits = 0
    counted: set[int] = set()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            n = module.in_features * module.out_features
            qweights += n
            for t in module.quantized_tensors().values():
                counted.add(id(t))
                qbits += t.numel() * t.element_size() * 8
    float_bytes = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in counted or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        float_bytes += t.numel() * t.element_size()
    return SizeReport(qweights, qbits, float_bytes)
