"""Routing a weight format's methods through a storage extension (outliers, low-rank branch).

:class:`~piecewise_quant.formats.base.WeightFormat` subclasses get their ``layout``/``quantize``/``fit``/
``encode``/``dequantize`` wrapped so that a layer with ``outliers`` or ``low_rank`` set is handled by
:mod:`piecewise_quant.outliers` or :mod:`piecewise_quant.lowrank` around the format's own method.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

# where each method takes its LayerSpec, counting arguments after self (the interface's order)
LAYER_POS = {"layout": 0, "quantize": 1, "fit": 1, "encode": 2, "dequantize": 1}


def resolves_to(cls: type, name: str, wrapper: Callable[..., Any]) -> bool:
    """Whether ``cls.name`` is ``wrapper`` or wraps it (another routing may sit outside this one)."""
    f = getattr(cls, name, None)
    while f is not None:
        if f is wrapper:
            return True
        f = getattr(f, "__wrapped__", None)
    return False


def route(name: str, method: Callable[..., Any], applies: Callable[[Any], bool],
          handle: Callable[[Any, str, list, Any], Any]) -> Callable[..., Any]:
    """``method`` of a format class, calling ``handle(fmt, name, args, layer)`` instead when
    ``applies(layer)``. Only the override that the object's class resolves to is routed: a subclass
    calling ``super()`` gets the plain method, so the extension is applied once. ``args`` are the
    method's arguments after ``self``, by position, defaults filled in."""
    sig = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = list(bound.arguments.values())[1:]
        layer = a[LAYER_POS[name]]
        if not applies(layer) or not resolves_to(type(self), name, wrapper):
            return method(self, *args, **kwargs)
        return handle(self, name, a, layer)

    return wrapper
