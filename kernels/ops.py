"""``torch.library`` ops of piecewise-quant: ``piecewise_quant::linear``, ``::dequantize`` and
``::quantize_activation``.

Each op has a fake (meta) implementation so it traces under ``torch.compile``, and ``linear`` has
an autograd formula (gradients flow to the input and bias; quantized weights are frozen; activation
quantization passes gradients straight through) so LoRA-style training works on top of it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import reference
from .backends import select_backend

__all__ = ["linear", "dequantize", "quantize_activation", "WeightOperand", "ActOperand", "NO_ACT",
           "quantized_linear", "quantize_input"]


class WeightOperand(NamedTuple):
    """A stored weight as the kernels see it: packed tensors plus how to read them."""

    qweight: torch.Tensor
    scales: torch.Tensor
    aux: Optional[torch.Tensor]  # zero points (uniform asymmetric) or breakpoint ids (piecewise)
    format: str  # uniform_sym | uniform_asym | piecewise | fp8_e4m3
    bits: int
    group_size: int  # resolved: in_features for per-channel, -1 for per-tensor
    in_features: int


class ActOperand(NamedTuple):
    """How the op quantizes its input: ``format`` ``none`` | ``int8`` | ``int4`` | ``fp8_e4m3``,
    ``mode`` ``dynamic_per_token`` | ``static_per_tensor`` (with ``scale``). Still a 5-tuple
    ``(scale, format, mode, clip_ratio, topk)`` for plugin formats' ``linear``."""

    scale: Optional[torch.Tensor] = None
    format: str = "none"
    mode: str = "dynamic_per_token"
    clip_ratio: float = 1.0
    topk: int = 0


NO_ACT = ActOperand()


@torch.library.custom_op("piecewise_quant::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    aux: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    act_scale: Optional[torch.Tensor],
    weight_format: str,
    bits: int,
    group_size: int,
    in_features: int,
    act_format: str,
    act_mode: str,
    act_clip_ratio: float,
    act_topk: int,
) -> torch.Tensor:
    args = (x, qweight, scales, aux, bias, act_scale, weight_format, bits, group_size, in_features,
            act_format, act_mode, act_clip_ratio, act_topk)
    backend = select_backend(x.device.type, weight_format, bits, group_size, x.dtype, act_format)
    if backend is not None:
        return backend.linear(*args)
    return reference.linear(*args)


@linear.register_fake
def _linear_fake(x, qweight, scales, aux, bias, act_scale, weight_format, bits, group_size, in_features,
                 act_format, act_mode, act_clip_ratio, act_topk):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, qweight, scales, aux, bias, _act_scale, weight_format, bits, group_size, in_features = inputs[:10]
    ctx.save_for_backward(qweight, scales, aux)
    ctx.meta = (weight_format, bits, group_size, in_features, x.dtype, bias is not None)


def _linear_backward(ctx, grad):
    qweight, scales, aux = ctx.saved_tensors
    weight_format, bits, group_size, in_features, dtype, has_bias = ctx.meta
    w = dequantize(qweight, scales, aux, weight_format, bits, group_size, in_features, grad.dtype)
    grad_x = grad @ w if ctx.needs_input_grad[0] else None
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias and ctx.needs_input_grad[4] else None
    return (grad_x, None, None, None, grad_b) + (None,) * 9


linear.register_autograd(_linear_backward, setup_context=_linear_setup)


@torch.library.custom_op("piecewise_quant::dequantize", mutates_args=())
def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    aux: Optional[torch.Tensor],
    weight_format: str,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return reference.dequantize(qweight, scales, aux, weight_format, bits, group_size, in_features, dtype)


@dequantize.register_fake
def _dequantize_fake(qweight, scales, aux, weight_format, bits, group_size, in_features, dtype):
    return qweight.new_empty((qweight.shape[0], in_features), dtype=dtype)


@torch.library.custom_op("piecewise_quant::quantize_activation", mutates_args=())
def quantize_activation(
    x: torch.Tensor,
    act_format: str,
    act_mode: str,
    act_scale: Optional[torch.Tensor],
    clip_ratio: float,
    topk: int,
) -> torch.Tensor:
    return reference.quantize_activation(x, act_format, act_mode, act_scale, clip_ratio, topk)


@quantize_activation.register_fake
def _quantize_activation_fake(x, act_format, act_mode, act_scale, clip_ratio, topk):
    return torch.empty_like(x)


quantize_activation.register_autograd(
    lambda ctx, grad: (grad, None, None, None, None, None), setup_context=lambda ctx, inputs, output: None
)


def quantized_linear(x: torch.Tensor, weight: WeightOperand, bias: Optional[torch.Tensor],
                     act: ActOperand = NO_ACT) -> torch.Tensor:
    """``y = q(x) W^T + b`` through ``piecewise_quant::linear``; the one place its arguments are
    spelled out above the op."""
    return linear(x, weight.qweight, weight.scales, weight.aux, bias, act.scale, weight.format, weight.bits,
                  weight.group_size, weight.in_features, act.format, act.mode, float(act.clip_ratio), int(act.topk))


def quantize_input(x: torch.Tensor, act: ActOperand) -> torch.Tensor:
    """Quantize-dequantize ``x`` as ``act`` says (identity for ``NO_ACT``)."""
    if act.format == "none":
        return x
    return quantize_activation(x, act.format, act.mode, act.scale, float(act.clip_ratio), int(act.topk))
