"""``quantize(model, config)``: replace a model's Linear layers by ``QuantLinear`` in place, no data
needed; and the planning step the framework integrations share."""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import LayerSpec, PiecewiseQuantConfig, QuantSpec
from .qlinear import QuantLinear
from .registry import get_format

__all__ = [
    "quantize", "plan_layers", "layer_spec_for", "calibrate_activation_scales", "quantized_layers", "dequantize_layers",
]

logger = logging.getLogger(__name__)


def layer_spec_for(name: str, spec: QuantSpec, in_features: int, out_features: int) -> LayerSpec:
    """Bind ``spec`` to a layer, resolving the group size and checking the format accepts it."""
    fmt = get_format(spec.grid)
    try:
        fmt.validate(spec)
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc}") from None
    gs = spec.group_size
    if gs == "channel":
        group = in_features
    elif gs == "tensor":
        group = -1
    else:
        group = int(gs)
        if in_features % group:
            raise ValueError(
                f"layer {name!r}: group_size={group} does not divide its in_features={in_features}; "
                f"choose a divisor of {in_features}, 'channel', or override this layer "
                f"(overrides={{{name!r}: {{'group_size': 'channel'}}}}) or skip it (modules_to_not_convert)"
            )
    return LayerSpec(name=name, spec=spec, in_features=in_features, out_features=out_features, group_size=group)


def _output_embedding_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return set()
    try:
        emb = get()
    except Exception:  # models without an LM head raise NotImplementedError and the like
        return set()
    return {n for n, m in model.named_modules() if emb is not None and m is emb}


def plan_layers(model: nn.Module, config: PiecewiseQuantConfig) -> dict[str, LayerSpec]:
    """Which Linear layers get quantized and how; raises on a layer the config cannot handle."""
    if not isinstance(config, PiecewiseQuantConfig):
        raise TypeError(f"config must be a PiecewiseQuantConfig, got {type(config).__name__}")
    skip_outputs = _output_embedding_names(model) if config.modules_to_not_convert is None else set()
    inside_mha = {
        f"{n}.{c}" if n else c
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for c, _ in m.named_children()
    }
    plan: dict[str, LayerSpec] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, QuantLinear):
            if name and not isinstance(module, (nn.Linear, QuantLinear)) and _explicitly_targeted(config, name):
                raise ValueError(
                    f"module {name!r} is a {type(module).__name__}; only torch.nn.Linear layers can be quantized "
                    "(remove it from overrides)"
                )
            continue
        if name in skip_outputs or name in inside_mha:
            continue
        spec = config.spec_for(name)
        if spec is None:
            continue
        plan[name] = layer_spec_for(name, spec, module.in_features, module.out_features)
    return plan


def _explicitly_targeted(config: PiecewiseQuantConfig, name: str) -> bool:
    return any(p == name for p in config.overrides)



def quantize(model: nn.Module, config: PiecewiseQuantConfig | None = None, progress: bool = True) -> nn.Module:
    """Quantize every eligible ``nn.Linear`` of ``model`` in place (data-free) and return ``model``.

    Layers matched by ``config.modules_to_not_convert`` (default: ``lm_head`` and the output
    embeddings) stay in float. Raises ``ValueError`` naming the layer when its shape does not fit
    the config, before anything is changed.
    """
    config = config or PiecewiseQuantConfig()
    plan = plan_layers(model, config)
    if not plan:
        conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
        hint = (
            f"; its {len(conv1d)} transformers Conv1D layers (GPT-2 style, e.g. {conv1d[0]!r}) are not supported yet"
            if conv1d
            else ""
        )
        raise ValueError(
            "found no nn.Linear layer to quantize (all were skipped by modules_to_not_convert, or the model has none)"
            + hint
        )
    for name, layer in tqdm(plan.items(), desc="quantizing", unit="layer", disable=not progress):
        linear = model.get_submodule(name)
        q = QuantLinear.from_linear(linear, layer, get_format(layer.spec.grid))
        model.set_submodule(name, q)
    model.piecewise_quant_config = config
    _record_in_host_config(model, config)
    return model


def _record_in_host_config(model: nn.Module, config: PiecewiseQuantConfig) -> None:
    """A model with a Hugging Face style ``config`` (transformers, diffusers) gets the plan as
    ``config.quantization_config``, so its own ``save_pretrained`` writes a checkpoint that reloads
    quantized instead of silently re-initialising the layers."""
    host = getattr(model, "config", None)
    if host is not None and callable(getattr(host, "to_dict", None)):
        host.quantization_config = config.to_dict()


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def dequantize_layers(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``QuantLinear`` of ``model`` (in place) by its dequantized ``nn.Linear``
    (:meth:`QuantLinear.to_linear`, in ``dtype`` or each layer's compute dtype) and forget the
    quantization plan; returns ``model``. What the hosts' ``model.dequantize()`` runs."""
    for name, layer in quantized_layers(model).items():
        model.set_submodule(name, layer.to_linear(dtype))
    if hasattr(model, "piecewise_quant_config"):
        del model.piecewise_quant_config
    return model


@torch.no_grad()
def calibrate_activation_scales(model: nn.Module, batches: Iterable) -> int:
    """Set static per-tensor activation scales from calibration ``batches`` (tensors of input ids,
    or dicts of model inputs). Returns the number of layers calibrated."""
    layers = [m for m in quantized_layers(model).values() if m.act_scale is not None]
    if not layers:
        return 0
    for m in layers:
        m.start_observing()
    seen = 0
    try:
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            else:
                model(batch)
            seen += 1
    finally:
        if seen == 0:
            for m in layers:
                m._observing = False
    if seen == 0:
        raise ValueError("calibrate_activation_scales got no calibration batches")
    for m in layers:
        m.finish_observing()
    return len(layers)
