"""A quantized KV cache for transformers (v5 ``Cache`` API) and a fake-quant evaluation mode.

* :class:`QuantizedKVCache` stores packed codes (real memory savings), KIVI-style: keys are
  quantized a block of ``group_size`` tokens at a time once more than ``residual_length`` recent
  tokens are waiting (per-channel keys), values one token at a time as they leave the residual
  window; the first ``sink_tokens`` and the last ``residual_length`` tokens stay in full precision,
  and history is never re-quantized. Attention always sees what the cache stores, so with
  ``residual_length=0`` and per-token keys it equals :func:`kv_fake_quant` exactly. Sliding-window
  layers keep transformers' own (bounded, full-precision) sliding layer.
* :func:`enable_kv_cache` makes plain ``model.generate()`` use it (the transformers quantizer calls
  it for checkpoints whose ``quantization_config`` declares ``kv_cache``).
* :func:`kv_fake_quant` reproduces QLLM-Eval's protocol: every new post-RoPE K/V is quantized
  (per token, groups along head_dim) before it enters whatever cache the model uses; no residual.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicCache, DynamicLayer

from piecewise_quant.args import KVArgs
from piecewise_quant.kv import KVQTensor, cat, dequantize_kv, fake_quantize_kv, quantize_kv, storage_bytes

FakeQuantizer = Callable[[torch.Tensor, KVArgs, str], torch.Tensor]

__all__ = ["QuantizedKVCache", "QuantizedKVLayer", "enable_kv_cache", "disable_kv_cache", "kv_fake_quant", "cache_bytes"]


def _key_rotation(keys: torch.Tensor):
    """R3: the randomized Hadamard rotation of one head's keys (seed 0)."""
    from piecewise_quant.kernels.hadamard import get_rotation

    return get_rotation(keys.shape[-1], 0, "R3")


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's quantized cache (see the module docstring).

    State, in token order: ``sink_*`` (full precision), the packed history ``qkeys``/``qvalues``,
    then the full-precision residual ``keys``/``values``. Keys and values flush independently.
    """

    is_croppable = False

    def __init__(self, args: KVArgs) -> None:
        super().__init__()
        self.args = args
        self.cumulative_length = 0
        self.qkeys: KVQTensor | None = None
        self.qvalues: KVQTensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states[:, :, :0]
        self.keys, self.values = empty.clone(), empty.clone()
        self.sink_keys, self.sink_values = empty.clone(), empty.clone()
        self.qkeys = self.qvalues = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        need = self.args.sink_tokens - self.sink_keys.shape[-2]
        if need > 0:
            self.sink_keys = torch.cat([self.sink_keys, key_states[:, :, :need]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[:, :, :need]], dim=-2)
            key_states, value_states = key_states[:, :, need:], value_states[:, :, need:]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._flush()
        return self._stored("key"), self._stored("value")

    def _flush(self) -> None:
        """Quantize what left the residual window: whole key blocks, single values."""
        a = self.args
        for which in ("key", "value"):
            fp = self.keys if which == "key" else self.values
            n = fp.shape[-2] - a.residual_length
            if a.for_axis(which) == "channel":
                n = (n // a.group_size) * a.group_size
            if n <= 0:
                continue
            part = fp[:, :, :n]
            if which == "key" and a.key_rotation:
                part = _key_rotation(part)(part)
            q = quantize_kv(part, a, a.for_axis(which))
            rest = fp[:, :, n:].clone()  # a slice would keep the whole old tensor allocated
            if which == "key":
                self.qkeys = q if self.qkeys is None else cat([self.qkeys, q])
                self.keys = rest
            else:
                self.qvalues = q if self.qvalues is None else cat([self.qvalues, q])
                self.values = rest

    def _stored(self, which: str) -> torch.Tensor:
        """What attention sees: sinks, the dequantized history and the window, in token order."""
        sink, q, fp = (
            (self.sink_keys, self.qkeys, self.keys) if which == "key" else (self.sink_values, self.qvalues, self.values)
        )
        history = None
        if q is not None:
            history = dequantize_kv(q, self.dtype)
            if which == "key" and self.args.key_rotation:
                history = _key_rotation(history)(history, inverse=True)
        parts = [t for t in (sink, history, fp) if t is not None and t.shape[-2]]
        if not parts:
            return fp
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def get_seq_length(self) -> int:
        return self.cumulative_length if self.is_initialized else 0

    def nbytes(self) -> int:
        """Bytes allocated for this layer's stored states (codes, metadata, full-precision parts)."""
        if not self.is_initialized:
            return 0
        ts = [self.keys, self.values, self.sink_keys, self.sink_values]
        for q in (self.qkeys, self.qvalues):
            if q is not None:
                ts += q.tensors()
        return storage_bytes(ts)

    def _apply(self, fn) -> None:
        """Apply ``fn`` (a batch selection) to every stored tensor."""
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.qkeys = None if self.qkeys is None else self.qkeys.map(fn)
        self.qvalues = None if self.qvalues is None else self.qvalues.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # codes are reordered losslessly, so no deferral is needed (unlike transformers' QuantizedLayer)
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a quantized KV cache cannot be cropped (its history is packed); use a DynamicCache for assisted/"
            "speculative decoding"
        )

    def reset(self) -> None:
        self.keys = self.values = None
        self.qkeys = self.qvalues = None
        self.is_initialized = False
        self.cumulative_length = 0

    def offload(self) -> None:
        pass  # packed states stay where they are

    def prefetch(self) -> None:
        pass


def _layers_for(config: Any, args: KVArgs) -> list[Any]:
    """One layer per decoder layer: quantized for full attention, transformers' own for the rest
    (sliding/chunked windows are bounded: they stay in full precision)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, per_layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return [
        QuantizedKVLayer(args) if kind == "full_attention" else DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs)
        for kind, kwargs in zip(layer_types, per_layer_kwargs)
    ]


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` whose full-attention layers store packed K/V codes.

    Args:
        kv: a :class:`~piecewise_quant.args.KVArgs` or a dict of its fields (copied, never modified).
        config: the model's config (``model.config``): layer types (sliding windows) are read from it.
            Without it, every layer is a :class:`QuantizedKVLayer`, created as the model reaches it.

    ::

        cache = QuantizedKVCache(KVArgs(bits=4, group_size=32, residual_length=128), model.config)
        model.generate(**inputs, past_key_values=cache)
    """

    def __init__(self, kv: KVArgs | Mapping[str, Any] | None = None, config: Any = None) -> None:
        self.kv = KVArgs.coerce(dict(kv) if isinstance(kv, Mapping) else kv) or KVArgs()
        if config is not None:
            super().__init__(layers=_layers_for(config, self.kv))
        else:
            super().__init__(layer_class_to_replicate=functools.partial(QuantizedKVLayer, self.kv))

    def nbytes(self) -> int:
        """Bytes allocated for every layer's stored states (measured from the tensors' storages)."""
        return cache_bytes(self)


def cache_bytes(cache: Cache) -> int:
    """Allocated bytes of a cache's stored K/V: :meth:`QuantizedKVLayer.nbytes` for quantized
    layers, the ``keys``/``values`` storages for any other layer (e.g. a ``DynamicCache``)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, QuantizedKVLayer):
            total += layer.nbytes()
        elif getattr(layer, "is_initialized", False):
            total += storage_bytes([layer.keys, layer.values])
    return total


# ---- plain generate() ----------------------------------------------------------------------------


def _prepare_cache_with_kv(self: nn.Module, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
    """``_prepare_cache_for_generation`` for a model with a KV scheme: what transformers would do,
    then its default ``DynamicCache`` (never a cache the caller passed) becomes a quantized one."""
    user_cache = model_kwargs.get("past_key_values")
    result = type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
    made = model_kwargs.get("past_key_values")
    if (
        user_cache is None
        and type(made) is DynamicCache
        and not made.offloading
        and not getattr(generation_config, "is_assistant", False)
    ):
        model_kwargs["past_key_values"] = QuantizedKVCache(self.piecewise_quant_kv, self.config)
    return result


def enable_kv_cache(model: nn.Module, kv: KVArgs | Mapping[str, Any] | None = None) -> nn.Module:
    """Make ``model.generate()`` use a :class:`QuantizedKVCache` whenever it would create its default
    ``DynamicCache`` (a cache passed as ``past_key_values=`` or a ``cache_implementation`` still wins).

    ``kv`` defaults to the ``kv_cache`` of the model's piecewise-quant config. Only this model
    instance changes; :func:`disable_kv_cache` undoes it.
    """
    if kv is None:
        config = getattr(model, "piecewise_quant_config", None)
        kv = getattr(config, "kv_cache", None)
        if kv is None:
            raise ValueError("this model's piecewise-quant config declares no kv_cache; pass kv=KVArgs(...)")
    model.piecewise_quant_kv = KVArgs.coerce(dict(kv) if isinstance(kv, Mapping) else kv)
    if model.piecewise_quant_kv.static_scales:  # one calibrated scale per layer (piecewise_quant.kv_static)
        from piecewise_quant.kv_static import enable_static_kv

        return enable_static_kv(model)
    # a bound method in the instance dict: deepcopy rebinds it to the copy
    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_with_kv, model)
    return model


def disable_kv_cache(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_kv_cache`: ``generate()`` uses transformers' default cache again."""
    model.__dict__.pop("_prepare_cache_for_generation", None)
    model.__dict__.pop("piecewise_quant_kv", None)
    from piecewise_quant.kv_static import disable_static_kv

    return disable_static_kv(model)


# ---- fake-quant evaluation mode ------------------------------------------------------------------


class _FakeQuantUpdate:
    """Stands in for the cache an attention module receives: quantizes the new K/V, then hands
    them to the real cache (or returns them, when the model runs without a cache)."""

    def __init__(self, inner: Any, args: KVArgs, fn: FakeQuantizer) -> None:
        self._inner = inner
        self._args = args
        self._fn = fn

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        a = self._args
        if a.key_rotation:
            rot = _key_rotation(key_states)
            k = rot(self._fn(rot(key_states), a, a.key_axis), inverse=True)
        else:
            k = self._fn(key_states, a, a.key_axis)
        v = self._fn(value_states, a, a.value_axis)
        if self._inner is None:
            return k, v
        return self._inner.update(k, v, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def _cache_kwarg(module: nn.Module) -> str | None:
    params = inspect.signature(module.forward).parameters
    for name in ("past_key_values", "past_key_value"):  # renamed in transformers#39956
        if name in params:
            return name
    return None


def _attention_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    found = []
    for module in model.modules():
        if hasattr(module, "layer_idx") and "attention" in type(module).__name__.lower():
            name = _cache_kwarg(module)
            if name is not None:
                found.append((module, name))
    return found


@contextlib.contextmanager
def kv_fake_quant(
    model: nn.Module, kv: KVArgs | Mapping[str, Any], fake_quantize: FakeQuantizer = fake_quantize_kv
) -> Iterator[nn.Module]:
    """Within the block, every attention module of ``model`` fake-quantizes its new post-RoPE keys
    and values (``fake_quantize(states, kv, axis)``, by default
    :func:`piecewise_quant.kv.fake_quantize_kv`) as they enter the cache, with or without one:
    QLLM-Eval's protocol when ``kv`` has ``key_axis="token"`` (the residual window and sink tokens
    are not used). Works with any ``Cache`` class. ``fake_quantize`` lets an experiment try
    another grid with the same protocol.
    """
    args = KVArgs.coerce(dict(kv) if isinstance(kv, Mapping) else kv)
    if args.static_scales:  # the model's calibrated per-layer scales (piecewise_quant.kv_static)
        from piecewise_quant.kv_static import static_kv_fake_quant

        if fake_quantize is not fake_quantize_kv:
            raise ValueError("static KV scales are applied by piecewise_quant.kv_static; fake_quantize= does not apply to them")
        with static_kv_fake_quant(model):
            yield model
        return
    found = _attention_modules(model)
    if not found:
        raise ValueError(
            "kv_fake_quant found no attention module (a module with layer_idx whose forward takes past_key_values)"
        )

    def hook_for(kwarg: str):
        def hook(module: nn.Module, args_: tuple, kwargs: dict):
            kwargs[kwarg] = _FakeQuantUpdate(kwargs.get(kwarg), args, fake_quantize)
            return args_, kwargs

        return hook

    handles = [m.register_forward_pre_hook(hook_for(kwarg), with_kwargs=True) for m, kwarg in found]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
