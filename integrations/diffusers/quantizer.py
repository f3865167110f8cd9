"""``PiecewiseDiffusersQuantizer``: the diffusers quantizer for ``quant_method="piecewise"``.

diffusers' quantizer contract is per tensor (``check_if_quantized_param`` /
``create_quantized_param``), called from ``ModelMixin.from_pretrained`` while the state dict is
loaded into a meta model. Two paths:

* **Quantize on load** (a float checkpoint plus ``quantization_config=PiecewiseQuantConfig(...)``):
  the plan is computed on the meta model (a bad config fails before any weight is read); each
  planned layer's float ``weight`` is quantized as it arrives and the ``nn.Linear`` is swapped for a
  :class:`~.layers.DiffusionQuantLinear`, so only one float weight is in memory at once. Static
  activation scales and calibration recipes need the pipeline to run, so they are refused here
  (use ``pipe.enable_quant``).
* **Pre-quantized** (a checkpoint whose ``config.json`` has ``quant_method: "piecewise"``): the
  planned layers become empty ``DiffusionQuantLinear`` on meta and their packed tensors are set by
  name from the untouched checkpoint tensors (diffusers casts floating tensors to ``torch_dtype``
  before handing them over; scales must keep their stored dtype). Shape or dtype mismatches and
  missing tensors raise :class:`CheckpointMismatchError` naming the tensor.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from torch import nn

from piecewise_quant.checkpoint import MAX_LISTED, CheckpointMismatchError  # noqa: F401 - importable from here
from piecewise_quant.config import LayerSpec, PiecewiseQuantConfig

from .._hf import (
    check_float_weight,
    check_known_grids,
    loaded_layer_problems,
    quantized_layer,
    raise_mismatch,
    split_param_name,
    swap_in_empty_layers,
    tensor_problems,
)
from .config import DiffusionOptions, PiecewiseDiffusersConfig

__all__ = ["PiecewiseDiffusersQuantizer", "CheckpointMismatchError"]

logger = logging.getLogger(__name__)


def _layer_tensors(layer: LayerSpec, module: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every packed/scale tensor a quantized layer loads by name: ``{name: (shape, dtype)}``."""
    from piecewise_quant.registry import get_format

    out = {t: (tuple(lay.shape), lay.dtype) for t, lay in get_format(layer.spec.grid).layout(layer).items()}
    if getattr(module, "act_scale", None) is not None:
        out["act_scale"] = ((), torch.float32)
    if getattr(module, "act_scales_t", None) is not None:
        out["act_scales_t"] = (tuple(module.act_scales_t.shape), torch.float32)
    if getattr(layer.rotation, "balance", False):
        out["balance_scale"] = ((layer.in_features,), torch.float16)
    if getattr(module, "bos_input", None) is not None:  # BOS-aware layers (see .bos)
        out["bos_input"] = ((layer.in_features,), torch.float32)
        out["bos_output"] = ((layer.out_features,), torch.float32)
    return out


def _loaded_layer_problems(name: str, layer: LayerSpec, module: nn.Module) -> list[str]:
    """What is wrong with one loaded ``DiffusionQuantLinear``; a loaded bias sets its compute dtype."""
    problems = tensor_problems(name, module, _layer_tensors(layer, module))
    if module.bias is not None and not module.bias.is_meta:
        module.compute_dtype = module.bias.dtype
    return problems


class PiecewiseDiffusersQuantizer(DiffusersQuantizer):
    """Quantizes diffusers models on load and loads piecewise checkpoints (see the module docstring)."""

    requires_calibration = False
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
        if not isinstance(quantization_config, PiecewiseDiffusersConfig):
            quantization_config = PiecewiseDiffusersConfig(core=quantization_config)
        super().__init__(quantization_config, **kwargs)
        self.plan: dict[str, LayerSpec] = {}

    @property
    def core_config(self) -> PiecewiseQuantConfig:
        return self.quantization_config.core

    @property
    def diffusion(self) -> DiffusionOptions:
        return self.quantization_config.diffusion

    # ---- environment ----------------------------------------------------------------------------

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in {str(v) for v in device_map.values()}:
            raise ValueError(
                "piecewise-quant does not support disk offloading in device_map; load on CPU/GPU (device_map=None)"
            )
        if self.pre_quantized:
            return
        if self.core_config.calibration is not None:
            raise ValueError(
                "a calibration recipe (PiecewiseQuantConfig(calibration=...)) needs the whole pipeline to produce "
                "calibration data; load the float pipeline and call pipe.enable_quant(config, calibration_prompts=[...])"
            )
        if self.diffusion.bos_aware:
            raise ValueError(
                "diffusion.bos_aware=True keeps token 0 of the text embeddings in float, which needs the text encoder's "
                "output from pipeline runs; load the float pipeline and call pipe.enable_quant(config, bos_aware=True, "
                "calibration_prompts=[...]), then save_pretrained (that checkpoint loads directly)"
            )
        if self.core_config.rotation is not None:
            raise ValueError(
                "a rotation (PiecewiseQuantConfig(rotation=...)) changes each float weight before it is quantized, and "
                "'balance' measures its scales on pipeline runs; load the float pipeline and call "
                "pipe.enable_quant(config, calibration_prompts=[...]), then save_pretrained (that checkpoint loads directly)"
            )

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def supports_parallel_loading(self) -> bool:
        return False  # layers are swapped while loading

    # ---- before loading ---------------------------------------------------------------------------

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from .layers import DiffusionQuantLinear
        from .planning import has_static_activations, layer_kwargs, plan_component

        core = self.core_config
        check_known_grids(model, core)
        self.plan = plan_component(model, core, self.diffusion, type(model).__name__)
        if not self.pre_quantized and has_static_activations(self.plan):
            static = [n for n, lay in self.plan.items() if lay.spec.act_mode == "static_per_tensor" and lay.spec.act_bits]
            raise ValueError(
                f"layer {static[0]!r} (and {len(static) - 1} more) uses static activation scales, which need calibration "
                "through the pipeline; load the float pipeline and call pipe.enable_quant(config, calibration_prompts=[...]), "
                "or quantize on load with act_mode='dynamic_per_token'"
            )
        if self.pre_quantized:
            swap_in_empty_layers(
                model, self.plan, DiffusionQuantLinear, layer_kwargs=lambda layer: layer_kwargs(layer, self.diffusion)
            )
            if self.diffusion.bos_layers:
                from .bos import add_empty_bos_buffers

                add_empty_bos_buffers(model, self.plan, self.diffusion.bos_layers)
        model.register_to_config(quantization_config=self.quantization_config)
        model.piecewise_quant_config = core
        return model

    # ---- while loading ----------------------------------------------------------------------------

    def _planned(self, param_name: str) -> tuple[str, str, LayerSpec | None]:
        module_name, tensor_name = split_param_name(param_name)
        return module_name, tensor_name, self.plan.get(module_name)

    def check_if_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                                 state_dict: dict[str, Any], **kwargs: Any) -> bool:
        module_name, tensor_name, layer = self._planned(param_name)
        if layer is None:
            return False
        if self.pre_quantized:
            return tensor_name != "bias"
        return tensor_name == "weight"

    def check_quantized_param_shape(self, param_name: str, current_param: torch.Tensor, loaded_param: torch.Tensor) -> bool:
        raise CheckpointMismatchError(
            f"piecewise-quant: tensor {param_name!r} has shape {list(loaded_param.shape)} in the checkpoint, expected "
            f"{list(current_param.shape)} for the layer its quantization_config plans"
        )

    @torch.no_grad()
    def create_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                               target_device: Any, state_dict: dict[str, Any], unexpected_keys: list[str],
                               **kwargs: Any) -> None:
        module_name, tensor_name, layer = self._planned(param_name)
        original = state_dict.get(param_name, param_value)  # before diffusers' cast to torch_dtype
        device = torch.device(f"cuda:{target_device}") if isinstance(target_device, int) else torch.device(target_device)
        module = model.get_submodule(module_name)
        if self.pre_quantized:
            self._set_checkpoint_tensor(module, module_name, tensor_name, layer, original.to(device=device))
            return
        # quantize on load: ``original`` is the float weight of a planned nn.Linear
        check_float_weight(param_name, original, layer)
        # the dtype diffusers loads the model in (``param_value`` is already cast to it), not the file's
        compute_dtype = kwargs.get("dtype") or (param_value.dtype if param_value.is_floating_point() else original.dtype)
        weight = original.to(device=device, dtype=torch.float32 if original.dtype == torch.float64 else original.dtype)
        model.set_submodule(module_name, self._quantized(layer, weight, module.bias, compute_dtype))

    def _set_checkpoint_tensor(self, module: nn.Module, module_name: str, tensor_name: str, layer: LayerSpec,
                               value: torch.Tensor) -> None:
        """Set one stored tensor of a pre-quantized layer, untouched, after checking it is one the
        layer stores, with the planned shape and dtype."""
        param_name = f"{module_name}.{tensor_name}"
        expected = _layer_tensors(layer, module)
        if tensor_name not in expected:
            raise CheckpointMismatchError(
                f"piecewise-quant: the checkpoint has tensor {param_name!r}, which layer {module_name!r} "
                f"(grid={layer.spec.grid!r}, bits={layer.spec.bits}) does not store; its tensors are "
                f"{sorted(expected)}"
            )
        shape, dtype = expected[tensor_name]
        if tuple(value.shape) != shape or value.dtype != dtype:
            raise CheckpointMismatchError(
                f"piecewise-quant: tensor {param_name!r} has shape {list(value.shape)} and dtype {value.dtype}; "
                f"layer {module_name!r} (grid={layer.spec.grid!r}, bits={layer.spec.bits}) expects {list(shape)} "
                f"and {dtype}"
            )
        module._buffers[tensor_name] = value.clone()

    def _quantized(self, layer: LayerSpec, weight: torch.Tensor, bias: torch.Tensor | None,
                   compute_dtype: torch.dtype) -> nn.Module:
        from .layers import DiffusionQuantLinear
        from .planning import layer_kwargs

        return quantized_layer(DiffusionQuantLinear, layer, weight, bias, compute_dtype, **layer_kwargs(layer, self.diffusion))

    # ---- after loading ----------------------------------------------------------------------------

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from .layers import DiffusionQuantLinear, TimestepState, install_timestep_hook

        raise_mismatch(loaded_layer_problems(model, self.plan, DiffusionQuantLinear, _loaded_layer_problems))
        if any(m.act_scales_t is not None for m in model.modules() if isinstance(m, DiffusionQuantLinear)):
            install_timestep_hook(model, TimestepState(self.diffusion.timesteps))
        model.piecewise_quant_config = self.core_config
        return model

    # ---- dequantize -------------------------------------------------------------------------------

    @torch.no_grad()
    def _dequantize(self, model: nn.Module) -> nn.Module:
        from piecewise_quant.quantization import dequantize_layers

        from .layers import remove_timestep_hook

        remove_timestep_hook(model)
        return dequantize_layers(model)


def _finish_registration() -> None:
    from . import _finish_pending_registration

    _finish_pending_registration()


_finish_registration()
