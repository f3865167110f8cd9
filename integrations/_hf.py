"""The Hugging Face integration layer that transformers and diffusers share.

Both hosts load ``quant_method="piecewise"`` models the same way; only their quantizer hooks and
layer class differ. This module holds what they have in common:

* **registration** (:class:`HostRegistry`): putting the config class and the quantizer class into
  the host's ``AUTO_QUANTIZATION_CONFIG_MAPPING`` / ``AUTO_QUANTIZER_MAPPING`` idempotently,
  deferring while the integration's own modules are half-imported (the autoload hook fires inside
  them), and taking the entries out again;
* **the plan** (:func:`check_known_grids`, :func:`split_param_name`): refusing a config whose grid
  no installed format decodes, before any weight is read;
* **swap on load** (:func:`quantized_layer`, :func:`swap_in_empty_layers`): a float weight becomes a
  quantized layer as it arrives; a pre-quantized checkpoint gets empty quantized layers on the meta
  device that its tensors load into by name;
* **post-load validation** (:func:`loaded_layer_problems`, :func:`raise_mismatch`): every planned
  layer must be quantized with every tensor loaded, of the planned shape and dtype; otherwise one
  :class:`~piecewise_quant.CheckpointMismatchError` lists what is wrong, tensor by tensor.

Importing it is cheap (no torch, no host framework): the registration part runs from the autoload
hook while the host is still initialising; the loading part imports torch and the core on use.
"""

from __future__ import annotations

import importlib
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import torch
    from torch import nn

    from piecewise_quant.config import LayerSpec, PiecewiseQuantConfig

__all__ = [
    "QUANT_METHOD",
    "HostRegistry",
    "check_known_grids",
    "split_param_name",
    "check_float_weight",
    "quantized_layer",
    "swap_in_empty_layers",
    "tensor_problems",
    "loaded_layer_problems",
    "raise_mismatch",
]

QUANT_METHOD = "piecewise"

TensorSpec = tuple[tuple[int, ...], "torch.dtype"]


# ---- registration ----------------------------------------------------------------------------------


class HostRegistry:
    """``quant_method="piecewise"`` in one host's quantizer mappings (transformers or diffusers).

    Args:
        host: the host's name, for messages (``"transformers"``).
        package: the integration package (its ``__name__``); classes defined under it are "ours".
        auto_module: the host module holding ``AUTO_QUANTIZATION_CONFIG_MAPPING`` and
            ``AUTO_QUANTIZER_MAPPING`` (imported as a submodule only: the hook runs while the
            host's package is still initialising).
        class_names: the qualnames of the integration's config class and quantizer class.
        own_modules: the integration's modules that import the host, each mapped to the name it
            defines last; one that is imported but lacks that name is still being imported.
    """

    def __init__(
        self, host: str, package: str, auto_module: str, class_names: tuple[str, str], own_modules: Mapping[str, str]
    ) -> None:
        self.host = host
        self.package = package
        self.auto_module = auto_module
        self.class_names = class_names
        self.own_modules = dict(own_modules)
        self.lock = threading.RLock()
        self.pending = False

    def mappings(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The host's ``(config mapping, quantizer mapping)``."""
        module = importlib.import_module(self.auto_module)
        return module.AUTO_QUANTIZATION_CONFIG_MAPPING, module.AUTO_QUANTIZER_MAPPING

    def is_ours(self, obj: Any, qualname: str) -> bool:
        """Whether ``obj`` is this integration's class ``qualname`` (also from a reloaded copy)."""
        return getattr(obj, "__module__", "").startswith(self.package) and getattr(obj, "__qualname__", "") == qualname

    def importing_own_modules(self) -> bool:
        for short, last in self.own_modules.items():
            module = sys.modules.get(f"{self.package}.{short}")
            if module is not None and not hasattr(module, last):
                return True
        return False

    def defer(self) -> bool:
        """If one of the integration's modules is half-imported, remember to register at the end
        of that import and return ``True`` (the caller returns); else ``False``."""
        if self.importing_own_modules():
            self.pending = True
            return True
        return False

    def finish_pending(self, register: Callable[[], None]) -> None:
        """Run a registration :meth:`defer` postponed, once no own module is half-imported."""
        if self.pending and not self.importing_own_modules():
            register()

    def install(
        self, config_cls: type, quantizer_cls: type, put: Callable[[dict[str, Any], type], None] | None = None
    ) -> None:
        """Map ``"piecewise"`` to the two classes, replacing our earlier entries silently and anyone
        else's with a warning. ``put(mapping, cls)`` enters one class (default: set the key)."""
        with self.lock:
            configs, quantizers = self.mappings()
            pairs = ((configs, config_cls), (quantizers, quantizer_cls))
            for mapping, cls in pairs:
                existing = mapping.get(QUANT_METHOD)
                if existing is not None and existing is not cls and not self.is_ours(existing, cls.__qualname__):
                    warnings.warn(
                        f"{self.host} already had quant_method {QUANT_METHOD!r} registered to {existing!r}; "
                        "piecewise-quant replaces it",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            for mapping, cls in pairs:
                if put is None:
                    mapping[QUANT_METHOD] = cls
                else:
                    put(mapping, cls)
            self.pending = False

    def uninstall(self) -> None:
        """Take our entries out of the host's mappings (someone else's stay)."""
        with self.lock:
            for mapping, qualname in zip(self.mappings(), self.class_names):
                if self.is_ours(mapping.get(QUANT_METHOD), qualname):
                    mapping.pop(QUANT_METHOD, None)

    def is_registered(self) -> bool:
        """Whether the host (already imported) maps ``"piecewise"`` to our two classes."""
        if self.auto_module not in sys.modules:
            return False
        return all(
            self.is_ours(mapping.get(QUANT_METHOD), qualname)
            for mapping, qualname in zip(self.mappings(), self.class_names)
        )


# ---- the plan --------------------------------------------------------------------------------------


def check_known_grids(model: nn.Module, core: PiecewiseQuantConfig) -> None:
    """Raise ``ValueError`` naming the first ``nn.Linear`` whose planned grid no installed format
    provides: its tensors could not be decoded, so nothing is loaded."""
    from torch import nn

    from piecewise_quant.registry import formats

    known = formats()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        spec = core.spec_for(name)
        if spec is not None and spec.grid not in known:
            raise ValueError(
                f"layer {name!r}: the quantization_config names grid {spec.grid!r}, which this "
                f"piecewise-quant does not know (known: {', '.join(sorted(known))}); its tensors "
                f"(e.g. {name + '.qweight'!r}) cannot be decoded. Install the plugin that provides it, "
                "or upgrade piecewise-quant"
            )


def split_param_name(param_name: str) -> tuple[str, str]:
    """``"a.b.weight"`` -> ``("a.b", "weight")``: the module and the tensor a checkpoint key names."""
    module_name, _, tensor_name = param_name.rpartition(".")
    return module_name, tensor_name


# ---- swap on load ----------------------------------------------------------------------------------


def check_float_weight(key: str, weight: torch.Tensor, layer: LayerSpec) -> None:
    """Quantizing on load needs the planned layer's float weight: raise
    :class:`~piecewise_quant.CheckpointMismatchError` (a ``ValueError``) otherwise."""
    from piecewise_quant.checkpoint import CheckpointMismatchError

    if not weight.is_floating_point():
        raise CheckpointMismatchError(f"tensor {key!r} has dtype {weight.dtype}; quantizing on load needs a float weight")
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise CheckpointMismatchError(
            f"tensor {key!r} has shape {list(weight.shape)}, expected {[layer.out_features, layer.in_features]}"
        )


def quantized_layer(
    layer_cls: type, layer: LayerSpec, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
    **layer_kwargs: Any,
) -> nn.Module:
    """A ``layer_cls`` (``QuantLinear`` or a subclass) on ``weight``'s device holding ``weight``
    quantized with the layer's format, computing in ``dtype``, with ``bias`` (a meta bias stays
    a meta placeholder: its checkpoint tensor is set by name later)."""
    import torch
    from torch import nn

    from piecewise_quant.registry import get_format

    fmt = get_format(layer.spec.grid)
    q = layer_cls(layer, fmt, bias is not None, device=weight.device, dtype=dtype, **layer_kwargs)
    with torch.no_grad():
        q.load_quantized(fmt.quantize(weight, layer))
        if bias is not None:
            if bias.is_meta:
                value = torch.empty(bias.shape, dtype=dtype, device="meta")
            else:
                value = bias.detach().to(device=weight.device, dtype=dtype)
            q.bias = nn.Parameter(value, requires_grad=False)
    return q


def swap_in_empty_layers(
    model: nn.Module, plan: Mapping[str, LayerSpec], layer_cls: type, dtype: torch.dtype | None = None,
    layer_kwargs: Callable[[LayerSpec], dict[str, Any]] | None = None,
) -> None:
    """Replace every planned ``nn.Linear`` by an empty ``layer_cls`` on the meta device, so a
    pre-quantized checkpoint's tensors load into it by name. ``dtype``: the compute dtype
    (default: each linear's weight dtype)."""
    from piecewise_quant.registry import get_format

    for name, layer in plan.items():
        linear = model.get_submodule(name)
        q = layer_cls(
            layer, get_format(layer.spec.grid), linear.bias is not None, device="meta",
            dtype=dtype or linear.weight.dtype, **(layer_kwargs(layer) if layer_kwargs else {}),
        )
        model.set_submodule(name, q)


# ---- post-load validation --------------------------------------------------------------------------


def _is_missing(t: torch.Tensor | None) -> bool:
    return t is None or t.is_meta


def tensor_problems(
    name: str, module: nn.Module, expected: Mapping[str, TensorSpec],
    missing: Callable[[torch.Tensor | None], bool] = _is_missing, cast_float: bool = False,
) -> list[str]:
    """What is wrong with the loaded tensors of quantized layer ``name``: each ``expected``
    tensor ``{name: (shape, dtype)}`` and the bias must be loaded (not ``missing``), with the
    expected shape and dtype. ``cast_float``: the file is known to store the expected float dtype
    (the host converted it on load), so a float tensor is cast back instead of refused. A loaded
    bias is frozen."""
    problems: list[str] = []
    for tname, (shape, dtype) in expected.items():
        t = getattr(module, tname)
        key = f"{name}.{tname}"
        if missing(t):
            problems.append(f"tensor {key!r} was not found in the checkpoint")
        elif tuple(t.shape) != tuple(shape):
            problems.append(f"tensor {key!r} has shape {list(t.shape)}, expected {list(shape)}")
        elif t.dtype != dtype:
            if cast_float and t.is_floating_point() and dtype.is_floating_point:
                setattr(module, tname, t.to(dtype))
            else:
                problems.append(f"tensor {key!r} has dtype {t.dtype}, expected {dtype}")
    bias = getattr(module, "bias", None)
    if bias is not None:
        if missing(bias):
            problems.append(f"tensor {name + '.bias'!r} was not found in the checkpoint")
        else:
            bias.requires_grad_(False)
    return problems


def loaded_layer_problems(
    model: nn.Module, plan: Mapping[str, LayerSpec], layer_cls: type,
    check_layer: Callable[[str, LayerSpec, nn.Module], list[str]],
) -> list[str]:
    """After loading: every planned layer must be a ``layer_cls``; ``check_layer(name, layer,
    module)`` lists what is wrong with each one that is."""
    problems: list[str] = []
    for name, layer in plan.items():
        module = model.get_submodule(name)
        if not isinstance(module, layer_cls):
            problems.append(
                f"tensor {name + '.weight'!r} was not found in the checkpoint, so layer {name!r} could not be "
                "quantized (it would be randomly initialised)"
            )
            continue
        problems.extend(check_layer(name, layer, module))
    return problems


def raise_mismatch(problems: list[str]) -> None:
    """Raise one :class:`~piecewise_quant.CheckpointMismatchError` listing ``problems`` (the first
    few, and how many more); nothing when there are none."""
    if not problems:
        return
    from piecewise_quant.checkpoint import MAX_LISTED, CheckpointMismatchError

    listed = problems[:MAX_LISTED]
    more = len(problems) - len(listed)
    raise CheckpointMismatchError(
        "piecewise-quant: loading did not produce the quantized layers the quantization_config plans:\n  - "
        + "\n  - ".join(listed)
        + (f"\n  ... and {more} more" if more else "")
    )
