"""Look-ups of plugin-registered things: formats, observers, kernel backends, integrations.

Every look-up asks the plugin manager (built-ins plus entry points, loaded on first use), so a
plugin registered at run time is seen at once.
"""

from __future__ import annotations

from typing import Any, Callable

from . import _builtin
from .formats.base import WeightFormat
from .plugins import add_builtin, load_plugins

__all__ = ["formats", "available_formats", "get_format", "observers", "get_observer", "sync_kernel_backends", "integrations"]


def _collect(hook_name: str, arity: int) -> list[tuple]:
    items: list[tuple] = []

    def register(*args: Any) -> None:
        if len(args) != arity:
            raise TypeError(f"{hook_name}: register() takes {arity} argument(s), got {len(args)}")
        items.append(args)

    add_builtin("piecewise_quant.builtin", _builtin)  # idempotent; built-ins come before entry points
    getattr(load_plugins().hook, hook_name)(register=register)
    return items


def formats() -> dict[str, WeightFormat]:
    out: dict[str, WeightFormat] = {}
    for (fmt,) in _collect("piecewise_quant_register_formats", 1):
        if not isinstance(fmt, WeightFormat):
            raise TypeError(f"a registered format must be a WeightFormat instance, got {fmt!r}")
        if fmt.name in out and type(out[fmt.name]) is not type(fmt):
            raise ValueError(f"two plugins register a format named {fmt.name!r}: {out[fmt.name]!r} and {fmt!r}")
        out.setdefault(fmt.name, fmt)
    return out


def available_formats() -> list[str]:
    """Names usable as ``PiecewiseQuantConfig(grid=...)``: built-ins and installed plugins."""
    return sorted(formats())


def get_format(name: str) -> WeightFormat:
    found = formats()
    if name not in found:
        raise ValueError(f"unknown grid {name!r}; allowed: {', '.join(repr(n) for n in sorted(found))} (plugins can add more)")
    return found[name]


def observers() -> dict[str, Callable]:
    return {name: fn for name, fn in _collect("piecewise_quant_register_observers", 2)}


def get_observer(name: str) -> Callable:
    found = observers()
    if name not in found:
        raise ValueError(f"unknown observer {name!r}; allowed: {', '.join(repr(n) for n in sorted(found))}")
    return found[name]


def sync_kernel_backends() -> None:
    """Register every plugin kernel backend with ``piecewise_quant.kernels``."""
    from .kernels import register_backend

    for (backend,) in _collect("piecewise_quant_register_kernel_backends", 1):
        register_backend(backend, replace=True)


def integrations() -> dict[str, Callable[[], None]]:
    return {name: fn for name, fn in _collect("piecewise_quant_register_integrations", 2)}
