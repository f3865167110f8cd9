"""Teach PEFT's LoRA about ``QuantLinear``: the layer dispatch and ``target_modules="all-linear"``.

PEFT 0.21 has no registry for quantized base layers: ``LoraModel._create_new_module`` tries a
hard-coded list of dispatchers, and ``LoraConfig._register_custom_module`` only lives on one config
instance (it is not saved to ``adapter_config.json``, so ``PeftModel.from_pretrained`` would fail
again). ``"all-linear"`` (``tuners_utils._maybe_include_all_linear_layers``) only accepts
``nn.Linear`` and ``Conv1D``. So registration wraps those two functions:

* ``LoraModel._create_new_module``: a target whose base is a ``QuantLinear`` becomes a
  :class:`~.layer.QuantLoraLinear`, unless the config's own ``_register_custom_module`` mapping
  claims it (the user's explicit choice wins); every other target goes to PEFT unchanged;
* ``_maybe_include_all_linear_layers``: for LoRA configs, adds the ``QuantLinear`` modules with the
  exclusions PEFT applies to ``nn.Linear`` (the output embeddings / classification head, and
  modules inside existing adapter layers).

Both wrappers carry the original as ``__wrapped__``; registering twice does not wrap twice, and
:func:`unregister` puts the originals back.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

__all__ = ["register", "unregister", "is_registered"]

_lock = threading.RLock()
_MARK = "__piecewise_quant_peft__"


def _lora_model_cls():
    from peft.tuners.lora.model import LoraModel

    return LoraModel


def _tuners_utils():
    import peft.tuners.tuners_utils as tuners_utils

    return tuners_utils


def _enum_value(value: Any) -> Any:
    """``PeftType.LORA`` / ``"LORA"`` -> ``"LORA"`` (``str()`` of a str-enum is its qualified name)."""
    return getattr(value, "value", value)


def _is_ours(func: Any) -> bool:
    return bool(getattr(func, _MARK, False))


def _base_of(target: Any) -> Any:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def _wrap_create_new_module(original):
    @functools.wraps(original)
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        from piecewise_quant.qlinear import QuantLinear

        base = _base_of(target)
        custom = getattr(lora_config, "_custom_modules", None) or {}
        if isinstance(base, QuantLinear) and not any(isinstance(base, key) for key in custom):
            from .layer import QuantLoraLinear

            return QuantLoraLinear(target, adapter_name, config=lora_config, **kwargs)
        return original(lora_config, adapter_name, target, **kwargs)

    setattr(_create_new_module, _MARK, True)
    return _create_new_module


def _excluded_names(peft_config: Any, model: Any) -> set[str]:
    """The names PEFT's ``all-linear`` drops for ``nn.Linear``, computed the same way."""
    tuners_utils = _tuners_utils()
    excluded: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    output_emb = None
    if callable(get_out):
        try:
            output_emb = get_out()
        except Exception:  # models without an LM head raise NotImplementedError and the like
            output_emb = None
    if output_emb is not None:
        excluded |= {n for n, m in model.named_modules() if m is output_emb}
    elif _enum_value(getattr(peft_config, "task_type", None)) == "SEQ_CLS":
        for head in getattr(tuners_utils, "SEQ_CLS_HEAD_NAMES", ()):
            module = getattr(model, head, None)
            if module is not None:
                excluded |= {n for n, m in model.named_modules() if m is module}
                break
    for prefix, module in model.named_modules():
        if isinstance(module, tuners_utils.BaseTunerLayer):
            excluded |= {f"{prefix}.{suffix}" if prefix else suffix for suffix, _ in module.named_modules() if suffix}
    return excluded


def _wrap_all_linear(original):
    @functools.wraps(original)
    def _maybe_include_all_linear_layers(peft_config, model):
        target = getattr(peft_config, "target_modules", None)
        wants_all = (
            isinstance(target, str)
            and target.lower() == "all-linear"
            and _enum_value(getattr(peft_config, "peft_type", None)) == "LORA"
        )
        result = original(peft_config, model)
        if not wants_all:
            return result
        from piecewise_quant.qlinear import QuantLinear

        quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        if quant:
            result.target_modules = set(result.target_modules) | (quant - _excluded_names(peft_config, model))
        return result

    setattr(_maybe_include_all_linear_layers, _MARK, True)
    return _maybe_include_all_linear_layers


def _wrap_parameter_count(original):
    @functools.wraps(original)
    def get_nb_trainable_parameters(self):
        # packed QuantLinear weights are buffers, invisible to PEFT's count: add their logical size
        trainable, total = original(self)
        from piecewise_quant.qlinear import QuantLinear

        packed = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, QuantLinear))
        return trainable, total + packed

    setattr(get_nb_trainable_parameters, _MARK, True)
    return get_nb_trainable_parameters


def count_packed_parameters() -> None:
    """Make ``PeftModel.get_nb_trainable_parameters`` (``print_trainable_parameters``) count each
    ``QuantLinear`` weight at its logical size, ``in_features * out_features`` (idempotent)."""
    from peft.peft_model import PeftModel

    with _lock:
        current = PeftModel.__dict__["get_nb_trainable_parameters"]
        if not _is_ours(current):
            PeftModel.get_nb_trainable_parameters = _wrap_parameter_count(current)


def register() -> None:
    """Install the wrappers (idempotent)."""
    import sys

    if "peft.peft_model" in sys.modules and hasattr(sys.modules["peft.peft_model"], "PeftModel"):
        count_packed_parameters()  # else the import hook does it when peft.peft_model is imported
    with _lock:
        lora_model = _lora_model_cls()
        current = lora_model.__dict__["_create_new_module"].__func__
        if not _is_ours(current):
            lora_model._create_new_module = staticmethod(_wrap_create_new_module(current))
        tuners_utils = _tuners_utils()
        current = tuners_utils._maybe_include_all_linear_layers
        if not _is_ours(current):
            tuners_utils._maybe_include_all_linear_layers = _wrap_all_linear(current)


def unregister() -> None:
    """Put PEFT's original functions back (layers already created keep working)."""
    with _lock:
        lora_model = _lora_model_cls()
        current = lora_model.__dict__["_create_new_module"].__func__
        if _is_ours(current):
            lora_model._create_new_module = staticmethod(current.__wrapped__)
        tuners_utils = _tuners_utils()
        current = tuners_utils._maybe_include_all_linear_layers
        if _is_ours(current):
            tuners_utils._maybe_include_all_linear_layers = current.__wrapped__


def is_registered() -> bool:
    """Whether both wrappers are installed (never imports PEFT itself)."""
    import sys

    if "peft.tuners.lora.model" not in sys.modules or "peft.tuners.tuners_utils" not in sys.modules:
        return False
    lora_model = sys.modules["peft.tuners.lora.model"].LoraModel
    func = lora_model.__dict__.get("_create_new_module")
    return _is_ours(getattr(func, "__func__", func)) and _is_ours(
        sys.modules["peft.tuners.tuners_utils"]._maybe_include_all_linear_layers
    )
