"""Look-ups of plugin-registered things: formats, observers, kernel backends, integrations.

Every look-up asks the plugin manager (built-ins plus entry points, loaded on first use), so a
plugin registered at run time is seen at once; what each hook registered is remembered until its
set of implementations changes. Each plugin's hook runs on its own: one that raises
(``SystemExit`` included) or registers something malformed is skipped with a ``RuntimeWarning``
naming it, and every other plugin, the built-ins first, still counts. Plugins are imported and
their hooks run outside any ``torch.device("meta")`` context and with float32 as the default
dtype, even when the first look-up happens inside a host's model construction (transformers builds
models on the meta device), so a plugin's module-level tensors are real CPU tensors.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Callable, Iterator

from . import _builtin
from .formats.base import WeightFormat
from .plugins import add_builtin, load_plugins

__all__ = [
    "formats", "available_formats", "get_format", "observers", "get_observer", "calibration_algorithms",
    "get_calibration_algorithm", "sync_kernel_backends", "integrations",
]

_warned: set[tuple[str, str]] = set()
# per hook: the hook implementations last seen and what they registered; a plugin added or removed
# changes the implementations, so it is seen at once without running every hook on each look-up
_collected: dict[str, tuple[tuple, list[tuple[str, tuple]]]] = {}
_warn_lock = threading.Lock()


def _warn_skipped(plugin: str, hook_name: str, why: str) -> None:
    with _warn_lock:
        if (plugin, hook_name) in _warned:
            return
        _warned.add((plugin, hook_name))
    warnings.warn(
        f"piecewise_quant plugin {plugin!r} was skipped for {hook_name}: {why}", RuntimeWarning, stacklevel=4
    )


@contextlib.contextmanager
def _plain_torch() -> Iterator[None]:
    """CPU as the default device and float32 as the default dtype, whatever the caller set."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(previous)


def _collect(hook_name: str, arity: int, check: Callable[[tuple], None] | None = None) -> list[tuple[str, tuple]]:
    """``(plugin name, args)`` of every ``register(*args)`` call of the hook, plugin by plugin in
    registration order (built-ins first); ``check`` raises ``TypeError``/``ValueError`` on a
    malformed registration, which skips that plugin."""
    add_builtin("piecewise_quant.builtin", _builtin)  # idempotent; built-ins come before entry points
    out: list[tuple[str, tuple]] = []
    with _plain_torch():
        hook = getattr(load_plugins().hook, hook_name)
        impls = hook.get_hookimpls()
        key = tuple((impl.plugin_name, impl.function) for impl in impls)
        cached = _collected.get(hook_name)
        if cached is not None and cached[0] == key:
            return cached[1]
        for impl in impls:
            items: list[tuple] = []

            def register(*args: Any, _items: list = items) -> None:
                if len(args) != arity:
                    raise TypeError(f"register() takes {arity} argument(s), got {len(args)}")
                if check is not None:
                    check(args)
                _items.append(args)

            try:
                impl.function(**({"register": register} if "register" in impl.argnames else {}))
            except (Exception, SystemExit) as exc:  # one broken plugin must not disable the others
                _warn_skipped(impl.plugin_name, hook_name, f"{type(exc).__name__}: {exc}")
                continue
            out.extend((impl.plugin_name, args) for args in items)
    _collected[hook_name] = (key, out)
    return out


def _check_format(args: tuple) -> None:
    if not isinstance(args[0], WeightFormat):
        raise TypeError(f"a registered format must be a WeightFormat instance, got {args[0]!r}")


def formats() -> dict[str, WeightFormat]:
    out: dict[str, WeightFormat] = {}
    owner: dict[str, str] = {}
    for plugin, (fmt,) in _collect("piecewise_quant_register_formats", 1, _check_format):
        if fmt.name in out and type(out[fmt.name]) is not type(fmt):
            _warn_skipped(
                plugin, "piecewise_quant_register_formats",
                f"two plugins register a format named {fmt.name!r}: {out[fmt.name]!r} (plugin {owner[fmt.name]!r}, kept) "
                f"and {fmt!r}",
            )
            continue
        owner.setdefault(fmt.name, plugin)
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
    out: dict[str, Callable] = {}
    for _, (name, fn) in _collect("piecewise_quant_register_observers", 2):
        out.setdefault(name, fn)
    return out


def get_observer(name: str) -> Callable:
    found = observers()
    if name not in found:
        raise ValueError(f"unknown observer {name!r}; allowed: {', '.join(repr(n) for n in sorted(found))}")
    return found[name]


def _check_algorithm(args: tuple) -> None:
    name, fn = args
    if not isinstance(name, str) or not name or not callable(fn):
        raise TypeError(f"register(name, algorithm) needs a non-empty name and a callable; got {name!r}, {fn!r}")


def calibration_algorithms() -> dict[str, Callable]:
    """Calibration algorithms added by plugins, by name (none are built in)."""
    out: dict[str, Callable] = {}
    for plugin, (name, fn) in _collect("piecewise_quant_register_calibration_algorithms", 2, _check_algorithm):
        if name in out and out[name] is not fn:
            _warn_skipped(plugin, "piecewise_quant_register_calibration_algorithms",
                          f"two plugins register a calibration algorithm named {name!r}; the first is kept")
            continue
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

    for plugin, (backend,) in _collect("piecewise_quant_register_kernel_backends", 1):
        try:
            register_backend(backend, replace=True)
        except (TypeError, ValueError) as exc:
            _warn_skipped(plugin, "piecewise_quant_register_kernel_backends", f"{type(exc).__name__}: {exc}")


def integrations() -> dict[str, Callable[[], None]]:
    return {name: fn for _, (name, fn) in _collect("piecewise_quant_register_integrations", 2)}
