"""Look-ups of plugin-registered things: formats, observers, kernel backends, integrations.

Every look-up asks the plugin manager (built-ins plus entry points, loaded on first use), so a
plugin registered at run time is seen at once.
"""

from __future__ import annotations

from typing import Any, Callable

from . import _builtin
from .formats.base import WeightFormat
from .plugins import add_builtin, load_plugins

__all__ = [
    "formats", "available_formats", "get_format", "observers", "get_observer", "calibration_algorithms",
    "get_calibration_algorithm", "sync_kernel_backends", "integrations",
]


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


def calibration_algorithms() -> dict[str, Callable]:
    """Calibration algorithms added by plugins, by name (none are built in)."""
    out: dict[str, Callable] = {}
    for name, fn in _collect("piecewise_quant_register_calibration_algorithms", 2):
        if not isinstance(name, str) or not name or not callable(fn):
            raise TypeError(f"register(name, algorithm) needs a non-empty name and a callable; got {name!r}, {fn!r}")
        if name in out and out[name] is not fn:
            raise ValueError(f"two plugins register a calibration algorithm named {name!r}: {out[name]!r} and {fn!r}")
        out[name] = fn
    return out


def get_calibration_algorithm(name: str) -> Callable:
    found = calibration_algorithms()
    if name not in found:
        have = ", ".join(repr(n) for n in sorted(found)) or "none (install a plugin that adds one)"
        raise ValueError(f"unknown calibration algorithm {name!r}; registered: {have}")
    return found[name]


def sync_kernel_backends() -> None:
    """Register every plugin kernel backend with ``piecewise_quant.kernels``."""
    from .kernels import register_backend

    for (backend,) in _collect("piecewise_quant_register_kernel_backends", 1):
        register_backend(backend, replace=True)


def integrations() -> dict[str, Callable[[], None]]:
    return {name: fn for name, fn in _collect("piecewise_quant_register_integrations", 2)}
