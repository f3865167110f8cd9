"""Uniform integer grid: 2/3/4/8-bit codes, symmetric or asymmetric, per group/channel/tensor.

Stored tensors: ``qweight`` (densely packed codes, uint8), ``scales`` (one per group) and, when
asymmetric, ``qzeros`` (b-bit zero points, packed the same way). Cost per weight:
``b + (16 + b) / group_size`` bits asymmetric, ``b + 16 / group_size`` symmetric (float16 scales).
"""

from __future__ import annotations

import torch

from ..config import LayerSpec, QuantSpec
from ..kernels import pack_codes, packed_length
from ..kernels import reference as ref
from ..observers import mse_observer, uniform_codes, uniform_fake_quant, uniform_scale, zero_point
from .base import TensorLayout, WeightFormat, round_scale, scale_dtype_of
from .defaults import BUILTIN_DEFAULTS
from .groups import group_view, observer_for

__all__ = ["UniformFormat"]

CHUNK_GROUPS = 1 << 15


class UniformFormat(WeightFormat):
    name = "uniform"
    supported_bits = (2, 3, 4, 8)

    aux_tensor = "qzeros"
    default_bits, default_group_size, default_symmetric = BUILTIN_DEFAULTS["uniform"]

    def kernel_format(self, spec: QuantSpec) -> str:
        return "uniform_sym" if spec.symmetric else "uniform_asym"

    def levels(self, tensors: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
        spec = layer.spec
        rows = 1 if layer.group_size == -1 else layer.out_features
        s = tensors["scales"].to(torch.float32).unsqueeze(-1)
        codes = torch.arange(1 << spec.bits, dtype=torch.float32, device=s.device).view(1, 1, -1)
        if spec.symmetric:
            return (codes - (1 << (spec.bits - 1))) * s
        z = ref.unpack_group_field(tensors["qzeros"], spec.bits, rows, layer.n_groups).to(torch.float32)
        return (codes - z.unsqueeze(-1)) * s

    def layout(self, layer: LayerSpec) -> dict[str, TensorLayout]:
        spec = layer.spec
        rows = 1 if layer.group_size == -1 else layer.out_features
        out = {
            "qweight": TensorLayout((layer.out_features, packed_length(layer.in_features, spec.bits)), torch.uint8),
            "scales": TensorLayout((rows, layer.n_groups), scale_dtype_of(spec)),
        }
        if not spec.symmetric:
            out["qzeros"] = TensorLayout((layer.n_groups, packed_length(rows, spec.bits)), torch.uint8)
        return out

    def fit(self, groups: torch.Tensor, layer: LayerSpec, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Scale and zero point per group (``scale`` is the stored, rounded value, as float32)."""
        spec = layer.spec
        bits, sym = spec.bits, bool(spec.symmetric)
        observer = observer_for(spec.observer)
        scales, los = [], []
        imp_chunks = importance.split(CHUNK_GROUPS) if importance is not None else [None] * len(groups.split(CHUNK_GROUPS))
        for chunk, imp in zip(groups.split(CHUNK_GROUPS), imp_chunks):
            if imp is not None and spec.observer == "mse":
                lo, hi = mse_observer(chunk, bits, sym, importance=imp)
            else:
                lo, hi = observer(chunk, bits, sym)
            scales.append(uniform_scale(lo, hi, bits, sym))
            los.append(lo)
        s = round_scale(torch.cat(scales), scale_dtype_of(spec), layer.name).to(torch.float32)
        # the zero point is rounded against the stored scale, as the kernels will see it
        z = zero_point(torch.cat(los), s, bits, sym)
        return {"scale": s, "zero": z}

    def fake_quantize(self, x: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
        return uniform_fake_quant(x, params["scale"], params["zero"], layer.spec.bits)

    def encode(self, weight: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec) -> dict[str, torch.Tensor]:
        spec = layer.spec
        groups = group_view(weight.detach().to(torch.float32), layer)
        s, z = params["scale"], params["zero"]
        q = uniform_codes(groups, s, z, spec.bits).to(torch.int32)
        rows = 1 if layer.group_size == -1 else layer.out_features
        out = {
            "qweight": pack_codes(q.reshape(layer.out_features, layer.in_features), spec.bits),
            "scales": s.to(scale_dtype_of(spec)).reshape(rows, layer.n_groups),
        }
        if not spec.symmetric:
            out["qzeros"] = ref.pack_group_field(z.to(torch.int32).reshape(rows, layer.n_groups), spec.bits)
        return out

    def quantize(self, weight: torch.Tensor, layer: LayerSpec) -> dict[str, torch.Tensor]:
        groups = group_view(weight.detach().to(torch.float32), layer)
        return self.encode(weight, self.fit(groups, layer), layer)

    def dequantize(self, tensors: dict[str, torch.Tensor], layer: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
        spec = layer.spec
        return ref.dequantize(
            tensors["qweight"], tensors["scales"], tensors.get("qzeros"), self.kernel_format(spec),
            spec.bits, layer.group_size, layer.in_features, dtype,
        )


    # ---- calibration hooks (LWC)
    # Learnable weight clipping (piecewise_quant.calibration.lwc) learns clipping strengths in
    # (0, 1) per group; these hooks say what the strengths clip: the group's max and its min.

    def lwc_init(self, groups: torch.Tensor, layer: LayerSpec, params: dict[str, torch.Tensor],
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The clipping strengths that reproduce the fitted ``params`` (the scale's share of the
        full group range; ``hi`` shrinks the max, ``lo`` the min) and the tensors kept fixed (none)."""
        spec = layer.spec
        mn = groups.amin(dim=1).clamp(max=0)
        mx = groups.amax(dim=1).clamp(min=0)
        full = uniform_scale(mn, mx, spec.bits, bool(spec.symmetric)).abs()
        f0 = params["scale"].abs() / full.clamp(min=1e-12)
        return {"hi": f0, "lo": f0.clone()}, {}

    def lwc_params(self, groups: torch.Tensor, layer: LayerSpec, strength: dict[str, torch.Tensor],
                   fixed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Differentiable group parameters (scale not yet rounded) for the clipping ``strength``."""
        bits, sym = layer.spec.bits, bool(layer.spec.symmetric)
        lo = strength["lo"] * groups.amin(dim=1).clamp(max=0)
        hi = strength["hi"] * groups.amax(dim=1).clamp(min=0)
        s = uniform_scale(lo, hi, bits, sym)
        return {"scale": s, "zero": zero_point(lo.detach(), s.detach(), bits, sym)}

    def lwc_final_params(self, groups: torch.Tensor, layer: LayerSpec, strength: dict[str, torch.Tensor],
                         fixed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stored-precision group parameters: the rounded scale, the zero point rounded against it."""
        spec = layer.spec
        p = self.lwc_params(groups, layer, strength, fixed)
        s = round_scale(p["scale"].detach(), scale_dtype_of(spec), layer.name).to(torch.float32)
        lo = strength["lo"] * groups.amin(dim=1).clamp(max=0)
        return {"scale": s, "zero": zero_point(lo, s, spec.bits, bool(spec.symmetric))}
