"""piecewise_quant.plugins: pluggy hook specifications and the plugin manager."""

if __name__ != "piecewise_quant.plugins":
    raise ImportError(
        f"the folder 'plugins/' must be imported as 'piecewise_quant.plugins', not {__name__!r}; "
        "install the package (pip install -e .) and run pytest with --import-mode=importlib"
    )

from .hookspecs import hookimpl, hookspec
from .manager import ENV_ALLOW, ENV_DISABLE, add_builtin, get_plugin_manager, load_plugins, reset_plugin_manager

__all__ = [
    "hookimpl",
    "hookspec",
    "get_plugin_manager",
    "load_plugins",
    "reset_plugin_manager",
    "add_builtin",
    "ENV_ALLOW",
    "ENV_DISABLE",
]
