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

import threading
import warnings
from typing import TYPE_CHECKING, Any

from piecewise_quant._lazy import lazy_exports

__all__ = [
    "register_with_transformers",
    "unregister_from_transformers",
    "is_registered",
    "PiecewiseHfConfig",
    "PiecewiseHfQuantizer",
    "PiecewiseMethod",
    "QUANT_METHOD",
]

QUANT_METHOD = "piecewise"

_LAZY = {
    "PiecewiseHfConfig": ".config",
    "PiecewiseMethod": ".config",
    "as_core_config": ".config",
    "PiecewiseHfQuantizer": ".quantizer",
    "CheckpointMismatchError": ".checkpoint",
}

if TYPE_CHECKING:
    from .checkpoint import CheckpointMismatchError
    from .config import PiecewiseHfConfig, PiecewiseMethod, as_core_config
    from .quantizer import PiecewiseHfQuantizer

_lock = threading.RLock()
_pending = False

# module -> the attribute it defines last; a module without it is still being imported
_OWN_MODULES = {"config": "PiecewiseHfConfig", "quantizer": "PiecewiseHfQuantizer"}


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)


def _mappings():
    # submodule imports only: this runs from the autoload hook while the package
    # ``transformers.quantizers`` is still initialising
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    return AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING


def _is_ours(cls: Any, qualname: str) -> bool:
    return getattr(cls, "__module__", "").startswith(__name__) and getattr(cls, "__qualname__", "") == qualname


def _importing_own_modules() -> bool:
    import sys

    for short, last_attr in _OWN_MODULES.items():
        module = sys.modules.get(f"{__name__}.{short}")
        if module is not None and not hasattr(module, last_attr):
            return True
    return False


def register_with_transformers() -> None:
    """Register ``quant_method="piecewise"`` (config class and quantizer) with transformers.

    Idempotent: entries already present under ``"piecewise"`` are replaced (transformers'
    ``register_*`` decorators refuse duplicates, so they are popped first). An entry registered by
    someone else under that name is replaced with a warning.

    If this runs while this integration's own modules are still being imported (importing
    ``...transformers.quantizer`` first imports transformers, which fires the autoload hook), the
    registration is deferred to the end of that import.
    """
    global _pending
    if _importing_own_modules():
        _pending = True
        return
    from transformers.quantizers.auto import register_quantization_config, register_quantizer

    from .config import PiecewiseHfConfig
    from .quantizer import PiecewiseHfQuantizer

    with _lock:
        configs, quantizers = _mappings()
        for mapping, qualname in ((configs, "PiecewiseHfConfig"), (quantizers, "PiecewiseHfQuantizer")):
            existing = mapping.get(QUANT_METHOD)
            if existing is not None and not _is_ours(existing, qualname):
                warnings.warn(
                    f"transformers already had quant_method {QUANT_METHOD!r} registered to {existing!r}; "
                    "piecewise-quant replaces it",
                    RuntimeWarning,
                    stacklevel=2,
                )
            mapping.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(PiecewiseHfConfig)
        register_quantizer(QUANT_METHOD)(PiecewiseHfQuantizer)
        _pending = False


def _finish_pending_registration() -> None:
    """Called at the end of this integration's modules: completes a deferred registration."""
    if _pending and not _importing_own_modules():
        register_with_transformers()


def unregister_from_transformers() -> None:
    """Remove piecewise-quant's entries from transformers' mappings (tests use this)."""
    with _lock:
        configs, quantizers = _mappings()
        for mapping, qualname in ((configs, "PiecewiseHfConfig"), (quantizers, "PiecewiseHfQuantizer")):
            if _is_ours(mapping.get(QUANT_METHOD), qualname):
                mapping.pop(QUANT_METHOD, None)


def is_registered() -> bool:
    """Whether transformers currently maps ``"piecewise"`` to this integration's classes."""
    import sys

    if "transformers.quantizers.auto" not in sys.modules:
        return False
    configs, quantizers = _mappings()
    return _is_ours(configs.get(QUANT_METHOD), "PiecewiseHfConfig") and _is_ours(
        quantizers.get(QUANT_METHOD), "PiecewiseHfQuantizer"
    )
