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
from .base import TensorLayout, WeightFormat, round_scale, scale_dtype_of
from ..observers import uniform_codes, uniform_scale, zero_point
from .groups import group_view, observer_for

__all__ = ["UniformFormat"]

CHUNK_GROUPS = 1 << 15


class UniformFormat(WeightFormat):
    name = "uniform"
    supported_bits = (2, 3, 4, 8)

    def kernel_format(self, spec: QuantSpec) -> str:
        return "uniform_sym" if spec.symmetric else "uniform_asym"

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

    def quantize(self, weight: torch.Tensor, layer: LayerSpec) -> dict[str, torch.Tensor]:
        spec = layer.spec
        bits, sym = spec.bits, bool(spec.symmetric)
        groups = group_view(weight.detach().to(torch.float32), layer)
        observer = observer_for(spec.observer)
        scales, los = [], []
        for chunk in groups.split(CHUNK_GROUPS):
            lo, hi = observer(chunk, bits, sym)
            s = uniform_scale(lo, hi, bits, sym)
            scales.append(s)
            los.append(lo)
        s = round_scale(torch.cat(scales), scale_dtype_of(spec), layer.name)
        sf = s.to(torch.float32)
        # the zero point is rounded against the stored scale, as the kernels will see it
        z = zero_point(torch.cat(los), sf, bits, sym)
        q = uniform_codes(groups, sf, z, bits).to(torch.int32)
        rows = 1 if layer.group_size == -1 else layer.out_features
        codes = q.reshape(layer.out_features, layer.in_features)
        out = {
            "qweight": pack_codes(codes, bits),
            "scales": s.reshape(rows, layer.n_groups),
        }
        if not sym:
            out["qzeros"] = ref.pack_group_field(z.to(torch.int32).reshape(rows, layer.n_groups), bits)
        return out

    def dequantize(self, tensors: dict[str, torch.Tensor], layer: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
        spec = layer.spec
        return ref.dequantize(
            tensors["qweight"], tensors["scales"], tensors.get("qzeros"), self.kernel_format(spec),
            spec.bits, layer.group_size, layer.in_features, dtype,
        )

