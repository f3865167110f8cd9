"""A quantized KV cache for transformers (v5 ``Cache`` API) and a fake-quant evaluation mode.

* :class:`QuantizedKVCache` stores packed codes (real memory savings), KIVI-style: keys are
  quantized a block of ``group_size`` tokens at a time once more than ``residual_length`` recent
  tokens are waiting (per-channel keys), values one token at a time as they leave the residual
  window; the first ``sink_tokens`` and the last ``residual_length`` tokens stay in full precision,
  and history is never re-quantized. Attention always sees what the cache stores, so with
  ``residual_length=0`` and per-token keys it stores exactly what :func:`kv_fake_quant` computes
  (decode steps then agree with it to float32 rounding). Sliding-window
  layers keep transformers' own (bounded, full-precision) sliding layer.
* Decoding (one new token) never dequantizes the history: the cache hands attention lazy K/V
  tensors, and transformers' ``"sdpa"`` attention (wrapped once, the first time a quantized cache
  decodes) runs :func:`piecewise_quant.kv.decode_attention` on the codes. Any other consumer of
  those tensors (eager attention, a custom model) gets them dequantized on first use, so results
  never depend on which attention runs.
* :func:`enable_kv_cache` makes plain ``model.generate()`` use it (the transformers quantizer calls
  it for checkpoints whose ``quantization_config`` declares ``kv_cache``).
* :func:`kv_fake_quant` reproduces QLLM-Eval's protocol: every new post-RoPE K/V is quantized
  (per token, groups along head_dim) before it enters whatever cache the model uses; no residual.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_map
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicCache, DynamicLayer

from piecewise_quant.args import KVArgs
from piecewise_quant.kv import (
    KVParts,
    KVQTensor,
    cat,
    decode_attention,
    fake_quantize_keys_values,
    fake_quantize_kv,
    key_rotation,
    quantize_kv,
    storage_bytes,
)
from piecewise_quant.kv_static import _modules_or_raise, _tapped, static_kv_fake_quant

FakeQuantizer = Callable[[torch.Tensor, KVArgs, str], torch.Tensor]

__all__ = [
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "LazyKV",
    "enable_kv_cache",
    "disable_kv_cache",
    "kv_fake_quant",
    "cache_bytes",
]


def _key_rotation(keys: torch.Tensor):
    """R3: the randomized Hadamard rotation of one head's keys (seed 0)."""
    return key_rotation(keys.shape[-1])


def _fused_enabled() -> bool:
    return os.environ.get("PIECEWISE_QUANT_KV_FUSED", "1") != "0"


class LazyKV(torch.Tensor):
    """The K or V tensor a :class:`QuantizedKVLayer` returns while decoding: its shape, dtype and
    device are those of the dense tensor, but it holds the layer's :class:`~piecewise_quant.kv.KVParts`
    (packed history included). The wrapped ``"sdpa"`` attention reads the parts directly; any other
    torch operation on it dequantizes it first (once), so every consumer sees the same values."""

    parts: KVParts

    @staticmethod
    def __new__(cls, parts: KVParts, dtype: torch.dtype) -> "LazyKV":
        b, h, _, d = parts.window.shape
        shape = (b, h, parts.tokens, d)
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=parts.window.device)
        self.parts = parts
        self._dense = None
        return self

    __torch_function__ = torch._C._disabled_torch_function_impl

    def dense(self) -> torch.Tensor:
        """The dequantized ``(B, H, T, D)`` tensor (computed once)."""
        if self._dense is None:
            self._dense = self.parts.dense(self.dtype)
        return self._dense

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.dense() if isinstance(t, LazyKV) else t  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))

    def __repr__(self) -> str:
        return f"LazyKV(shape={tuple(self.shape)}, dtype={self.dtype}, tokens={self.parts.tokens})"


_UNFUSABLE_KWARGS = ("softcap", "sliding_window", "s_aux", "position_bias", "sinks")


def _decode_mask(mask: torch.Tensor | None, b: int, t: int) -> tuple[bool, torch.Tensor | None]:
    """(ok, additive (B, T) float mask) from the mask transformers hands SDPA for one query token."""
    if mask is None:
        return True, None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != t or mask.shape[0] not in (1, b):
        return False, None
    m = mask[:, 0, 0, :].expand(b, t)
    if m.dtype == torch.bool:
        return True, torch.zeros(b, t).masked_fill_(~m, float("-inf"))
    return True, m.float()


def _fused_sdpa(module: nn.Module, query: torch.Tensor, key: LazyKV, value: LazyKV, attention_mask: Any,
                dropout: float, scaling: float | None, kwargs: dict) -> torch.Tensor | None:
    """The decode step from the codes, or ``None`` when this call needs the dense path."""
    b, hq, q_len, d = query.shape
    if (
        q_len != 1
        or (dropout and module.training)
        or kwargs.get("output_attentions")
        or any(kwargs.get(k) is not None for k in _UNFUSABLE_KWARGS)
        or hq % key.shape[1]
        or key.shape[0] != b
    ):
        return None
    ok, mask = _decode_mask(attention_mask, b, key.shape[2])
    if not ok:
        return None
    out = decode_attention(query[:, :, 0], key.parts, value.parts, d**-0.5 if scaling is None else scaling, mask)
    return out.unsqueeze(1)  # (B, 1, Hq, D): what transformers' sdpa_attention_forward returns


def _install_sdpa_wrapper() -> None:
    """Route transformers' global ``"sdpa"`` attention through :func:`_fused_sdpa` for
    :class:`LazyKV` inputs; every other call goes to the original function unchanged."""
    from transformers.modeling_utils import AttentionInterface

    current = AttentionInterface._global_mapping.get("sdpa")
    if current is None or getattr(current, "_piecewise_quant_kv", False):
        return

    @functools.wraps(current)
    def sdpa_with_quantized_kv(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if isinstance(key, LazyKV) and isinstance(value, LazyKV):
            out = _fused_sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)
            if out is not None:
                return out, None
            key, value = key.dense(), value.dense()
        return current(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    sdpa_with_quantized_kv._piecewise_quant_kv = True
    AttentionInterface.register("sdpa", sdpa_with_quantized_kv)


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
        keys, values = self.parts("key"), self.parts("value")
        quantized = keys.history is not None or values.history is not None
        if quantized and key_states.shape[-2] == 1 and self._fusable(keys, values, key_states):
            _install_sdpa_wrapper()
            return LazyKV(keys, self.dtype), LazyKV(values, self.dtype)
        return keys.dense(self.dtype), values.dense(self.dtype)

    def _fusable(self, keys: KVParts, values: KVParts, key_states: torch.Tensor) -> bool:
        return (
            _fused_enabled()
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and key_states.requires_grad)
            and keys.fusable()
            and values.fusable()
        )

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

    def parts(self, which: str) -> KVParts:
        """A snapshot of what this layer stores for ``"key"`` or ``"value"``, in token order."""
        if which == "key":
            return KVParts(self.sink_keys, self.qkeys, self.keys, self.args.key_rotation)
        return KVParts(self.sink_values, self.qvalues, self.values)

    def _stored(self, which: str) -> torch.Tensor:
        """What attention sees: sinks, the dequantized history and the window, in token order."""
        return self.parts(which).dense(self.dtype)

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
        if fake_quantize is not fake_quantize_kv:
            raise ValueError("static KV scales are applied by piecewise_quant.kv_static; fake_quantize= does not apply to them")
        with static_kv_fake_quant(model):
            yield model
        return
    def quantize(_module: nn.Module, key_states: torch.Tensor, value_states: torch.Tensor):
        return fake_quantize_keys_values(key_states, value_states, args, fake_quantize)

    with _tapped(_modules_or_raise(model, "kv_fake_quant"), lambda _name: quantize):
        yield model
