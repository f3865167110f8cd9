"""diffusers integration: quantize a pipeline's denoiser (DiT, PixArt, SD3, Flux...) in one call.

::

    import piecewise_quant as pq
    from piecewise_quant.integrations.diffusers import diffusion_recipe

    pipe = DiTPipeline.from_pretrained(path)
    pipe.enable_quant(diffusion_recipe(bits=4, act_bits=8, act_mode="static_per_tensor"),
                      calibration_prompts=[207, 360, 387, 974], num_inference_steps=25)
    pipe.save_pretrained("out")                       # reloads quantized with DiffusionPipeline.from_pretrained
    pipe.disable_quant()                              # float again (the float layers were kept)

    model = PixArtTransformer2DModel.from_pretrained(path, subfolder="transformer",
                                                     quantization_config=pq.PiecewiseQuantConfig(bits=4))
    pipe = DiffusionPipeline.from_pretrained(path, quantization_config=PipelineQuantizationConfig(
        quant_backend="piecewise", quant_kwargs={"bits": 4}, components_to_quantize=["transformer"]))

Registration (``quant_method="piecewise"`` in diffusers' quantizer mappings, the transformers side
for ``PipelineQuantizationConfig``, and ``DiffusionPipeline.enable_quant`` / ``disable_quant``)
happens when ``diffusers.quantizers.auto`` is imported (the autoload ``.pth`` hook; disable with
``PIECEWISE_QUANT_NO_AUTOLOAD=1``), or explicitly with :func:`register_with_diffusers`.

Importing this module is cheap and does not import diffusers; everything else loads on first use.
"""

from __future__ import annotations

if __name__ != "piecewise_quant.integrations.diffusers":
    raise ImportError(
        f"the folder 'integrations/diffusers/' must be imported as 'piecewise_quant.integrations.diffusers', not "
        f"{__name__!r}; install the package (pip install -e .) and run pytest with --import-mode=importlib"
    )

import importlib
import importlib.util
import sys
import warnings
from typing import TYPE_CHECKING, Any

from piecewise_quant._lazy import lazy_exports

from .._hf import QUANT_METHOD, HostRegistry

__all__ = [
    "register_with_diffusers",
    "unregister_from_diffusers",
    "is_registered",
    "enable_quant",
    "disable_quant",
    "enable_fast_attention",
    "disable_fast_attention",
    "FastAttentionPlan",
    "FastAttentionReport",
    "diffusion_recipe",
    "mixdq_plan",
    "MixDQPlan",
    "denoiser_names",
    "PiecewiseDiffusersConfig",
    "PiecewiseDiffusersQuantizer",
    "DiffusionOptions",
    "DiffusionQuantLinear",
    "DiffusionQuantReport",
    "CheckpointMismatchError",
    "QUANT_METHOD",
]

_LAZY = {
    "enable_quant": ".pipeline",
    "disable_quant": ".pipeline",
    "denoiser_names": ".pipeline",
    "DiffusionQuantReport": ".pipeline",
    "enable_fast_attention": ".fast_attention",
    "disable_fast_attention": ".fast_attention",
    "FastAttentionPlan": ".fast_attention",
    "FastAttentionReport": ".fast_attention",
    "diffusion_recipe": ".recipes",
    "mixdq_plan": ".mixdq",
    "MixDQPlan": ".mixdq",
    "PiecewiseDiffusersConfig": ".config",
    "DiffusionOptions": ".config",
    "PiecewiseDiffusersQuantizer": ".quantizer",
    "CheckpointMismatchError": ".quantizer",
    "DiffusionQuantLinear": ".layers",
}

if TYPE_CHECKING:
    from .config import DiffusionOptions, PiecewiseDiffusersConfig
    from .fast_attention import FastAttentionPlan, FastAttentionReport, disable_fast_attention, enable_fast_attention
    from .layers import DiffusionQuantLinear
    from .mixdq import MixDQPlan, mixdq_plan
    from .pipeline import DiffusionQuantReport, denoiser_names, disable_quant, enable_quant
    from .quantizer import CheckpointMismatchError, PiecewiseDiffusersQuantizer
    from .recipes import diffusion_recipe

_PIPELINE_MODULE = "diffusers.pipelines.pipeline_utils"

_REGISTRY = HostRegistry(
    host="diffusers",
    package=__name__,
    auto_module="diffusers.quantizers.auto",
    class_names=("PiecewiseDiffusersConfig", "PiecewiseDiffusersQuantizer"),
    # this package's modules that import diffusers -> the name each defines last; a module without it
    # is still being imported (the autoload hook can fire in the middle of that import)
    own_modules={
        "config": "_rebuild",
        "quantizer": "PiecewiseDiffusersQuantizer",
        "layers": "DiffusionQuantLinear",
        "planning": "has_static_activations",
        "calibration": "calibrate_activations",
        "pipeline": "disable_quant",
        "fast_attention": "restore_saved_plan",
    },
)


def _finish_pending_registration() -> None:
    """Called at the end of this package's modules: completes a registration deferred because the
    hook fired while one of them was being imported."""
    _REGISTRY.finish_pending(register_with_diffusers)


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)


# ---- DiffusionPipeline methods -------------------------------------------------------------------


def _enable_quant_method(self, config, calibration_prompts=None, **kwargs):
    """Quantize this pipeline's denoiser in place (piecewise-quant).

    Same as ``piecewise_quant.integrations.diffusers.enable_quant(pipe, config, calibration_prompts,
    **kwargs)``; see that function (or ``docs/diffusers.md``) for the options. Returns a
    ``DiffusionQuantReport``."""
    from .pipeline import enable_quant

    return enable_quant(self, config, calibration_prompts, **kwargs)


def _disable_quant_method(self, components=None):
    """Give the quantized components back their float layers (piecewise-quant).

    Same as ``piecewise_quant.integrations.diffusers.disable_quant(pipe, components)``."""
    from .pipeline import disable_quant

    return disable_quant(self, components)


def _enable_fast_attention_method(self, threshold=0.05, calibration_prompts=None, **kwargs):
    """Install DiTFastAttn on this pipeline's transformer, searching a per-step, per-layer plan
    (piecewise-quant).

    Same as ``piecewise_quant.integrations.diffusers.enable_fast_attention(pipe, threshold,
    calibration_prompts, **kwargs)``; see ``docs/fast-attention.md``. Returns a ``FastAttentionReport``."""
    from .fast_attention import enable_fast_attention

    return enable_fast_attention(self, threshold, calibration_prompts, **kwargs)


def _disable_fast_attention_method(self, component=None):
    """Put the original attention processors back (piecewise-quant)."""
    from .fast_attention import disable_fast_attention

    return disable_fast_attention(self, component)


_FA_CONFIG_KEY = "_fast_attention_plan"


def _restore_fast_attention(pipe: Any) -> None:
    """After ``DiffusionPipeline.from_pretrained``: re-enable a saved fast-attention plan."""
    comps = getattr(pipe, "components", None)
    if not isinstance(comps, dict):
        return
    if not any(hasattr(getattr(c, "config", None), "get") and c.config.get(_FA_CONFIG_KEY) for c in comps.values()):
        return
    from .fast_attention import restore_saved_plan

    restore_saved_plan(pipe)


def _wrap_from_pretrained(cls: Any) -> None:
    current = cls.__dict__.get("from_pretrained")
    if current is None or getattr(getattr(current, "__func__", None), "_piecewise_quant", False):
        return
    original = current.__func__

    def from_pretrained(klass, *args, **kwargs):
        pipe = original(klass, *args, **kwargs)
        try:
            _restore_fast_attention(pipe)
        except Exception as exc:  # the pipeline itself loaded fine: say why the plan did not come back
            warnings.warn(f"piecewise-quant could not re-enable the saved fast-attention plan: {exc}", RuntimeWarning,
                          stacklevel=2)
        return pipe

    from_pretrained.__doc__ = original.__doc__
    from_pretrained.__name__ = from_pretrained.__qualname__ = "from_pretrained"
    from_pretrained._piecewise_quant = True
    from_pretrained._piecewise_quant_original = current
    cls.from_pretrained = classmethod(from_pretrained)


def _unwrap_from_pretrained(cls: Any) -> None:
    current = cls.__dict__.get("from_pretrained")
    fn = getattr(current, "__func__", None)
    if getattr(fn, "_piecewise_quant", False):
        cls.from_pretrained = fn._piecewise_quant_original


_enable_fast_attention_method.__name__ = _enable_fast_attention_method.__qualname__ = "enable_fast_attention"
_disable_fast_attention_method.__name__ = _disable_fast_attention_method.__qualname__ = "disable_fast_attention"
_enable_fast_attention_method._piecewise_quant = True
_disable_fast_attention_method._piecewise_quant = True
_enable_quant_method.__name__ = _enable_quant_method.__qualname__ = "enable_quant"
_disable_quant_method.__name__ = _disable_quant_method.__qualname__ = "disable_quant"
_enable_quant_method._piecewise_quant = True
_disable_quant_method._piecewise_quant = True


def _attach_pipeline_methods(cls: Any = None) -> bool:
    """Add ``enable_quant``/``disable_quant`` to ``DiffusionPipeline`` (``cls``, or the class of the
    fully imported ``pipeline_utils``), never overwriting someone else's attribute. Returns whether
    they are attached. Imports nothing: it can run in the middle of diffusers' own imports."""
    if cls is None:
        module = sys.modules.get(_PIPELINE_MODULE)
        cls = getattr(module, "DiffusionPipeline", None) if module is not None else None
    if cls is None:
        return False
    for attr, fn in (
        ("enable_quant", _enable_quant_method),
        ("disable_quant", _disable_quant_method),
        ("enable_fast_attention", _enable_fast_attention_method),
        ("disable_fast_attention", _disable_fast_attention_method),
    ):
        existing = cls.__dict__.get(attr)
        if existing is not None and not getattr(existing, "_piecewise_quant", False):
            warnings.warn(
                f"DiffusionPipeline already has an attribute {attr!r}; piecewise-quant leaves it alone "
                f"(use piecewise_quant.integrations.diffusers.{attr}(pipe, ...) instead)",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        setattr(cls, attr, fn)
    _wrap_from_pretrained(cls)
    return True


def _install_subclass_hook(config_mixin: Any) -> None:
    """``DiffusionPipeline`` subclasses diffusers' ``ConfigMixin``: wrap its ``__init_subclass__``
    until ``DiffusionPipeline`` is created, attach the methods to it, then unwrap. Used when the
    autoload hook fires while ``pipeline_utils`` is half-imported (its class is not defined yet)."""
    if "_piecewise_quant_original" in config_mixin.__dict__:
        return
    original = config_mixin.__dict__.get("__init_subclass__")

    def unwrap() -> None:
        if "_piecewise_quant_original" not in config_mixin.__dict__:
            return
        del config_mixin._piecewise_quant_original
        if original is None:
            del config_mixin.__init_subclass__
        else:
            config_mixin.__init_subclass__ = original

    def __init_subclass__(cls, **kwargs):
        if original is not None:
            original.__get__(None, cls)(**kwargs)
        else:
            super(config_mixin, cls).__init_subclass__(**kwargs)
        if cls.__name__ == "DiffusionPipeline" and cls.__module__ == _PIPELINE_MODULE:
            unwrap()
            _attach_pipeline_methods(cls)

    config_mixin._piecewise_quant_original = original
    config_mixin.__init_subclass__ = classmethod(__init_subclass__)


class _AttachWhenReady:
    """A ``sys.meta_path`` entry used while ``DiffusionPipeline`` does not exist yet (the autoload
    hook runs in the middle of diffusers' own imports). If ``pipeline_utils`` has not started
    importing, it wraps that module's loader and attaches the methods right after it executes;
    if it is half-imported, it attaches at the first import after it has finished. Then it removes
    itself. It never finds a module of its own."""

    busy = False

    def _done(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        try:
            _attach_pipeline_methods()
        except Exception as exc:  # never break the host's import
            warnings.warn(f"piecewise-quant could not add DiffusionPipeline.enable_quant: {exc}", RuntimeWarning, stacklevel=2)

    def find_spec(self, fullname, path=None, target=None):
        module = sys.modules.get(_PIPELINE_MODULE)
        if module is not None and getattr(module, "DiffusionPipeline", None) is not None:
            self._done()
            return None
        if fullname != _PIPELINE_MODULE or module is not None or self.busy:
            return None
        self.busy = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        except Exception:
            return None
        finally:
            self.busy = False
        loader = getattr(spec, "loader", None)
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        attacher = self

        class _Loader:
            def create_module(self, s):
                create = getattr(loader, "create_module", None)
                return create(s) if create is not None else None

            def exec_module(self, mod):
                loader.exec_module(mod)
                attacher._done()

            def __getattr__(self, name):
                return getattr(loader, name)

        spec.loader = _Loader()
        return spec

    def invalidate_caches(self) -> None:
        pass


def _defer_attach() -> None:
    module = sys.modules.get("diffusers.configuration_utils")
    config_mixin = getattr(module, "ConfigMixin", None) if module is not None else None
    if config_mixin is not None:
        _install_subclass_hook(config_mixin)
    elif not any(isinstance(f, _AttachWhenReady) for f in sys.meta_path):
        sys.meta_path.insert(0, _AttachWhenReady())


# ---- registration ----------------------------------------------------------------------------------


def register_with_diffusers() -> None:
    """Register ``quant_method="piecewise"`` with diffusers (idempotent).

    * diffusers' ``AUTO_QUANTIZATION_CONFIG_MAPPING`` / ``AUTO_QUANTIZER_MAPPING`` get
      :class:`PiecewiseDiffusersConfig` / :class:`PiecewiseDiffusersQuantizer` (an entry someone
      else registered under ``"piecewise"`` is replaced with a warning);
    * transformers (when installed) gets its side too, which
      ``PipelineQuantizationConfig(quant_backend="piecewise")`` requires;
    * ``DiffusionPipeline`` gets ``enable_quant`` / ``disable_quant`` (now, or as soon as diffusers
      has finished importing it).

    If this runs while one of this package's modules is still being imported (importing it first
    imports diffusers, which fires the autoload hook), the registration is completed at the end of
    that import.
    """
    if _REGISTRY.defer():
        return
    from .config import PiecewiseDiffusersConfig
    from .quantizer import PiecewiseDiffusersQuantizer

    _REGISTRY.install(PiecewiseDiffusersConfig, PiecewiseDiffusersQuantizer)
    if importlib.util.find_spec("transformers") is not None:
        from ..transformers import is_registered as tf_registered
        from ..transformers import register_with_transformers

        if "transformers.quantizers.auto" not in sys.modules or not tf_registered():
            try:
                register_with_transformers()
            except Exception as exc:  # transformers broken or too old: diffusers-only use still works
                warnings.warn(
                    f"piecewise-quant could not register with transformers ({type(exc).__name__}: {exc}); "
                    "PipelineQuantizationConfig(quant_backend='piecewise') needs it, quant_mapping still works",
                    RuntimeWarning,
                    stacklevel=2,
                )
    if not _attach_pipeline_methods():
        _defer_attach()


def unregister_from_diffusers() -> None:
    """Remove piecewise-quant's entries from diffusers' mappings and ``DiffusionPipeline`` (tests use this)."""
    with _REGISTRY.lock:
        _REGISTRY.uninstall()
        module = sys.modules.get(_PIPELINE_MODULE)
        cls = getattr(module, "DiffusionPipeline", None) if module is not None else None
        if cls is not None:
            for attr in ("enable_quant", "disable_quant", "enable_fast_attention", "disable_fast_attention"):
                if getattr(cls.__dict__.get(attr), "_piecewise_quant", False):
                    delattr(cls, attr)
            _unwrap_from_pretrained(cls)


def is_registered() -> bool:
    """Whether diffusers currently maps ``"piecewise"`` to this integration's classes."""
    return _REGISTRY.is_registered()
