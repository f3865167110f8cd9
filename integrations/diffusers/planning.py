"""Which layers of a denoiser get quantized and how, and swapping them in.

Shared by the pipeline API (:func:`~.pipeline.enable_quant`) and the load-time quantizer, so both
build exactly the same :class:`~.layers.DiffusionQuantLinear` layers from one config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from piecewise_quant.config import LayerSpec, PiecewiseQuantConfig
from piecewise_quant.quantization import plan_layers
from piecewise_quant.registry import get_format

from .config import DiffusionOptions
from .layers import DiffusionQuantLinear

__all__ = ["plan_component", "layer_kwargs", "quantize_layers", "static_layers", "has_static_activations"]


def _is_static(layer: LayerSpec) -> bool:
    return layer.spec.act_bits is not None and layer.spec.act_mode == "static_per_tensor"


def _is_dynamic(layer: LayerSpec) -> bool:
    return layer.spec.act_bits is not None and layer.spec.act_mode != "static_per_tensor"


def plan_component(model: nn.Module, core: PiecewiseQuantConfig, diffusion: DiffusionOptions,
                   component: str = "model") -> dict[str, LayerSpec]:
    """The layer plan of one pipeline component; raises a ``ValueError`` naming the problem when the
    config would quantize nothing or its diffusion options fit no layer."""
    try:
        plan = plan_layers(model, core)
    except ValueError as exc:
        raise ValueError(f"component {component!r}: {exc}") from None
    if not plan:
        n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
        why = (
            f"all {n_linear} of its nn.Linear layers are skipped by modules_to_not_convert/overrides"
            if n_linear
            else "it has no nn.Linear layer"
        )
        raise ValueError(
            f"the config would quantize nothing in component {component!r} ({type(model).__name__}): {why}; "
            "loosen modules_to_not_convert or the overrides, or leave this component out"
        )
    if diffusion.act_group_size is not None:
        dyn = [n for n, lay in plan.items() if _is_dynamic(lay)]
        if not dyn:
            raise ValueError(
                f"component {component!r}: act_group_size={diffusion.act_group_size} applies to layers with dynamic "
                "activation quantization, and this config has none; set act_bits=8 (act_mode='dynamic_per_token')"
            )
        bad = [n for n in dyn if plan[n].in_features % diffusion.act_group_size]
        if bad:
            raise ValueError(
                f"component {component!r}: act_group_size={diffusion.act_group_size} does not divide the in_features of "
                f"layer {bad[0]!r} ({plan[bad[0]].in_features})" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                + "; choose a common divisor, or give those layers act_bits=None through overrides"
            )
    if diffusion.act_scales == "per_timestep" and not any(_is_static(lay) for lay in plan.values()):
        raise ValueError(
            f"component {component!r}: act_scales='per_timestep' applies to layers with static activation scales, and "
            "this config has none; set act_bits=8, act_mode='static_per_tensor'"
        )
    return plan


def layer_kwargs(layer: LayerSpec, diffusion: DiffusionOptions) -> dict[str, Any]:
    per_t = diffusion.act_scales == "per_timestep" and _is_static(layer)
    return {
        "act_group_size": diffusion.act_group_size if _is_dynamic(layer) else None,
        "per_timestep": per_t,
        "n_timesteps": len(diffusion.timesteps) if per_t else 0,
    }


@torch.no_grad()
def quantize_layers(
    model: nn.Module, plan: dict[str, LayerSpec], diffusion: DiffusionOptions, keep: dict[str, nn.Module] | None = None,
    progress: bool = False, desc: str = "quantizing",
) -> None:
    """Replace each planned ``nn.Linear`` by a :class:`DiffusionQuantLinear` (data-free weights);
    the replaced modules go to ``keep`` (moved to the CPU) when given."""
    from tqdm.auto import tqdm

    for name, layer in tqdm(plan.items(), desc=desc, unit="layer", disable=not progress):
        linear = model.get_submodule(name)
        q = DiffusionQuantLinear.build(layer, get_format(layer.spec.grid), linear, **layer_kwargs(layer, diffusion))
        model.set_submodule(name, q)
        if keep is not None:
            keep[name] = linear.to("cpu")


def static_layers(model: nn.Module) -> dict[str, DiffusionQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DiffusionQuantLinear) and m.act_scale is not None}


def has_static_activations(plan: dict[str, LayerSpec]) -> bool:
    return any(_is_static(lay) for lay in plan.values())


def _finish_registration() -> None:
    from . import _finish_pending_registration

    _finish_pending_registration()


_finish_registration()
