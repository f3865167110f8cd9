"""Import hook run at every interpreter start by ``piecewise_quant_autoload.pth``.

transformers and diffusers have no plugin discovery: a quantization method is known only once
something registers it (transformers' ``register_quantizer``; diffusers' quantizer mappings). So
that a saved piecewise checkpoint reloads with a plain ``AutoModelForCausalLM.from_pretrained(dir)``
or ``DiffusionPipeline.from_pretrained(dir)``, without the user importing piecewise_quant, this
module puts a tiny finder at the front of ``sys.meta_path``. It does nothing until a module in
:data:`HOOKS` is imported; right after ``transformers.quantizers.auto`` finishes executing it calls
``piecewise_quant.integrations.transformers.register_with_transformers()``, and after
``diffusers.quantizers.auto`` ``piecewise_quant.integrations.diffusers.register_with_diffusers()``
(which also adds ``DiffusionPipeline.enable_quant``), and after ``peft.tuners.lora.model`` (which
``import peft`` imports) ``piecewise_quant.integrations.peft.register_with_peft()`` (LoRA on
``QuantLinear``, so ``PeftModel.from_pretrained`` reloads an adapter on a quantized model).

Rules this module keeps:

* cheap: it imports only ``os``, ``sys`` and ``threading`` (never torch or transformers), and the
  finder's ``find_spec`` is one dict look-up for every other import;
* never breaks the host: any failure while registering becomes a ``RuntimeWarning`` and
  transformers' own import carries on;
* ``PIECEWISE_QUANT_NO_AUTOLOAD=1`` (or true/yes/on) disables the registrations, both at start-up and
  at the moment transformers is imported (the load guard of :data:`GUARDS`, which refuses to load a
  piecewise checkpoint as a float model, stays). Explicit registration still works:
  ``piecewise_quant.integrations.transformers.register_with_transformers()`` /
  ``piecewise_quant.integrations.diffusers.register_with_diffusers()`` /
  ``piecewise_quant.integrations.peft.register_with_peft()``.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["ENV_NO_AUTOLOAD", "install", "uninstall", "is_installed", "is_disabled", "HOOKS", "GUARDS"]

ENV_NO_AUTOLOAD = "PIECEWISE_QUANT_NO_AUTOLOAD"

# module whose import triggers a registration -> (module to import, function to call)
HOOKS: dict[str, tuple[str, str]] = {
    "transformers.quantizers.auto": ("piecewise_quant.integrations.transformers", "register_with_transformers"),
    "diffusers.quantizers.auto": ("piecewise_quant.integrations.diffusers", "register_with_diffusers"),
    "peft.tuners.lora.model": ("piecewise_quant.integrations.peft", "register_with_peft"),
    "peft.peft_model": ("piecewise_quant.integrations.peft.registration", "count_packed_parameters"),
}

# safety checks that run whatever PIECEWISE_QUANT_NO_AUTOLOAD says: the load guard refuses to load a
# piecewise checkpoint as a float model (integrations/transformers/guard.py)
GUARDS: dict[str, tuple[str, str]] = {
    "transformers.modeling_utils": ("piecewise_quant.integrations.transformers.guard", "install_load_guard"),
}

_state = threading.local()


def is_disabled() -> bool:
    return os.environ.get(ENV_NO_AUTOLOAD, "").strip().lower() in {"1", "true", "yes", "on"}


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _run_hook(fullname: str) -> None:
    """Register piecewise-quant with the host whose module ``fullname`` just finished importing
    (or install a guard on it)."""
    target = GUARDS.get(fullname)
    if target is None:
        if is_disabled():
            return
        target = HOOKS.get(fullname)
    if target is None:
        return
    module_name, func_name = target
    try:
        import importlib

        func = getattr(importlib.import_module(module_name), func_name)
        func()
    except Exception as exc:  # never break the host's own import
        _warn(
            f"piecewise-quant could not register with {fullname.split('.')[0]} on import "
            f"({type(exc).__name__}: {exc}); call {module_name}.{func_name}() explicitly, or set "
            f"{ENV_NO_AUTOLOAD}=1 to silence this"
        )


class _HookedLoader:
    """Wraps the real loader of a hooked module; runs the hook right after ``exec_module``.

    Everything else (``get_source``, ``is_package``, resource readers...) is delegated."""

    def __init__(self, loader, fullname: str) -> None:
        self.__dict__["_pq_loader"] = loader
        self.__dict__["_pq_fullname"] = fullname

    def create_module(self, spec):
        create = getattr(self._pq_loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module) -> None:
        self._pq_loader.exec_module(module)
        _run_hook(self._pq_fullname)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_pq_loader"], name)

    def __repr__(self) -> str:
        return f"<piecewise_quant autoload hook around {self._pq_loader!r}>"


class _PostImportFinder:
    """A ``sys.meta_path`` finder that only answers for the modules in :data:`HOOKS`: it asks the
    finders behind it for the real spec and wraps that spec's loader."""

    def find_spec(self, fullname, path=None, target=None):
        if getattr(_state, "busy", False) or not (fullname in GUARDS or (fullname in HOOKS and not is_disabled())):
            return None
        _state.busy = True
        try:
            for finder in list(sys.meta_path):
                if finder is self or isinstance(finder, _PostImportFinder):
                    continue
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        except Exception:
            return None  # let the normal machinery report whatever is wrong
        finally:
            _state.busy = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module") or isinstance(loader, _HookedLoader):
            return spec
        spec.loader = _HookedLoader(loader, fullname)
        return spec

    def invalidate_caches(self) -> None:
        pass

    def __repr__(self) -> str:
        return "<piecewise_quant autoload finder>"


_finder: _PostImportFinder | None = None


def is_installed() -> bool:
    """Whether the finder is on ``sys.meta_path`` (it is under ``PIECEWISE_QUANT_NO_AUTOLOAD=1``
    too, for the guards; :func:`is_disabled` says whether registrations run)."""
    return any(isinstance(f, _PostImportFinder) for f in sys.meta_path)


def install() -> bool:
    """Put the finder first on ``sys.meta_path`` (idempotent). A hooked module that is already
    imported is registered at once. Returns whether the hook is active."""
    global _finder
    if not is_installed():
        _finder = _PostImportFinder()
        sys.meta_path.insert(0, _finder)
    for name in (*GUARDS, *HOOKS):
        if name in sys.modules:
            _run_hook(name)
    return not is_disabled()


def uninstall() -> None:
    """Remove the finder (registrations already made stay)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PostImportFinder)]


try:
    install()
except Exception as _exc:  # pragma: no cover - must never break interpreter start-up
    _warn(f"piecewise-quant autoload hook not installed: {type(_exc).__name__}: {_exc}")
