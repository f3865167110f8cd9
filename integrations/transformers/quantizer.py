"""``PiecewiseHfQuantizer``: the transformers ``HfQuantizer`` for ``quant_method="piecewise"``.

Two load paths (``from_pretrained`` decides which through ``pre_quantized``):

* **Quantize on load** (a float checkpoint plus ``quantization_config=PiecewiseQuantConfig(...)``):
  before loading, the layer plan is computed on the meta model (``piecewise_quant.plan_layers``:
  a bad config fails here, naming the layer). While loading, each planned layer's float
  ``weight`` goes through :class:`~.ops.PiecewiseQuantizeOp`, which quantizes it and swaps the
  ``nn.Linear`` for a ``QuantLinear``, one layer at a time (only one float weight in memory at
  once). After loading, every planned layer must be a ``QuantLinear`` with real tensors.
* **Pre-quantized** (a checkpoint whose ``config.json`` has ``quant_method: "piecewise"``): the same
  plan is rebuilt from the stored config and the planned layers become ``QuantLinear`` on the meta
  device, so the checkpoint's ``qweight``/``scales``/... load by name. The safetensors headers are
  checked against the plan first (missing tensor, wrong shape or dtype: an error naming the tensor),
  and the loaded layers are checked again after loading.

Layers whose weight is tied to another (e.g. an LM head tied to the input embeddings) stay in float:
quantizing them would untie the embeddings.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from piecewise_quant.checkpoint import check_finite_tensors
from piecewise_quant.config import PiecewiseQuantConfig

from .._hf import (
    check_float_weight,
    check_known_grids,
    loaded_layer_problems,
    quantized_layer,
    raise_mismatch,
    swap_in_empty_layers,
    tensor_problems,
)
from .config import PiecewiseHfConfig, as_core_config

__all__ = ["PiecewiseHfQuantizer"]

logger = logging.getLogger(__name__)


def _core() -> Any:
    """The core API this integration uses, imported on first use (torch-heavy: never at
    registration time, which runs inside transformers' own import)."""
    from types import SimpleNamespace

    import piecewise_quant
    from piecewise_quant.qlinear import QuantLinear
    from piecewise_quant.registry import get_format

    return SimpleNamespace(
        QuantLinear=QuantLinear, get_format=get_format, plan_layers=piecewise_quant.plan_layers
    )



def _model_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved with the checkpoint being loaded (calibration text needs it)."""
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ValueError("calibrating on load needs the model's tokenizer, but the model has no name_or_path")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any failure: say what to do instead
        raise ValueError(
            f"calibrating on load needs a tokenizer next to the weights in {path!r} ({exc}); save one there, or load "
            "the float model and call piecewise_quant.calibrate(model, config, data, tokenizer=...)"
        ) from None


def _tied_module_names(model: nn.Module) -> set[str]:
    try:
        tied = getattr(model, "all_tied_weights_keys", None) or {}
    except Exception:
        return set()
    names: set[str] = set()
    for k, v in dict(tied).items():
        for key in (k, v):
            if isinstance(key, str) and key.endswith(".weight"):
                names.add(key[: -len(".weight")])
    return names


def _where(files: list[str] | None) -> str:
    if not files:
        return "the checkpoint"
    import os

    return os.path.dirname(str(files[0])) or str(files[0])


class PiecewiseHfQuantizer(HfQuantizer):
    """Quantizes on load, and loads piecewise checkpoints (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
        if not isinstance(quantization_config, PiecewiseHfConfig):
            quantization_config = PiecewiseHfConfig.from_core(as_core_config(quantization_config))
        super().__init__(quantization_config, **kwargs)
        self.plan: dict[str, Any] = {}
        self.checkpoint_files: list[str] | None = None
        self._dispatched = False

    @property
    def core_config(self) -> PiecewiseQuantConfig:
        return self.quantization_config.core

    # ---- environment ----------------------------------------------------------------------------

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        calibrating = self.calibrating
        if not self.pre_quantized and not calibrating and isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "piecewise-quant cannot quantize on load with disk offloading in device_map; quantize and "
                "save the model first, then load the saved checkpoint"
            )

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    # ---- planning -------------------------------------------------------------------------------

    def _make_plan(self, model: nn.Module) -> dict[str, Any]:
        pq = _core()

        core = self.core_config
        check_known_grids(model, core)
        plan = dict(pq.plan_layers(model, core))
        tied = _tied_module_names(model) & set(plan)
        if tied:
            (logger.info if self.pre_quantized else logger.warning)(
                "piecewise-quant keeps these layers in float because their weights are tied to other modules: %s",
                ", ".join(sorted(tied)),
            )
            for name in tied:
                plan.pop(name)
        if not plan:
            raise ValueError(
                "piecewise-quant found no nn.Linear layer to quantize in this model (all were skipped by "
                "modules_to_not_convert, tied, or the model has none)"
            )
        return plan

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        pq = _core()

        dtype = kwargs.get("dtype") or getattr(model, "dtype", None) or torch.float32
        self.checkpoint_files = list(kwargs.get("checkpoint_files") or []) or None
        device_map = kwargs.get("device_map")
        self._dispatched = isinstance(device_map, dict) and len({str(d) for d in device_map.values()}) > 1
        self.plan = self._make_plan(model)
        self.loading_info = None
        if self.pre_quantized:
            if self._headers_checked():
                from piecewise_quant.checkpoint import check_marker

                check_marker(self.checkpoint_files, self.core_config, where=_where(self.checkpoint_files))
            self._check_checkpoint_headers(model)
            self._capture_loading_info(model)
            swap_in_empty_layers(model, self.plan, pq.QuantLinear, dtype=dtype)
            if self.core_config.kv_cache is not None and self.core_config.kv_cache.static_scales:
                from piecewise_quant.kv_static import add_scale_buffers

                add_scale_buffers(model)  # the checkpoint's k_scale/v_scale load into them
        model.piecewise_quant_config = self.core_config
        return model

    def _capture_loading_info(self, model: nn.Module) -> None:
        """Keep the keys transformers found missing or unexpected (after its own ignore rules and
        weight tying): a strict load refuses them. transformers hands them to no quantizer hook, so
        this wraps, on this model instance only, the method that receives them last."""
        original = getattr(model, "_adjust_missing_and_unexpected_keys", None)
        if not callable(original):
            logger.debug("piecewise-quant: this transformers has no _adjust_missing_and_unexpected_keys; "
                         "unplanned tensors are not checked")
            return

        def capture(loading_info: Any) -> None:
            original(loading_info)
            self.loading_info = loading_info

        object.__setattr__(model, "_adjust_missing_and_unexpected_keys", capture)

    def _strict_key_check(self, model: nn.Module) -> list[str]:
        model.__dict__.pop("_adjust_missing_and_unexpected_keys", None)
        info = self.loading_info
        self.loading_info = None
        if info is None:
            return []
        problems = []
        for key in sorted(getattr(info, "missing_keys", ()) or ()):
            problems.append(f"tensor {key!r} is missing from the checkpoint (transformers would initialise it at random)")
        for key in sorted(getattr(info, "unexpected_keys", ()) or ()):
            problems.append(f"tensor {key!r} is in the checkpoint but not in the model its config.json describes")
        for item in sorted(getattr(info, "mismatched_keys", ()) or (), key=str):
            key = item[0] if isinstance(item, tuple) else item
            problems.append(f"tensor {key!r} has a shape the model does not expect")
        return problems

    def _check_checkpoint_headers(self, model: nn.Module) -> None:
        pq = _core()

        from .checkpoint import check_checkpoint, expected_tensors, read_headers

        files = self.checkpoint_files
        if not files or not all(str(f).endswith(".safetensors") for f in files):
            return  # checked after loading instead
        expected = {}
        for name, layer in self.plan.items():
            linear = model.get_submodule(name)
            fmt = pq.get_format(layer.spec.grid)
            expected[name] = (expected_tensors(name, layer, fmt, linear.bias is not None), layer)
        check_checkpoint(expected, read_headers(files), prefix=getattr(model, "base_model_prefix", "") or "")

    # ---- quantize on load -------------------------------------------------------------------------

    @property
    def calibrating(self) -> bool:
        """A float checkpoint with a calibration recipe, or with a rotation (it changes weights
        across layers): load in float, then calibrate (or rotate and quantize) after loading."""
        core = self.core_config
        return not self.pre_quantized and (core.calibration is not None or core.rotation is not None)

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized or self.calibrating:
            return False
        module_name, _, tensor_name = param_name.rpartition(".")
        if tensor_name != "weight" or module_name not in self.plan:
            return False
        pq = _core()

        module = model.get_submodule(module_name)
        return isinstance(module, nn.Linear) and not isinstance(module, pq.QuantLinear)

    def param_element_size(self, model: nn.Module, param_name: str, param: torch.Tensor) -> float:
        module_name, _, tensor_name = param_name.rpartition(".")
        layer = self.plan.get(module_name)
        if layer is not None and tensor_name == "weight" and not self.pre_quantized and not self.calibrating:
            pq = _core()

            return pq.get_format(layer.spec.grid).bits_per_weight(layer) / 8
        return super().param_element_size(model, param_name, param)

    def get_quantize_ops(self):
        from .ops import PiecewiseQuantizeOp

        return PiecewiseQuantizeOp(self)

    @torch.no_grad()
    def quantize_layer_on_load(self, model: nn.Module, module_name: str, weight: torch.Tensor) -> bool:
        """Quantize the float ``weight`` of planned layer ``module_name`` and put a ``QuantLinear`` in
        its place. Returns False if the layer is not (or no longer) waiting for its weight."""
        pq = _core()

        layer = self.plan.get(module_name)
        if layer is None:
            return False
        linear = model.get_submodule(module_name)
        if not isinstance(linear, nn.Linear) or isinstance(linear, pq.QuantLinear):
            return False
        check_float_weight(f"{module_name}.weight", weight, layer)
        q = quantized_layer(pq.QuantLinear, layer, weight, linear.bias, weight.dtype)
        # loaded, not to be (re)initialised by the model's _init_weights
        for t in [*q.parameters(recurse=False), *q.buffers(recurse=False)]:
            if not t.is_meta:
                t._is_hf_initialized = True
        q._is_hf_initialized = True
        model.set_submodule(module_name, q)
        return True

    # ---- after loading ----------------------------------------------------------------------------

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.calibrating:
            self._calibrate_after_loading(model)
        problems: list[str] = self._strict_key_check(model) if self.pre_quantized else []
        problems += loaded_layer_problems(model, self.plan, _core().QuantLinear, self._loaded_layer_problems)
        raise_mismatch(problems)
        model.piecewise_quant_config = self.core_config
        if self.core_config.kv_cache is not None:  # a declared KV scheme: plain generate() uses it
            from .kv_cache import enable_kv_cache

            enable_kv_cache(model, self.core_config.kv_cache)
        if not self.pre_quantized and not self.calibrating:
            from piecewise_quant.quantization import warn_unquantized

            warn_unquantized(model)
        return model

    def _calibrate_after_loading(self, model: nn.Module) -> None:
        """Calibrate the float model just loaded (it has a calibration recipe); the plan and the
        ``quantization_config`` become the calibrated ones."""
        import piecewise_quant

        model.__dict__.pop("piecewise_quant_config", None)  # set before loading; calibrate() sets it when done
        if self.core_config.calibration is None:  # a rotation without calibration: data-free after loading
            piecewise_quant.quantize(model, self.core_config, progress=False)
        else:
            report = piecewise_quant.calibrate(model, self.core_config, tokenizer=_model_tokenizer(model))
            logger.info("piecewise-quant calibration:\n%s", report.summary())
            model.piecewise_quant_calibration_report = report
        self.quantization_config = PiecewiseHfConfig.from_core(model.piecewise_quant_config)
        model.config.quantization_config = self.quantization_config
        self.plan = self._plan_after_calibration(model)

    def _loaded_layer_problems(self, name: str, layer: Any, module: nn.Module) -> list[str]:
        """What is wrong with one loaded ``QuantLinear``: a missing, misshapen or mistyped tensor, or
        (when all are there) a NaN/Inf in its scales or bias."""
        # Without safetensors headers to check (a state_dict or .bin checkpoint), a tensor missing from
        # the checkpoint is only visible by the flag transformers puts on every tensor it loads
        # (the missing ones it allocates empty). Accelerate dispatch may move tensors, losing it.
        check_flags = self.pre_quantized and not self._headers_checked() and not self._dispatched

        def missing(t: torch.Tensor | None) -> bool:
            return t is None or t.is_meta or (check_flags and not getattr(t, "_is_hf_initialized", False))

        expected = {t: (lay.shape, lay.dtype) for t, lay in _core().get_format(layer.spec.grid).layout(layer).items()}
        act_scale = getattr(module, "act_scale", None)
        if act_scale is not None:  # only its presence is checked (its dtype follows the host's load)
            expected["act_scale"] = (tuple(act_scale.shape), act_scale.dtype)
        balance = module._buffers.get("balance_scale")
        if balance is not None:
            expected["balance_scale"] = ((module.in_features,), torch.float16)
        # with checked headers the file stores the planned dtype; a float transformers upcast on load
        # (e.g. a keep-in-fp32 rule) casts back exactly
        problems = tensor_problems(name, module, expected, missing, cast_float=self.pre_quantized and self._headers_checked())
        if problems:
            return problems
        finite = {**module.quantized_tensors(), "act_scale": act_scale, "balance_scale": balance, "bias": module.bias}
        try:
            check_finite_tensors(name, {k: v for k, v in finite.items() if v is not None})
        except ValueError as exc:
            return [str(exc).removeprefix("piecewise-quant: ")]
        return []

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[None, dict[str, str]]:
        """``save_pretrained`` writes the model's own state dict, with the piecewise marker (format,
        schema version, plan hash) in every safetensors file's metadata."""
        from piecewise_quant.checkpoint import marker_metadata

        config = getattr(model, "piecewise_quant_config", None) or self.core_config
        return None, marker_metadata(config)

    def _plan_after_calibration(self, model: nn.Module) -> dict[str, Any]:
        pq = _core()

        return {name: m.layer_spec for name, m in model.named_modules() if isinstance(m, pq.QuantLinear)}

    def _headers_checked(self) -> bool:
        files = self.checkpoint_files
        return bool(files) and all(str(f).endswith(".safetensors") for f in files)

    # ---- dequantize -------------------------------------------------------------------------------

    @torch.no_grad()
    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        from piecewise_quant.quantization import dequantize_layers

        return dequantize_layers(model, dtype if isinstance(dtype, torch.dtype) else None)


def _finish_registration() -> None:
    from . import _finish_pending_registration

    _finish_pending_registration()


_finish_registration()
