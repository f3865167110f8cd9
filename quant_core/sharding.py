"""Cut a quantized layer into row/column blocks and join row blocks back: the arithmetic that
tensor parallelism and fused layers (vLLM's ``qkv_proj`` / ``gate_up_proj``) need.

A quantized weight ``W`` (``out x in``) is stored as a format's tensors (``fmt.layout``). This
module computes the tensors of ``W[r0:r1, c0:c1]`` exactly (codes, scales, zero points and
breakpoint ids are copied, never re-quantized), and the tensors of ``cat([W_1, W_2, ...], dim=0)``.

The built-in formats share one layout vocabulary, which is what these functions understand:

* ``qweight``: ``(out, packed(in))`` uint8 codes packed along the input dim (or ``(out, in)``
  FP8 values);
* ``scales``: ``(out, n_groups)``, or ``(1, 1)`` for a per-tensor layer;
* ``qzeros`` / ``breakpoint_ids``: ``(n_groups, packed(out))`` codes packed along the output dim,
  or ``(1, packed(1))`` per-tensor.

A plugin format with other tensor names can still be served unsharded (one device, fused layers
run shard by shard); slicing it raises :class:`NotImplementedError` naming the tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch

from .config import LayerSpec
from .formats.base import WeightFormat
from .kernels.packing import pack_codes, packed_length, unpack_codes

__all__ = ["STANDARD_TENSORS", "slice_quantized", "concat_rows", "can_concat_rows"]

STANDARD_TENSORS = frozenset({"qweight", "scales", "qzeros", "breakpoint_ids"})


def _check_names(fmt: WeightFormat, layer: LayerSpec, tensors: Mapping[str, torch.Tensor]) -> None:
    names = set(fmt.layout(layer))
    unknown = sorted(names - STANDARD_TENSORS)
    if unknown:
        raise NotImplementedError(
            f"layer {layer.name!r}: format {layer.spec.grid!r} stores tensor(s) {unknown}, which piecewise-quant "
            "does not know how to split; serve it without tensor parallelism (or give the format standard tensor names)"
        )
    if set(tensors) != names:
        raise ValueError(
            f"layer {layer.name!r}: tensors {sorted(tensors)} do not match the {layer.spec.grid!r} layout {sorted(names)}"
        )


def _slice_last(t: torch.Tensor, n: int, bits: int, start: int, stop: int) -> torch.Tensor:
    """``t[..., start:stop]`` of the codes packed along the last dim (``n`` codes of ``bits``)."""
    if t.dtype != torch.uint8 or t.shape[-1] != packed_length(n, bits):
        return t[..., start:stop].contiguous()
    if start % 8 == 0 and (stop % 8 == 0 or stop == n):
        # 8 codes of b bits take exactly b bytes: a slice on an 8-code boundary is a byte slice
        return t[..., start // 8 * bits : (stop + 7) // 8 * bits].contiguous()
    return pack_codes(unpack_codes(t, bits, n)[..., start:stop], bits)


def _group_range(layer: LayerSpec, c0: int, c1: int) -> tuple[int, int, int]:
    """Groups covering columns ``[c0, c1)`` and the sliced layer's group size."""
    gs = layer.group_size
    if gs == -1:
        return 0, 1, -1
    if gs == layer.in_features:  # per-channel: one group per row; a column slice keeps its scale
        return 0, 1, c1 - c0
    if c0 % gs or c1 % gs:
        raise ValueError(
            f"layer {layer.name!r}: columns [{c0}, {c1}) cut through its quantization groups of {gs} input "
            f"features; the partition must be a multiple of the group size (choose a tensor-parallel size "
            f"that divides in_features / group_size = {layer.in_features // gs}, or quantize with a smaller group_size)"
        )
    return c0 // gs, c1 // gs, gs


def slice_quantized(
    fmt: WeightFormat,
    layer: LayerSpec,
    tensors: Mapping[str, torch.Tensor],
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
    name: str | None = None,
) -> tuple[LayerSpec, dict[str, torch.Tensor]]:
    """The layer spec and tensors of ``W[rows[0]:rows[1], cols[0]:cols[1]]`` (``None`` = all).

    Exact: the sub-layer dequantizes to the same values as the same block of the whole layer.
    A column cut must fall on quantization-group boundaries (``ValueError`` otherwise)."""
    _check_names(fmt, layer, tensors)
    r0, r1 = rows if rows is not None else (0, layer.out_features)
    c0, c1 = cols if cols is not None else (0, layer.in_features)
    if not (0 <= r0 < r1 <= layer.out_features and 0 <= c0 < c1 <= layer.in_features):
        raise ValueError(
            f"layer {layer.name!r}: block rows [{r0}, {r1}) x cols [{c0}, {c1}) is outside its "
            f"{layer.out_features} x {layer.in_features} weight"
        )
    bits = layer.spec.bits
    g0, g1, new_gs = _group_range(layer, c0, c1)
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key == "qweight":
            t = t[r0:r1]
            out[key] = _slice_last(t, layer.in_features, bits, c0, c1) if (c0, c1) != (0, layer.in_features) else t.contiguous()
        elif key == "scales":
            if layer.group_size != -1:
                t = t[r0:r1, g0:g1]
            out[key] = t.contiguous()
        else:  # qzeros / breakpoint_ids: (n_groups, packed(out))
            if layer.group_size != -1:
                t = t[g0:g1]
                if (r0, r1) != (0, layer.out_features):
                    t = _slice_last(t, layer.out_features, bits, r0, r1)
            out[key] = t.contiguous()
    sub = dataclasses.replace(
        layer, name=name or layer.name, in_features=c1 - c0, out_features=r1 - r0, group_size=new_gs
    )
    _check_layout(fmt, sub, out)
    return sub, out


def can_concat_rows(layers: Sequence[LayerSpec]) -> bool:
    """Whether :func:`concat_rows` can join these layers into one (same scheme, same input width,
    grouped scales, same online input rotation; per-tensor layers keep one scale each, and an online
    output rotation spans one layer's rows, so neither can be joined)."""
    first = layers[0]
    return all(
        layer.spec == first.spec and layer.in_features == first.in_features and layer.group_size == first.group_size
        and layer.rotation == first.rotation
        for layer in layers
    ) and first.group_size != -1 and (first.rotation is None or not first.rotation.output)


def concat_rows(
    fmt: WeightFormat,
    parts: Sequence[tuple[LayerSpec, Mapping[str, torch.Tensor]]],
    name: str,
) -> tuple[LayerSpec, dict[str, torch.Tensor]]:
    """One layer whose weight is the row-wise concatenation of ``parts`` (``cat(dim=0)``)."""
    layers = [p[0] for p in parts]
    if not can_concat_rows(layers):
        raise ValueError(
            f"cannot join {[layer.name for layer in layers]} into {name!r}: "
            "their schemes, input widths or group sizes differ"
        )
    for layer, tensors in parts:
        _check_names(fmt, layer, tensors)
    bits = layers[0].spec.bits
    out: dict[str, torch.Tensor] = {}
    for key in parts[0][1]:
        ts = [p[1][key] for p in parts]
        if key in ("qweight", "scales"):
            out[key] = torch.cat(ts, dim=0)
        elif all(layer.out_features % 8 == 0 for layer in layers[:-1]) and ts[0].dtype == torch.uint8:
            out[key] = torch.cat(ts, dim=-1)  # every part but the last fills whole 8-code blocks
        else:
            codes = [unpack_codes(t, bits, layer.out_features) for t, layer in zip(ts, layers)]
            out[key] = pack_codes(torch.cat(codes, dim=-1), bits)
    joined = dataclasses.replace(layers[0], name=name, out_features=sum(layer.out_features for layer in layers))
    _check_layout(fmt, joined, out)
    return joined, out


def _check_layout(fmt: WeightFormat, layer: LayerSpec, tensors: Mapping[str, torch.Tensor]) -> None:
    for key, lay in fmt.layout(layer).items():
        t = tensors[key]
        if tuple(t.shape) != tuple(lay.shape) or t.dtype != lay.dtype:
            raise AssertionError(  # a bug in this module, not a user error
                f"layer {layer.name!r}: {key} came out {tuple(t.shape)} {t.dtype}, layout says {lay.shape} {lay.dtype}"
            )
