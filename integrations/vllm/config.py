"""``PiecewiseVllmConfig``: the ``"piecewise"`` quantization method of vLLM.

Two modes, chosen from what the checkpoint holds:

* **pre-quantized**: ``config.json`` has ``quantization_config.quant_method == "piecewise"`` and
  the safetensors hold ``qweight`` tensors (what ``save_pretrained`` writes). The layers load the
  saved codes as they are.
* **online**: a float checkpoint served with ``--quantization piecewise``. vLLM builds the config
  with no arguments (the default :class:`~piecewise_quant.PiecewiseQuantConfig`), or from
  ``--hf-overrides '{"quantization_config_file": "recipe.json"}'``, or from
  ``--hf-overrides '{"quantization_config": {"quant_method": "piecewise", "bits": 3, ...}}'``;
  each layer is quantized right after its float weight is loaded.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from piecewise_quant.checkpoint import check_marker, read_headers
from piecewise_quant.config import QUANT_METHOD, PiecewiseQuantConfig

from .kv_cache import PiecewiseKVCacheMethod, attention_classes, check_servable, kv_cache_scheme

__all__ = ["PiecewiseVllmConfig"]

logger = logging.getLogger(__name__)

_MODES = ("prequantized", "online", "auto")


def _core_from_dict(data: Any, where: str) -> PiecewiseQuantConfig:
    try:
        return PiecewiseQuantConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"piecewise-quant: {where} is invalid: {exc}") from None


FP4_NAMES = ("mxfp4", "nvfp4")


def _refuse_fp4(core: PiecewiseQuantConfig) -> None:
    """FP4 (``mxfp4`` / ``nvfp4``) weights or activations are not served by this method: nvfp4's
    per-tensor scale cannot be split or fused as vLLM's sharded and fused layers need, and neither
    format has been validated in a vLLM engine. Refuse at config time, naming the format."""
    specs = [("the default scheme", core.default_spec)]
    specs += [(f"overrides[{p!r}]", s) for p, s in core.override_schemes.items() if s is not None]
    for where, s in specs:
        fmt = s.grid if s.grid in FP4_NAMES else (s.act_format if s.act_bits is not None and s.act_format in FP4_NAMES
                                                   else None)
        if fmt is not None:
            what = "weights" if s.grid == fmt else "activations"
            raise ValueError(
                f"piecewise-quant: {where} uses {fmt} {what} (FP4 E2M1 with block scales), which the vLLM method does not "
                f"serve; run this checkpoint in transformers (from_pretrained) or diffusers, or quantize for vLLM with "
                f"grid='uniform' or 'piecewise' (and act_format='int' or 'fp8')"
            )


@register_quantization_config(QUANT_METHOD)
class PiecewiseVllmConfig(QuantizationConfig):
    """vLLM face of a :class:`~piecewise_quant.PiecewiseQuantConfig`.

    ``mode`` is ``"prequantized"``, ``"online"``, or ``"auto"`` (decided when vLLM calls
    :meth:`maybe_update_config` with the model directory: ``qweight`` tensors in the safetensors
    mean pre-quantized)."""

    def __init__(self, core: PiecewiseQuantConfig | None = None, mode: str = "online") -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}; got {mode!r}")
        self.core = core if core is not None else PiecewiseQuantConfig()
        if self.core.kv_cache is not None:
            check_servable(self.core.kv_cache)  # only static per-tensor FP8 (integrations/vllm/kv_cache.py)
        # read by vLLM's Attention: with a scheme, --kv-cache-dtype auto becomes fp8
        self.kv_cache_scheme = kv_cache_scheme(self.core.kv_cache)
        _refuse_fp4(self.core)
        self.mode = mode
        self.headers: dict[str, tuple[tuple[int, ...], str, str]] | None = None
        self._mapper: Any = None
        if mode == "online":
            self._check_online()

    def __repr__(self) -> str:
        return f"PiecewiseVllmConfig(mode={self.mode!r}, core={self.core!r})"

    @property
    def prequantized(self) -> bool:
        return self.mode != "online"

    def _check_online(self) -> None:
        core = self.core
        specs = [core.default_spec, *(core._override_spec(p, c) for p, c in core.overrides.items() if c.get("grid") != "none")]
        if any(s.act_bits is not None and s.act_mode == "static_per_tensor" for s in specs):
            raise ValueError(
                "piecewise-quant: online quantization in vLLM has no calibration data, so it cannot set static activation "
                "scales (act_mode='static_per_tensor'); use act_mode='dynamic_per_token', or calibrate with piecewise-quant "
                "(from_pretrained + save_pretrained) and serve the saved checkpoint"
            )
        if core.rotation is not None:
            raise ValueError(
                "piecewise-quant: a rotation (rotation=...) changes weights across layers (embeddings, norms, lm_head), "
                "which vLLM's on-load quantization cannot do layer by layer; quantize with piecewise-quant "
                "(quantize()/calibrate() or from_pretrained, then save_pretrained) and serve the saved directory"
            )
        if core.kv_cache is not None and core.kv_cache.static_scales:
            raise ValueError(
                "piecewise-quant: static FP8 KV scales (kv_cache.static_scales=True) are calibrated on data, which online "
                "quantization in vLLM does not have; calibrate with piecewise-quant (calibrate() or from_pretrained with "
                "calibration=...), save, and serve the saved directory, or pass vLLM's own --kv-cache-dtype fp8 instead"
            )
        if core.calibration is not None:
            raise ValueError(
                "piecewise-quant: a calibrated recipe (calibration=...) needs calibration data, which online quantization in "
                "vLLM does not have; run it with piecewise-quant (from_pretrained(..., quantization_config=...) then "
                "save_pretrained) and serve the saved directory"
            )

    # ---- QuantizationConfig API ------------------------------------------------------------------

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # the Triton kernels need Volta or newer; ignored on CPU

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # no file: `--quantization piecewise` on a float checkpoint builds the default config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PiecewiseVllmConfig":
        """From ``config.json``'s ``quantization_config`` (or ``--hf-overrides``' one)."""
        return cls(_core_from_dict(config, "the checkpoint's config.json quantization_config"), mode="auto")

    @classmethod
    def from_config_file(cls, path: str) -> "PiecewiseVllmConfig":
        """From ``--hf-overrides '{"quantization_config_file": "recipe.json"}'`` (online)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"piecewise-quant: quantization_config_file {path!r} does not exist")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"piecewise-quant: quantization_config_file {path!r} is not valid JSON: {exc}") from None
        return cls(_core_from_dict(data, f"quantization_config_file {path!r}"), mode="online")

    @classmethod
    def from_config_dict_json(cls, text: str) -> "PiecewiseVllmConfig":
        """From ``--hf-overrides '{"quantization_config_dict_json": "{...}"}'`` (online)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"piecewise-quant: quantization_config_dict_json is not valid JSON: {exc}") from None
        return cls(_core_from_dict(data, "quantization_config_dict_json"), mode="online")

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: Any, user_quant: str | None, hf_config: Any = None) -> str | None:
        method = hf_quant_cfg.get("quant_method") if isinstance(hf_quant_cfg, dict) else None
        if method == QUANT_METHOD:
            return QUANT_METHOD
        if user_quant == QUANT_METHOD and method is not None:
            raise ValueError(
                f"piecewise-quant: --quantization piecewise was asked for, but this checkpoint is already quantized with "
                f"{method!r} (config.json quantization_config.quant_method={method!r}). Serve it without --quantization "
                f"to use vLLM's {method!r} support, or quantize the float model with piecewise-quant"
            )
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        self._mapper = hf_to_vllm_mapper

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Read the checkpoint's safetensors headers (no tensor data) to decide the mode and to
        check every planned tensor's shape before loading."""
        files = sorted(glob.glob(os.path.join(model_name, "*.safetensors"))) if os.path.isdir(model_name) else []
        if not files:
            if self.mode == "auto":
                self.mode = "prequantized"
            return
        self.headers = read_headers(files)
        if self.mode == "auto":
            has_codes = any(k.endswith(".qweight") for k in self.headers)
            self.mode = "prequantized" if has_codes else "online"
            if self.mode == "online":
                self._check_online()
        if self.mode == "prequantized":
            check_marker(files, self.core, where=model_name)  # config.json edited after saving
        elif self.mode == "online" and any(k.endswith(".qweight") for k in self.headers):
            raise ValueError(
                f"piecewise-quant: {model_name} is already quantized (it holds qweight tensors) but an online "
                "quantization config was passed through --hf-overrides; drop the override to serve it as saved"
            )

    def vllm_headers(self) -> dict[str, tuple[tuple[int, ...], str, str]] | None:
        """The checkpoint's tensor headers under vLLM's module names."""
        if self.headers is None:
            return None
        if self._mapper is None:
            return self.headers
        map_name = getattr(self._mapper, "map_name", None) or self._mapper._map_name  # older vLLM: _map_name only
        out = {}
        for key, value in self.headers.items():
            mapped = map_name(key)
            if mapped is not None:
                out[mapped] = value
        return out

    # ---- per layer ---------------------------------------------------------------------------

    def projections(self, prefix: str) -> list[str]:
        """The checkpoint modules behind vLLM layer ``prefix`` (``qkv_proj`` -> q/k/v_proj)."""
        base, _, last = prefix.rpartition(".")
        subs = self.packed_modules_mapping.get(last)
        if not subs:
            return [prefix]
        headers = self.vllm_headers()
        if headers and any(f"{prefix}.{t}" in headers for t in ("qweight", "weight")):
            return [prefix]  # fused on disk
        return [f"{base}.{s}" if base else s for s in subs]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        # imported here, not at registration: vLLM's layer modules load its compiled kernels
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        from .linear import PiecewiseLinearMethod

        if isinstance(layer, LinearBase):
            names = self.projections(prefix)
            specs = [self.core.spec_for(n) for n in names]
            if self.prequantized:
                self._check_float_layers(names, specs)
            if all(s is None for s in specs):
                return UnquantizedLinearMethod()
            return PiecewiseLinearMethod(self, prefix, names, specs)
        if self.kv_cache_scheme is not None and isinstance(layer, attention_classes()):
            return PiecewiseKVCacheMethod.for_layer(self, layer, prefix)
        headers = self.vllm_headers() or {}
        if self.prequantized and any(k.startswith(prefix + ".") and k.endswith(".qweight") for k in headers):
            raise NotImplementedError(
                f"piecewise-quant: the checkpoint quantizes {prefix} ({type(layer).__name__}), which the piecewise vLLM "
                "method serves only as a float layer; re-quantize with it left in float (modules_to_not_convert)"
            )
        return None

    def _check_float_layers(self, names: list[str], specs: list[Any]) -> None:
        headers = self.vllm_headers()
        if not headers:
            return
        for name, spec in zip(names, specs):
            if spec is None and f"{name}.qweight" in headers:
                raise ValueError(
                    f"piecewise-quant: the checkpoint holds quantized tensors for {name!r} but its quantization_config "
                    "leaves that module in float (modules_to_not_convert / grid 'none'); the config and the weights "
                    "do not belong together"
                )
