"""transformers integration: ``quant_method="piecewise"`` for ``from_pretrained`` / ``save_pretrained``.

::

    import piecewise_quant as pq
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=pq.PiecewiseQuantConfig(bits=4))
    model.save_pretrained("out")
    AutoModelForCausalLM.from_pretrained("out")      # any later process, no piecewise_quant import needed

The registration with transformers happens automatically the moment ``transformers.quantizers.auto``
is imported (the ``piecewise_quant_autoload.pth`` hook, see ``piecewise_quant._autoload``; disable it
with ``PIECEWISE_QUANT_NO_AUTOLOAD=1``), or explicitly with :func:`register_with_transformers`.

Importing this module is cheap and does not import transformers; the classes
(:class:`PiecewiseHfConfig`, :class:`PiecewiseHfQuantizer`) load on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from piecewise_quant._lazy import lazy_exports

from .._hf import QUANT_METHOD, HostRegistry

__all__ = [
    "register_with_transformers",
    "unregister_from_transformers",
    "is_registered",
    "PiecewiseHfConfig",
    "PiecewiseHfQuantizer",
    "PiecewiseMethod",
    "QUANT_METHOD",
    "QuantizedKVCache",
    "enable_kv_cache",
    "disable_kv_cache",
    "kv_fake_quant",
]

_LAZY = {
    "PiecewiseHfConfig": ".config",
    "PiecewiseMethod": ".config",
    "as_core_config": ".config",
    "PiecewiseHfQuantizer": ".quantizer",
    "CheckpointMismatchError": ".checkpoint",
    "QuantizedKVCache": ".kv_cache",
    "QuantizedKVLayer": ".kv_cache",
    "LazyKV": ".kv_cache",
    "enable_kv_cache": ".kv_cache",
    "disable_kv_cache": ".kv_cache",
    "kv_fake_quant": ".kv_cache",
    "cache_bytes": ".kv_cache",
}

if TYPE_CHECKING:
    from .checkpoint import CheckpointMismatchError
    from .config import PiecewiseHfConfig, PiecewiseMethod, as_core_config
    from .kv_cache import (
        LazyKV,
        QuantizedKVCache,
        QuantizedKVLayer,
        cache_bytes,
        disable_kv_cache,
        enable_kv_cache,
        kv_fake_quant,
    )
    from .quantizer import PiecewiseHfQuantizer

_REGISTRY = HostRegistry(
    host="transformers",
    package=__name__,
    auto_module="transformers.quantizers.auto",
    class_names=("PiecewiseHfConfig", "PiecewiseHfQuantizer"),
    # module -> the attribute it defines last; a module without it is still being imported
    own_modules={"config": "PiecewiseHfConfig", "quantizer": "PiecewiseHfQuantizer"},
)


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)


def register_with_transformers() -> None:
    """Register ``quant_method="piecewise"`` (config class and quantizer) with transformers.

    Idempotent: entries already present under ``"piecewise"`` are replaced (transformers'
    ``register_*`` decorators refuse duplicates, so they are popped first). An entry registered by
    someone else under that name is replaced with a warning.

    If this runs while this integration's own modules are still being imported (importing
    ``...transformers.quantizer`` first imports transformers, which fires the autoload hook), the
    registration is deferred to the end of that import.
    """
    if _REGISTRY.defer():
        return
    from transformers.quantizers.auto import register_quantization_config, register_quantizer

    from .config import PiecewiseHfConfig
    from .quantizer import PiecewiseHfQuantizer

    def put(mapping: dict[str, Any], cls: type) -> None:
        mapping.pop(QUANT_METHOD, None)
        register = register_quantization_config if cls is PiecewiseHfConfig else register_quantizer
        register(QUANT_METHOD)(cls)

    _REGISTRY.install(PiecewiseHfConfig, PiecewiseHfQuantizer, put)


def _finish_pending_registration() -> None:
    """Called at the end of this integration's modules: completes a deferred registration."""
    _REGISTRY.finish_pending(register_with_transformers)


def unregister_from_transformers() -> None:
    """Remove piecewise-quant's entries from transformers' mappings (tests use this)."""
    _REGISTRY.uninstall()


def is_registered() -> bool:
    """Whether transformers currently maps ``"piecewise"`` to this integration's classes."""
    return _REGISTRY.is_registered()
