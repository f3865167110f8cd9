"""Utilities for tests and benchmarks.

:func:`make_outlier_model` turns a small, well-behaved causal LM into a stress case for activation
quantization: large LLMs (from about 6.7B parameters on, Dettmers et al., LLM.int8(), 2022; see
also SmoothQuant, Xiao et al., 2023) carry a few hidden channels whose activations are tens of
times larger than the rest, always in the same channels. Per-tensor and per-token activation
scales are then set by those channels and the other channels lose most of their resolution. Tiny
models do not show this, so the transform plants such channels without changing what the model
computes. :func:`outlier_ratio` measures it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["make_outlier_model", "outlier_ratio"]

# consumers of each norm's output, per decoder-layer style: separate projections or fused (Phi-3)
_ATTN_INPUTS = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))
_MLP_INPUTS = (("gate_proj", "up_proj"), ("gate_up_proj",))

_EXPECTED = (
    "a Llama/Mistral/Qwen-style causal LM: decoder layers under model.model.layers, each with "
    "input_layernorm -> self_attn.{q,k,v}_proj and post_attention_layernorm -> mlp.{gate,up}_proj "
    "(nn.Linear, not yet quantized), the norms RMSNorm-like (output = normalized input * weight) with "
    "a 1-D 'weight' of the hidden size"
)


def _fail(problem: str) -> ValueError:
    return ValueError(f"make_outlier_model: {problem}; expected {_EXPECTED}")


def _consumers(
    parent: nn.Module | None, options: tuple[tuple[str, ...], ...], where: str
) -> list[tuple[str, nn.Linear]]:
    if parent is None:
        raise _fail(f"{where} is missing")
    for names in options:
        if all(hasattr(parent, n) for n in names):
            found = [(n, getattr(parent, n)) for n in names]
            for n, mod in found:
                if type(mod) is not nn.Linear:
                    raise _fail(
                        f"{where}.{n} is a {type(mod).__name__}, not an nn.Linear "
                        "(apply make_outlier_model before quantizing)"
                    )
            return found
    raise _fail(f"{where} has none of " + " or ".join("{" + ", ".join(o) + "}" for o in options))


def _plan(model: nn.Module) -> list[tuple[str, nn.Module, list[tuple[str, nn.Linear]]]]:
    """(norm name, norm, [(linear name, linear)]) for every norm to rescale; raises if the model
    does not have the expected structure."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or len(layers) == 0:
        raise _fail(f"{type(model).__name__} has no non-empty model.model.layers")
    plan = []
    hidden = None
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}"
        if hasattr(layer, "pre_feedforward_layernorm") or hasattr(layer, "post_feedforward_layernorm"):
            # Gemma-2/3 sandwich norms: post_attention_layernorm acts on the attention output there
            raise _fail(f"{prefix} ({type(layer).__name__}) has sandwich norms (Gemma-2/3 style)")
        pairs = (
            ("input_layernorm", "self_attn", _ATTN_INPUTS),
            ("post_attention_layernorm", "mlp", _MLP_INPUTS),
        )
        for norm_attr, block_attr, options in pairs:
            norm = getattr(layer, norm_attr, None)
            if norm is None:
                raise _fail(f"{prefix}.{norm_attr} is missing")
            if "gemma" in type(norm).__name__.lower():
                raise _fail(f"{prefix}.{norm_attr} is a {type(norm).__name__}, which scales by (1 + weight)")
            weight = getattr(norm, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
                raise _fail(f"{prefix}.{norm_attr} ({type(norm).__name__}) has no 1-D 'weight' parameter")
            hidden = hidden or weight.numel()
            if weight.numel() != hidden:
                raise _fail(f"{prefix}.{norm_attr} has {weight.numel()} channels, other norms {hidden}")
            consumers = _consumers(getattr(layer, block_attr, None), options, f"{prefix}.{block_attr}")
            for n, lin in consumers:
                if lin.in_features != hidden:
                    raise _fail(f"{prefix}.{block_attr}.{n} has in_features={lin.in_features}, not {hidden}")
            plan.append((f"{prefix}.{norm_attr}", norm, [(f"{prefix}.{block_attr}.{n}", lin) for n, lin in consumers]))
    return plan


def make_outlier_model(
    model: nn.Module,
    n_channels: int = 4,
    factor: float = 30.0,
    seed: int = 0,
    *,
    channels: Sequence[int] | None = None,
) -> list[str]:
    """Plant activation outlier channels in a causal LM without changing its function.

    For every pre-attention and pre-MLP RMSNorm (``input_layernorm``, ``post_attention_layernorm``)
    the entries of its ``weight`` for ``n_channels`` hidden channels are multiplied by ``factor``
    and the matching input columns of every linear that reads the norm's output
    (``q/k/v_proj``, ``gate/up_proj``, or fused ``qkv_proj``/``gate_up_proj``) are divided by
    ``factor``. The logits are unchanged up to float rounding, but the activations entering those
    linears now have ``n_channels`` channels about ``factor`` times larger than the rest, so
    per-tensor and per-token activation quantization degrade as in large LLMs.

    The channels are drawn at random (``torch.Generator`` seeded with ``seed``) and are the same
    for every layer, as real outlier channels sit in fixed hidden dimensions; pass ``channels`` to
    choose them explicitly. The model is modified in place (under ``torch.no_grad()``), and must
    be a float model that has not been quantized yet.

    Returns:
        the names of the modified norms, e.g. ``["model.layers.0.input_layernorm", ...]``.

    Raises:
        ValueError: the model does not have that structure (the message says what was expected),
            or ``n_channels``/``factor``/``channels`` are invalid.
    """
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"factor must be a finite positive number, got {factor!r}")
    plan = _plan(model)
    hidden = plan[0][1].weight.numel()
    if channels is None:
        if isinstance(n_channels, bool) or not isinstance(n_channels, int) or not 1 <= n_channels <= hidden:
            raise ValueError(f"n_channels must be an integer in [1, {hidden}] (the hidden size), got {n_channels!r}")
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(hidden, generator=gen)[:n_channels].sort().values
    else:
        chosen = torch.as_tensor(list(channels), dtype=torch.long)
        if chosen.numel() == 0 or chosen.unique().numel() != chosen.numel():
            raise ValueError(f"channels must be distinct hidden-channel indices, got {list(channels)!r}")
        if int(chosen.min()) < 0 or int(chosen.max()) >= hidden:
            raise ValueError(f"channels must lie in [0, {hidden}), got {list(channels)!r}")
    with torch.no_grad():
        for _, norm, consumers in plan:
            idx = chosen.to(norm.weight.device)
            norm.weight[idx] *= factor
            if isinstance(getattr(norm, "bias", None), torch.Tensor):  # a LayerNorm: scale its shift too
                norm.bias[idx] *= factor
            for _, lin in consumers:
                lin.weight[:, idx.to(lin.weight.device)] /= factor
    return [name for name, _, _ in plan]


def outlier_ratio(x: torch.Tensor) -> float:
    """Max |x| over the median of the per-channel maxima (channels = last dim): about 1-3 for
    well-behaved activations, tens to hundreds with outlier channels."""
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError("outlier_ratio needs a non-empty tensor with a channel (last) dimension")
    per_channel = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
    median = float(per_channel.median())
    top = float(per_channel.max())
    if median == 0.0:
        return math.inf if top > 0 else 1.0
    return top / median
