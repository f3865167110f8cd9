"""FP8 E4M3 weights with one scale per output channel (or per tensor).

Stored tensors: ``qweight`` (``torch.float8_e4m3fn``) and ``scales``; cost ``8 + 16 / in_features``
bits per weight with float16 scales. Values are scaled so the channel's range maps to +-448 (the
largest finite E4M3 number; the ``mse`` observer may shrink it) and rounded to nearest.
"""

from __future__ import annotations

import torch

from ..config import LayerSpec, QuantSpec
from ..kernels import reference as ref
from .base import TensorLayout, WeightFormat, round_scale, scale_dtype_of
from .defaults import BUILTIN_DEFAULTS
from .groups import group_view

__all__ = ["FP8Format", "FP8_MAX"]

FP8_MAX = 448.0
SHRINK = torch.linspace(1.0, 0.5, 11, dtype=torch.float32)


def _fake(groups: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)
    q = torch.clamp(groups / safe, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.to(torch.float32) * safe * (s > 0).unsqueeze(1)


class FP8Format(WeightFormat):
    name = "fp8"
    supported_bits = (8,)
    supports_groups = False

    def validate(self, spec: QuantSpec) -> None:
        if spec.bits != 8:
            raise ValueError(f"bits={spec.bits} is not supported by grid 'fp8'; allowed: 8")
        if spec.group_size not in ("channel", "tensor"):
            raise ValueError(f"grid 'fp8' uses per-channel or per-tensor scales; "
                             f"group_size must be 'channel' or 'tensor', not {spec.group_size!r}")
        if spec.observer not in ("mse", "minmax"):
            raise ValueError(f"grid 'fp8' supports observer 'mse' or 'minmax', not {spec.observer!r}")

    default_bits, default_group_size, default_symmetric = BUILTIN_DEFAULTS["fp8"]

    def kernel_format(self, spec: QuantSpec) -> str:
        return "fp8_e4m3"

    def levels(self, tensors: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
        values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
        values = values[torch.isfinite(values)].unique().to(tensors["scales"].device)
        return values.view(1, 1, -1) * tensors["scales"].to(torch.float32).unsqueeze(-1)

    def layout(self, layer: LayerSpec) -> dict[str, TensorLayout]:
        rows = 1 if layer.group_size == -1 else layer.out_features
        return {
            "qweight": TensorLayout((layer.out_features, layer.in_features), torch.float8_e4m3fn),
            "scales": TensorLayout((rows, 1), scale_dtype_of(layer.spec)),
        }

    def fit(self, groups: torch.Tensor, layer: LayerSpec, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        amax = groups.abs().amax(dim=1)
        s = amax / FP8_MAX
        if layer.spec.observer == "mse":
            best_err = torch.full_like(s, float("inf"))
            best = s.clone()
            for f in SHRINK.tolist():
                sq = (_fake(groups, s * f) - groups).pow(2)
                err = (sq if importance is None else sq * importance).sum(dim=1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, s * f, best)
            s = best
        return {"scale": round_scale(s, scale_dtype_of(layer.spec), layer.name).to(torch.float32)}

    def fake_quantize(self, x: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
        return _fake(x, params["scale"])

    def encode(self, weight: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec) -> dict[str, torch.Tensor]:
        groups = group_view(weight.detach().to(torch.float32), layer)
        sf = params["scale"]
        safe = torch.where(sf > 0, sf, torch.ones_like(sf)).unsqueeze(1)
        q = torch.clamp(groups / safe, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        rows = 1 if layer.group_size == -1 else layer.out_features
        return {
            "qweight": q.reshape(layer.out_features, layer.in_features),
            "scales": sf.to(scale_dtype_of(layer.spec)).reshape(rows, 1),
        }

    def quantize(self, weight: torch.Tensor, layer: LayerSpec) -> dict[str, torch.Tensor]:
        groups = group_view(weight.detach().to(torch.float32), layer)
        return self.encode(weight, self.fit(groups, layer), layer)

    def dequantize(self, tensors: dict[str, torch.Tensor], layer: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
        return ref.dequantize(tensors["qweight"], tensors["scales"], None, "fp8_e4m3", 8, layer.group_size, layer.in_features,
                              dtype)
