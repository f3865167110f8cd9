"""What a quantized model costs: bits per weight and bytes, per layer and in total, including the
weight matrices that stayed in float (skipped layers, and layer types that cannot be quantized)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .qlinear import QuantLinear

__all__ = ["SizeReport", "model_size_report"]


@dataclass(frozen=True)
class SizeReport:
    """Storage of a model.

    Attributes:
        quantized_weights: number of weights stored quantized.
        quantized_bits: exact bits those take, metadata included.
        float_bytes: bytes of every other parameter/buffer (embeddings, norms, lm_head, biases...).
        float_matrix_weights: weights of the 2-D-or-more parameters kept in float, embeddings
            excluded: Linear layers skipped by the config and layer types that cannot be quantized.
        float_matrix_bits: the bits those take.
        unsupported: ``(name, weights)`` of each float weight matrix whose layer type piecewise-quant
            cannot quantize (fused 3-D MoE experts, convolutions, ``Conv1D``...), largest first.
    """

    quantized_weights: int
    quantized_bits: int
    float_bytes: int
    float_matrix_weights: int = 0
    float_matrix_bits: int = 0
    unsupported: tuple[tuple[str, int], ...] = ()

    @property
    def bits_per_weight(self) -> float:
        """Average over the quantized layers (metadata included)."""
        return self.quantized_bits / self.quantized_weights if self.quantized_weights else float("nan")

    @property
    def overall_bits_per_weight(self) -> float:
        """Average over every weight matrix of the model except embeddings, float ones included:
        what the weights really cost when some layers could not be (or were not) quantized."""
        n = self.quantized_weights + self.float_matrix_weights
        return (self.quantized_bits + self.float_matrix_bits) / n if n else float("nan")

    @property
    def total_bytes(self) -> int:
        return (self.quantized_bits + 7) // 8 + self.float_bytes


def model_size_report(model: nn.Module) -> SizeReport:
    qweights = qbits = 0
    counted: set[int] = set()
    embeddings: set[int] = set()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            n = module.in_features * module.out_features
            qweights += n
            stored = list(module.quantized_tensors().values())
            if module.has_balance:  # the per-channel scale is part of what the weight costs
                stored.append(module.balance_scale)
            for t in stored:
                counted.add(id(t))
                qbits += t.numel() * t.element_size() * 8
        elif isinstance(module, nn.Embedding):
            embeddings.add(id(module.weight))
    float_bytes = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in counted or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        float_bytes += t.numel() * t.element_size()
    fm_weights = fm_bits = 0
    unsupported: list[tuple[str, int]] = []
    seen_params: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module._parameters.items():
            if p is None or id(p) in seen_params or id(p) in embeddings or p.dim() < 2:
                continue
            seen_params.add(id(p))
            fm_weights += p.numel()
            fm_bits += p.numel() * p.element_size() * 8
            if not isinstance(module, nn.Linear):
                unsupported.append((f"{mod_name}.{p_name}" if mod_name else p_name, p.numel()))
    unsupported.sort(key=lambda item: -item[1])
    return SizeReport(qweights, qbits, float_bytes, fm_weights, fm_bits, tuple(unsupported))
