"""Row/column blocks of a quantized layer (tensor parallelism, fused vLLM layers) are exact."""

import pytest
import torch

from piecewise_quant import QuantSpec
from piecewise_quant.quantization import layer_spec_for
from piecewise_quant.registry import get_format
from piecewise_quant.sharding import can_concat_rows, concat_rows, slice_quantized

SCHEMES = [
    dict(grid="piecewise", bits=4, group_size=32),
    dict(grid="piecewise", bits=3, group_size=16),
    dict(grid="piecewise", bits=2, group_size="channel"),
    dict(grid="uniform", bits=4, group_size=32, symmetric=False),
    dict(grid="uniform", bits=3, group_size=16, symmetric=False),
    dict(grid="uniform", bits=8, group_size="channel", symmetric=True),
    dict(grid="uniform", bits=4, group_size="tensor", symmetric=False),
    dict(grid="fp8", group_size="channel"),
]


def _quantized(scheme, out_f, in_f, seed, name="layer"):
    spec = QuantSpec(**scheme)
    layer = layer_spec_for(name, spec, in_f, out_f)
    fmt = get_format(spec.grid)
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    return fmt, layer, fmt.quantize(w, layer)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s['grid']}-{s.get('bits')}-{s['group_size']}")
def test_blocks_dequantize_to_the_same_values(scheme):
    out_f, in_f = 52, 64  # 52 rows: cuts that are not multiples of 8 codes of the packed dims
    fmt, layer, tensors = _quantized(scheme, out_f, in_f, 0)
    full = fmt.dequantize(tensors, layer, torch.float32)
    gs = layer.group_size
    step = in_f if gs == -1 else (gs if gs != in_f else 8)
    col_cuts = [(0, in_f)] if gs == -1 else [(0, in_f // 2), (in_f // 2, in_f)] if step <= in_f // 2 else [(0, in_f)]
    if gs == in_f:
        col_cuts = [(0, 24), (24, 64), (8, 40)]  # per-channel scales survive any column cut
    for rows in [(0, out_f), (0, 20), (20, 52), (13, 37)]:
        for cols in col_cuts:
            sub, st = slice_quantized(fmt, layer, tensors, rows=rows, cols=cols)
            got = fmt.dequantize(st, sub, torch.float32)
            assert torch.equal(got, full[rows[0]:rows[1], cols[0]:cols[1]]), (rows, cols)


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s["group_size"] != "tensor"],
                         ids=lambda s: f"{s['grid']}-{s.get('bits')}-{s['group_size']}")
def test_concat_rows_is_the_fused_layer(scheme):
    parts = [_quantized(scheme, n, 64, seed, name=f"p{seed}") for seed, n in enumerate([40, 12, 13])]
    assert can_concat_rows([p[1] for p in parts])
    fmt = parts[0][0]
    joined, tensors = concat_rows(fmt, [(p[1], p[2]) for p in parts], "fused")
    want = torch.cat([fmt.dequantize(p[2], p[1], torch.float32) for p in parts])
    assert joined.out_features == 65
    assert torch.equal(fmt.dequantize(tensors, joined, torch.float32), want)


def test_cuts_through_groups_and_mismatched_schemes_are_refused():
    fmt, layer, tensors = _quantized(dict(grid="piecewise", bits=4, group_size=32), 16, 64, 0)
    with pytest.raises(ValueError, match="cut through its quantization groups of 32"):
        slice_quantized(fmt, layer, tensors, cols=(0, 48))
    with pytest.raises(ValueError, match="outside"):
        slice_quantized(fmt, layer, tensors, rows=(0, 17))
    a = _quantized(dict(grid="piecewise", bits=4, group_size=32), 16, 64, 0)
    b = _quantized(dict(grid="piecewise", bits=3, group_size=32), 16, 64, 1)
    assert not can_concat_rows([a[1], b[1]])
    with pytest.raises(ValueError, match="schemes, input widths or group sizes differ"):
        concat_rows(a[0], [(a[1], a[2]), (b[1], b[2])], "fused")
    t = _quantized(dict(grid="uniform", bits=4, group_size="tensor", symmetric=False), 16, 64, 0)
    assert not can_concat_rows([t[1], t[1]])
