"""The plugin manager: built-ins first, then entry points in the group ``piecewise_quant``.

``PIECEWISE_QUANT_DISABLE_PLUGINS=1`` skips third-party entry points (built-ins still load);
``PIECEWISE_QUANT_PLUGINS=a,b`` loads only the named entry points. A plugin that fails to load is
reported with its name (a warning) and skipped; it never breaks the host, even when it calls
``sys.exit`` at import (``KeyboardInterrupt`` still propagates).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
import warnings
from typing import Any, Iterable

import pluggy

from . import hookspecs

__all__ = ["get_plugin_manager", "load_plugins", "reset_plugin_manager", "ENV_DISABLE", "ENV_ALLOW"]

logger = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "piecewise_quant"
OWN_DISTRIBUTION = "piecewise-quant"
ENV_DISABLE = "PIECEWISE_QUANT_DISABLE_PLUGINS"
ENV_ALLOW = "PIECEWISE_QUANT_PLUGINS"

_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_builtins: list[tuple[str, Any]] = []
_entry_points_loaded = False


def add_builtin(name: str, plugin: Any) -> None:
    """Called by the core to declare a built-in plugin module (registered before entry points)."""
    with _lock:
        if all(n != name for n, _ in _builtins):
            _builtins.append((name, plugin))
            if _pm is not None and not _pm.is_registered(plugin):
                _pm.register(plugin, name=name)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, with built-ins registered (entry points via :func:`load_plugins`)."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            for name, plugin in _builtins:
                pm.register(plugin, name=name)
            _pm = pm
        return _pm


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _is_own(ep: importlib.metadata.EntryPoint) -> bool:
    dist = getattr(ep, "dist", None)
    return dist is not None and dist.name.replace("_", "-").lower() == OWN_DISTRIBUTION


def load_plugins() -> pluggy.PluginManager:
    """Load third-party plugins once (unless disabled) and return the manager."""
    global _entry_points_loaded
    pm = get_plugin_manager()
    with _lock:
        if _entry_points_loaded:
            return pm
        _entry_points_loaded = True
        disabled = _truthy(os.environ.get(ENV_DISABLE))
        if disabled:
            logger.info("third-party piecewise_quant plugins disabled by %s", ENV_DISABLE)
        allow = {n.strip() for n in os.environ.get(ENV_ALLOW, "").split(",") if n.strip()}
        for ep in _entry_points():
            own = _is_own(ep)  # piecewise-quant's own integrations plugin is a built-in
            if not own and (disabled or (allow and ep.name not in allow)):
                continue
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except (Exception, SystemExit) as exc:  # a broken plugin (even one calling sys.exit) must not break the host
                warnings.warn(
                    f"piecewise_quant plugin {ep.name!r} ({ep.value}) failed to load and was skipped: "
                    f"{type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return pm


def reset_plugin_manager() -> None:
    """Forget the manager and loaded entry points (tests use this)."""
    global _pm, _entry_points_loaded
    with _lock:
        _pm = None
        _entry_points_loaded = False
