"""PEFT integration: LoRA on piecewise-quant's packed ``QuantLinear`` layers.

::

    import piecewise_quant as pq
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=pq.PiecewiseQuantConfig(bits=4))
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))   # or ["q_proj", "v_proj"]
    ...  # train: the base stays packed, only lora_A / lora_B get gradients
    model.save_pretrained("adapter")

    # any later process: no piecewise_quant import, no registration by hand
    base = AutoModelForCausalLM.from_pretrained("quantized-checkpoint")
    model = PeftModel.from_pretrained(base, "adapter")

    from piecewise_quant.integrations.peft import merge_and_unload
    merged = merge_and_unload(model, merge_to="quantized")   # or "float": exact, nn.Linear layers

Registration with PEFT happens automatically the moment ``peft.tuners.lora.model`` is imported
(``import peft`` does it; the ``piecewise_quant_autoload.pth`` hook, see
``piecewise_quant._autoload``; disable with ``PIECEWISE_QUANT_NO_AUTOLOAD=1``), or explicitly with
:func:`register_with_peft`. Importing this module is cheap and does not import PEFT.
"""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING, Any, Iterable

from piecewise_quant._lazy import lazy_exports

__all__ = [
    "register_with_peft",
    "unregister_from_peft",
    "is_registered",
    "merge_and_unload",
    "set_merge_target",
    "QuantLoraLinear",
    "MERGE_TARGETS",
]

MERGE_TARGETS: tuple[str, ...] = ("quantized", "float")

_LAZY = {"QuantLoraLinear": ".layer", "merged_base_layer": ".layer"}

if TYPE_CHECKING:
    from torch import nn

    from .layer import QuantLoraLinear, merged_base_layer

_lock = threading.RLock()
_registering = threading.local()


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)


def register_with_peft() -> None:
    """Make PEFT's LoRA wrap ``QuantLinear`` layers (explicit target names and ``"all-linear"``).

    Idempotent. Safe to call while PEFT itself is being imported (the autoload hook does): it only
    touches ``peft.tuners.lora.model`` and ``peft.tuners.tuners_utils``, which are complete by then.
    If importing those modules fires the autoload hook, that inner call returns at once and this one
    finishes the job."""
    if getattr(_registering, "active", False):
        return
    with _lock:
        _registering.active = True
        try:
            from .registration import register

            register()
        finally:
            _registering.active = False


def unregister_from_peft() -> None:
    """Undo :func:`register_with_peft` (tests use this). Existing LoRA layers keep working."""
    with _lock:
        from .registration import unregister

        unregister()


def is_registered() -> bool:
    """Whether PEFT currently dispatches ``QuantLinear`` to :class:`QuantLoraLinear`."""
    from .registration import is_registered as _is_registered

    return _is_registered()


def _lora_layers(model: "nn.Module") -> list[Any]:
    from .layer import QuantLoraLinear

    return [m for m in model.modules() if isinstance(m, QuantLoraLinear)]


def set_merge_target(model: "nn.Module", merge_to: str) -> int:
    """Choose what ``merge_adapter()`` / ``merge_and_unload()`` make of every quantized LoRA layer of
    ``model``: ``"quantized"`` (re-quantize the merged weight with the layer's own spec; the
    default) or ``"float"`` (an exact ``nn.Linear``). Returns the number of layers changed."""
    from .layer import _check_merge_target

    _check_merge_target(merge_to)
    layers = _lora_layers(model)
    for layer in layers:
        layer.merge_to = merge_to
    return len(layers)


def merge_and_unload(
    model: Any,
    merge_to: str = "quantized",
    *,
    progressbar: bool = False,
    safe_merge: bool = False,
    adapter_names: Iterable[str] | None = None,
) -> "nn.Module":
    """PEFT's ``merge_and_unload()`` with the choice of what the quantized layers become.

    ``merge_to="quantized"``: each LoRA-wrapped ``QuantLinear`` becomes a new ``QuantLinear`` holding
    ``quantize(dequantize(base) + B @ A * scaling)`` with the base layer's own spec: the model stays
    packed and its checkpoint format is unchanged, at the cost of one more rounding error.
    ``merge_to="float"``: each becomes an ``nn.Linear`` holding the merged weight exactly. The
    model's quantization config is updated to match (the float layers are added to
    ``modules_to_not_convert``; with no ``QuantLinear`` left it is removed, like
    ``model.dequantize()``), so ``save_pretrained`` writes a checkpoint that reloads.

    Raises ``ValueError`` for an unknown ``merge_to``, a model without quantized LoRA layers, or a
    format that cannot re-quantize (``merge_to="float"`` always works)."""
    from .layer import _check_merge_target

    _check_merge_target(merge_to)
    if not callable(getattr(model, "merge_and_unload", None)):
        raise TypeError(f"merge_and_unload needs a PEFT model (PeftModel or LoraModel), got {type(model).__name__}")
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            "the model has no LoRA layer on a piecewise-quant QuantLinear; call the model's own merge_and_unload()"
        )
    float_names = []
    if merge_to == "float":
        root = _root_module(model)
        float_names = [n for n, m in root.named_modules() for layer in layers if m is layer]
    previous = {id(layer): layer.merge_to for layer in layers}
    for layer in layers:
        layer.merge_to = merge_to
    try:
        kwargs: dict[str, Any] = {"progressbar": progressbar, "safe_merge": safe_merge}
        if adapter_names is not None:
            kwargs["adapter_names"] = list(adapter_names)
        merged = model.merge_and_unload(**kwargs)
    except Exception:
        for layer in layers:
            layer.merge_to = previous[id(layer)]
        raise
    if float_names:
        _record_float_layers(merged, float_names)
    return merged


def _root_module(model: Any) -> Any:
    """The transformers model inside a ``PeftModel`` / ``LoraModel`` (names as in the checkpoint)."""
    base = model
    get_base = getattr(base, "get_base_model", None)
    if callable(get_base):
        base = get_base()
    return base


def _record_float_layers(model: Any, names: list[str]) -> None:
    """After a float merge: keep the model's quantization config true to its layers."""
    import dataclasses

    from piecewise_quant.config import PiecewiseQuantConfig
    from piecewise_quant.qlinear import QuantLinear

    remaining = any(isinstance(m, QuantLinear) for m in model.modules())
    host = getattr(model, "config", None)
    if not remaining:
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        elif host is not None and hasattr(host, "quantization_config"):
            del host.quantization_config
            if hasattr(model, "is_quantized"):
                model.is_quantized = False
        if hasattr(model, "piecewise_quant_config"):
            del model.piecewise_quant_config
        return
    qc = getattr(host, "quantization_config", None) if host is not None else None
    core = getattr(model, "piecewise_quant_config", None)
    if core is None and qc is not None:
        core = getattr(qc, "core", None) or (PiecewiseQuantConfig.from_dict(qc) if isinstance(qc, dict) else None)
    if core is None:
        warnings.warn(
            "merged some layers to float but found no piecewise quantization config on the model to update; "
            "a saved checkpoint may not reload",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    outputs = []
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_out() if callable(get_out) else None
    if emb is not None:
        outputs = [n for n, m in model.named_modules() if m is emb]
    skip = list(core.skip_patterns()) + [n for n in outputs + sorted(names) if not core.is_skipped(n)]
    new_core = dataclasses.replace(core, modules_to_not_convert=tuple(dict.fromkeys(skip)))
    if hasattr(model, "piecewise_quant_config"):
        model.piecewise_quant_config = new_core
    if isinstance(qc, dict):
        host.quantization_config = new_core.to_dict()
    elif qc is not None and hasattr(qc, "core"):
        qc.modules_to_not_convert = new_core.modules_to_not_convert
