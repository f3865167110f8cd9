"""FP4 (E2M1) weights with block scales: ``mxfp4`` (OCP Microscaling) and ``nvfp4`` (NVIDIA).

Both store 4-bit E2M1 codes (values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; see
:mod:`piecewise_quant.kernels.fp4`) packed two per byte, in blocks along the input dimension whose
size the format fixes:

* ``mxfp4``: blocks of 32, one E8M0 scale per block (a power of two, stored as its ``uint8``
  biased exponent). Tensors ``qweight`` ``(out, in/2)`` uint8 and ``scales`` ``(out, in/32)``
  uint8; ``4 + 8/32 = 4.25`` bits per weight. The ``mse`` observer (default) picks, per block,
  whichever of the OCP exponent ``floor(log2(amax)) - 2`` and the one above it has the smaller
  (importance-weighted) squared error; ``minmax`` uses the OCP rule alone. Measured on real weights
  the search has the lowest error (docs/formats.md).
* ``nvfp4``: blocks of 16, one FP8 E4M3 scale per block and one float32 scale per tensor
  (``amax / (6 * 448)``). Tensors ``qweight``, ``scales`` ``(out, in/16)`` ``float8_e4m3fn`` and
  ``global_scale`` ``(1,)`` float32; ``4 + 8/16 + 32/(out*in)`` bits per weight. The ``mse``
  observer tries the rounded E4M3 block scale and its two E4M3 neighbours per block.

``bits`` must be 4 and ``group_size`` the format's block (``"auto"``, the default, means it).
``mxfp4`` implements ``fit``/``fake_quantize``/``encode``, so GPTQ and activation-aware ranges
calibrate it; ``nvfp4``'s per-tensor scale does not fit the per-group calibration interface, so it
is data-free only (``calibrate`` quantizes its layers data-free and reports them).
"""

from __future__ import annotations

import torch

from ..config import LayerSpec, QuantSpec
from ..kernels import pack_codes, packed_length
from ..kernels import reference as ref
from ..kernels.fp4 import (
    E4M3_MAX,
    MX_BLOCK,
    NV_BLOCK,
    e2m1_decode,
    e2m1_encode,
    e2m1_levels,
    e8m0_to_float,
    mx_scale_exponents,
    nv_block_scales,
    nv_global_scale,
)
from .base import TensorLayout, WeightFormat
from .defaults import BUILTIN_DEFAULTS
from .groups import group_view

__all__ = ["MXFP4Format", "NVFP4Format"]

OBSERVERS = ("mse", "minmax")


class _FP4Format(WeightFormat):
    """What both FP4 formats share: E2M1 codes, a block size fixed by the format."""

    supported_bits = (4,)
    block: int

    def validate(self, spec: QuantSpec) -> None:
        if spec.bits != 4:
            raise ValueError(f"bits={spec.bits} is not supported by grid {self.name!r}; FP4 (E2M1) codes are 4 bits: set bits=4")
        if spec.group_size != self.block:
            raise ValueError(
                f"grid {self.name!r} has blocks of {self.block} weights along the input dimension; set "
                f"group_size={self.block} (or leave group_size at its default), not {spec.group_size!r}"
            )
        if spec.observer not in OBSERVERS:
            raise ValueError(f"grid {self.name!r} supports observer 'mse' or 'minmax', not {spec.observer!r}")

    def kernel_format(self, spec: QuantSpec) -> str:
        return self.name

    def _codes_layout(self, layer: LayerSpec) -> TensorLayout:
        return TensorLayout((layer.out_features, packed_length(layer.in_features, 4)), torch.uint8)

    def _pack(self, groups: torch.Tensor, s: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
        safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)
        y = torch.where((s > 0).unsqueeze(1), groups / safe, torch.zeros_like(groups))
        codes = e2m1_encode(y).reshape(layer.out_features, layer.in_features)
        return pack_codes(codes.to(torch.int32), 4)

    def levels(self, tensors: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
        aux = tensors.get(self.aux_tensor) if self.aux_tensor is not None else None
        s = ref.fp4_scales(self.name, tensors["scales"], aux)
        mags = e2m1_levels(s.device)[:8]
        values = torch.cat([-mags[1:].flip(0), mags])  # the 15 distinct values, ascending
        return values.view(1, 1, -1) * s.unsqueeze(-1)

    def dequantize(self, tensors: dict[str, torch.Tensor], layer: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
        aux = tensors.get(self.aux_tensor) if self.aux_tensor is not None else None
        return ref.dequantize(tensors["qweight"], tensors["scales"], aux, self.name, 4, layer.group_size,
                              layer.in_features, dtype)


class MXFP4Format(_FP4Format):
    name = "mxfp4"
    block = MX_BLOCK
    default_bits, default_group_size, default_symmetric = BUILTIN_DEFAULTS["mxfp4"]

    def layout(self, layer: LayerSpec) -> dict[str, TensorLayout]:
        return {
            "qweight": self._codes_layout(layer),
            "scales": TensorLayout((layer.out_features, layer.n_groups), torch.uint8),
        }

    def fit(self, groups: torch.Tensor, layer: LayerSpec, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The biased E8M0 exponent of each block (as float32 ``exponent``) and its value (``scale``)."""
        rule = "mse" if layer.spec.observer == "mse" else "spec"
        e = mx_scale_exponents(groups.to(torch.float32), rule, importance)
        return {"exponent": e.to(torch.float32), "scale": e8m0_to_float(e)}

    def fake_quantize(self, x: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
        s = params["scale"].unsqueeze(1)
        return e2m1_decode(e2m1_encode(x / s)) * s

    def encode(self, weight: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec) -> dict[str, torch.Tensor]:
        groups = group_view(weight.detach().to(torch.float32), layer)
        e = params["exponent"].to(torch.uint8)
        return {
            "qweight": self._pack(groups, e8m0_to_float(e), layer),
            "scales": e.reshape(layer.out_features, layer.n_groups),
        }

    def quantize(self, weight: torch.Tensor, layer: LayerSpec) -> dict[str, torch.Tensor]:
        groups = group_view(weight.detach().to(torch.float32), layer)
        return self.encode(weight, self.fit(groups, layer), layer)


def _e4m3_neighbours(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The E4M3 values just below and just above each (E4M3) ``s``, as float32 (clamped to the range)."""
    bits = s.view(torch.uint8).to(torch.int32)
    down = (bits - 1).clamp(0, 0x7E).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    up = (bits + 1).clamp(0, 0x7E).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    return down, up


class NVFP4Format(_FP4Format):
    name = "nvfp4"
    block = NV_BLOCK
    aux_tensor = "global_scale"
    default_bits, default_group_size, default_symmetric = BUILTIN_DEFAULTS["nvfp4"]

    def layout(self, layer: LayerSpec) -> dict[str, TensorLayout]:
        return {
            "qweight": self._codes_layout(layer),
            "scales": TensorLayout((layer.out_features, layer.n_groups), torch.float8_e4m3fn),
            "global_scale": TensorLayout((1,), torch.float32),
        }

    def quantize(self, weight: torch.Tensor, layer: LayerSpec) -> dict[str, torch.Tensor]:
        groups = group_view(weight.detach().to(torch.float32), layer)
        glob = nv_global_scale(groups.abs().amax()).reshape(1)
        sb = nv_block_scales(groups, glob)
        if layer.spec.observer == "mse":
            rounded = sb.to(torch.float32)
            best, best_err = rounded, None
            for cand in (rounded, *_e4m3_neighbours(sb)):
                s = cand * glob
                safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)
                err = (e2m1_decode(e2m1_encode(groups / safe)) * s.unsqueeze(1) - groups).pow(2).sum(dim=1)
                if best_err is None:
                    best_err = err
                else:
                    better = err < best_err
                    best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
            sb = best.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
        s = sb.to(torch.float32) * glob
        return {
            "qweight": self._pack(groups, s, layer),
            "scales": sb.reshape(layer.out_features, layer.n_groups),
            "global_scale": glob.to(torch.float32),
        }
