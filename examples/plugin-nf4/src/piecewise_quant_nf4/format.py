"""The NF4 weight format: 16 fixed levels (quantiles of a normal distribution, Dettmers et al. 2023,
"QLoRA") scaled by one absmax per group.

``w = NF4_LEVELS[code] * absmax``. Stored: ``qweight`` (uint8, two codes per byte, low nibble
first: :func:`piecewise_quant.kernels.pack_codes`) and ``absmax`` (``(out, n_groups)`` in the
config's ``scale_dtype``).
"""

from __future__ import annotations

import torch

from piecewise_quant.config import LayerSpec, QuantSpec
from piecewise_quant.formats import TensorLayout, WeightFormat
from piecewise_quant.formats.base import round_scale, scale_dtype_of
from piecewise_quant.formats.groups import group_view
from piecewise_quant.kernels import pack_codes, packed_length, unpack_codes

__all__ = ["NF4Format", "NF4_LEVELS"]

# bitsandbytes' NF4 code book (float32 values), lowest to highest; code 7 is exactly zero
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
# absmax shrink factors fit() tries: clipping the few largest weights of a group often lowers its error
SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
_CHUNK = 1 << 14  # groups per step of the shrink search (bounds its memory)


def _codes(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 code of every entry of ``x`` ``(n, c)``, row ``i`` scaled by ``absmax[i]``."""
    safe = absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return torch.bucketize((x / safe).clamp(-1, 1), _MIDPOINTS.to(x.device))


def _values(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    return NF4_LEVELS.to(absmax.device)[codes] * absmax.unsqueeze(-1)


class NF4Format(WeightFormat):
    """4-bit NormalFloat codes with one absmax scale per group (or per output channel)."""

    name = "nf4"
    supported_bits = (4,)

    def validate(self, spec: QuantSpec) -> None:
        super().validate(spec)
        if spec.group_size == "tensor":
            raise ValueError("grid 'nf4' keeps one absmax per group or per output channel; "
                             "use an integer group_size or 'channel', not 'tensor'")
        if spec.symmetric is not None:
            raise ValueError("grid 'nf4' is symmetric by construction (absmax scaling, a fixed code book); leave symmetric unset")

    def layout(self, layer: LayerSpec) -> dict[str, TensorLayout]:
        return {
            "qweight": TensorLayout((layer.out_features, packed_length(layer.in_features, 4)), torch.uint8),
            "absmax": TensorLayout((layer.out_features, layer.n_groups), scale_dtype_of(layer.spec)),
        }

    # the calibration interface: params are {"absmax": (n_groups_total,) float32, already rounded}
    def fit(self, groups: torch.Tensor, layer: LayerSpec, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per group, the shrink of its absmax (from :data:`SHRINK`) with the least squared error,
        each weight's error weighted by ``importance`` when given."""
        best = []
        for i in range(0, groups.shape[0], _CHUNK):
            g = groups[i : i + _CHUNK]
            imp = importance[i : i + _CHUNK] if importance is not None else None
            amax = g.abs().amax(-1)
            errs, cands = [], []
            for f in SHRINK:
                a = round_scale(amax * f, scale_dtype_of(layer.spec), layer.name).to(torch.float32)
                d = _values(_codes(g, a), a) - g
                errs.append(((d * d) * imp).sum(-1) if imp is not None else (d * d).sum(-1))
                cands.append(a)
            pick = torch.stack(errs).argmin(0)
            best.append(torch.stack(cands).gather(0, pick.unsqueeze(0)).squeeze(0))
        return {"absmax": torch.cat(best)}

    def fake_quantize(self, x: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
        a = params["absmax"]
        return _values(_codes(x.to(torch.float32), a), a).to(x.dtype)

    def encode(self, weight: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec) -> dict[str, torch.Tensor]:
        groups = group_view(weight.detach().to(torch.float32), layer)
        a = params["absmax"]
        codes = _codes(groups, a).reshape(layer.out_features, layer.in_features)
        return {
            "qweight": pack_codes(codes, 4),
            "absmax": a.to(scale_dtype_of(layer.spec)).reshape(layer.out_features, layer.n_groups),
        }

    def quantize(self, weight: torch.Tensor, layer: LayerSpec) -> dict[str, torch.Tensor]:
        groups = group_view(weight.detach().to(torch.float32), layer)
        return self.encode(weight, self.fit(groups, layer), layer)

    def dequantize(self, tensors: dict[str, torch.Tensor], layer: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_codes(tensors["qweight"], 4, layer.in_features).long()
        absmax = tensors["absmax"].to(torch.float32).reshape(-1)
        w = _values(codes.reshape(absmax.numel(), -1), absmax)
        return w.reshape(layer.out_features, layer.in_features).to(dtype)
