"""Property tests for every built-in weight format: exact storage, nearest-level rounding, cost."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from piecewise_quant.config import LayerSpec, QuantSpec
from piecewise_quant.kernels import piecewise_table, unpack_codes
from piecewise_quant.kernels.reference import unpack_group_field
from piecewise_quant.quantization import layer_spec_for
from piecewise_quant.registry import get_format

ALL_FP8 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
FP8_VALUES = torch.unique(ALL_FP8[torch.isfinite(ALL_FP8)])


def group_levels(tensors: dict, layer: LayerSpec) -> torch.Tensor:
    """All values the stored grid of each group can represent: ``(rows, n_groups, n_levels)``."""
    spec = layer.spec
    rows = 1 if layer.group_size == -1 else layer.out_features
    s = tensors["scales"].to(torch.float32).unsqueeze(-1)
    if spec.grid == "fp8":
        return FP8_VALUES.view(1, 1, -1) * s
    codes = torch.arange(2**spec.bits, dtype=torch.float32).view(1, 1, -1)
    half = 2 ** (spec.bits - 1)
    if spec.grid == "uniform" and spec.symmetric:
        return (codes - half) * s
    if spec.grid == "uniform":
        z = unpack_group_field(tensors["qzeros"], spec.bits, rows, layer.n_groups).to(torch.float32).unsqueeze(-1)
        return (codes - z) * s
    ids = unpack_group_field(tensors["breakpoint_ids"], spec.bits, rows, layer.n_groups).long()
    table = piecewise_table(spec.bits)
    h, r = table[ids, 0].unsqueeze(-1), table[ids, 1].unsqueeze(-1)
    d = codes - half
    return torch.where(d.abs() <= h, d, torch.sign(d) * (h + r * (d.abs() - h))) * s


def as_groups(w: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    if layer.group_size == -1:
        return w.reshape(1, 1, -1)
    return w.reshape(layer.out_features, layer.n_groups, layer.group_size)


def check_nearest_level(w: torch.Tensor, deq: torch.Tensor, tensors: dict, layer: LayerSpec) -> None:
    """Every weight is stored as its nearest grid level (so, with a covering range, the error is at
    most half the local step)."""
    levels = group_levels(tensors, layer)  # (R, G, L)
    wg = as_groups(w.to(torch.float32), layer)
    dg = as_groups(deq.to(torch.float32), layer)
    best = (wg.unsqueeze(-1) - levels.unsqueeze(2)).abs().amin(-1)
    err = (wg - dg).abs()
    tol = 1e-6 * wg.abs().amax().clamp(min=1e-30) + 1e-30
    assert bool((err <= best + tol).all()), f"max excess {(err - best).max().item():.3g}"


FORMATS = [
    ("uniform", False, (2, 3, 4, 8)),
    ("uniform", True, (2, 3, 4, 8)),
    ("piecewise", None, (2, 3, 4, 8)),
]
GROUPS = [16, 32, "channel", "tensor"]


def build(grid, bits, group, symmetric, observer, in_features, out_features, scale_dtype="float16"):
    spec = QuantSpec(grid=grid, bits=bits, group_size=group, symmetric=symmetric, observer=observer, scale_dtype=scale_dtype)
    layer = layer_spec_for("layer", spec, in_features, out_features)
    return layer, get_format(grid)


weights_kind = st.sampled_from(["normal", "laplace", "constant", "zero", "tiny", "huge", "mixed"])


def make_weight(kind: str, out_f: int, in_f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if kind == "laplace":
        w = torch.sign(w) * torch.log1p(torch.rand(out_f, in_f, generator=g) * 50)
    elif kind == "constant":
        w = torch.full((out_f, in_f), float(w[0, 0]))
    elif kind == "zero":
        w = torch.zeros(out_f, in_f)
    elif kind == "tiny":
        w = w * 1e-12
    elif kind == "huge":  # as large as float16 model weights can be
        w = w / w.abs().max() * 6e4
    elif kind == "mixed":  # some zero groups, some constant, some outliers
        w[0] = 0
        w[-1, : in_f // 2] = 3.0
        w[out_f // 2, 0] = 40.0
    return w


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(FORMATS),
    bits_i=st.integers(0, 3),
    group=st.sampled_from(GROUPS),
    kind=weights_kind,
    out_f=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_grid_formats_store_every_weight_at_its_nearest_level(fmt, bits_i, group, kind, out_f, seed, dtype):
    grid, symmetric, bits_options = fmt
    bits = bits_options[bits_i]
    in_f = 64
    w = make_weight(kind, out_f, in_f, seed)
    w = w.to(dtype)
    layer, f = build(grid, bits, group, symmetric, "minmax", in_f, out_f)
    tensors = f.quantize(w, layer)
    layout = f.layout(layer)
    assert set(tensors) == set(layout)
    for name, lay in layout.items():
        assert tuple(tensors[name].shape) == lay.shape and tensors[name].dtype == lay.dtype, name
    deq = f.dequantize(tensors, layer, dtype)
    assert deq.shape == w.shape and deq.dtype == dtype
    deq32 = f.dequantize(tensors, layer, torch.float32)
    assert bool(torch.isfinite(deq32).all())
    check_nearest_level(w.to(torch.float32), deq32, tensors, layer)
    # with the covering (minmax) range nothing is clipped: error <= half of the widest step, up to
    # the rounding of the stored float16 scale (unit roundoff 2**-11, times the outermost level)
    err = (w.to(torch.float32) - deq32).abs()
    levels = group_levels(tensors, layer)
    steps = levels.sort(-1).values.diff(dim=-1).amax(-1)  # (R, G)
    scale_rounding = levels.abs().amax(-1) * 2.0**-11
    bound = as_groups(torch.zeros_like(w, dtype=torch.float32), layer) + (steps / 2 + scale_rounding).unsqueeze(-1)
    tiny_slack = 1e-6 * w.to(torch.float32).abs().amax() + 1e-30
    assert bool((as_groups(err, layer) <= bound * (1 + 1e-5) + tiny_slack).all())
    if kind in ("zero",):
        assert bool((deq32 == 0).all())
    if kind == "constant":
        assert torch.allclose(deq32, w.to(torch.float32), rtol=2e-3, atol=0)


@settings(max_examples=20, deadline=None)
@given(kind=weights_kind, out_f=st.integers(1, 6), seed=st.integers(0, 10_000), per_tensor=st.booleans())
def test_fp8_stores_every_weight_at_its_nearest_level(kind, out_f, seed, per_tensor):
    w = make_weight(kind, out_f, 48, seed)
    layer, f = build("fp8", 8, "tensor" if per_tensor else "channel", None, "minmax", 48, out_f)
    tensors = f.quantize(w, layer)
    assert tensors["qweight"].dtype == torch.float8_e4m3fn
    deq = f.dequantize(tensors, layer, torch.float32)
    assert bool(torch.isfinite(deq).all())
    check_nearest_level(w, deq, tensors, layer)


@pytest.mark.parametrize("grid,symmetric", [("uniform", False), ("uniform", True), ("piecewise", None), ("fp8", None)])
def test_mse_observer_never_worse_than_minmax(grid, symmetric):
    torch.manual_seed(0)
    w = torch.randn(32, 256) * torch.rand(32, 1)
    w[3, 7] = 12.0  # an outlier the MSE observer may clip
    group = "channel" if grid == "fp8" else 64
    bits = 8 if grid == "fp8" else 3
    errs = {}
    for obs in ("minmax", "mse"):
        layer, f = build(grid, bits, group, symmetric, obs, 256, 32)
        errs[obs] = (f.dequantize(f.quantize(w, layer), layer, torch.float32) - w).pow(2).sum()
    assert errs["mse"] <= errs["minmax"] * (1 + 1e-6)


@pytest.mark.parametrize(
    "grid,symmetric,bits,group,expected",
    [
        ("uniform", False, 4, 128, 4 + (16 + 4) / 128),
        ("uniform", True, 4, 128, 4 + 16 / 128),
        ("uniform", False, 3, 64, 3 + (16 + 3) / 64),
        ("piecewise", None, 4, 128, 4 + (16 + 4) / 128),
        ("piecewise", None, 3, 128, 3 + (16 + 3) / 128),
        ("piecewise", None, 2, 64, 2 + (16 + 2) / 64),
        ("uniform", False, 8, "channel", 8 + (16 + 8) / 256),
        ("fp8", None, 8, "channel", 8 + 16 / 256),
    ],
)
def test_bits_per_weight_is_exact_and_counts_metadata(grid, symmetric, bits, group, expected):
    layer, f = build(grid, bits, group, symmetric, "minmax", 256, 64)
    assert math.isclose(f.bits_per_weight(layer), expected, rel_tol=1e-12)
    tensors = f.quantize(torch.randn(64, 256), layer)
    stored = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    assert math.isclose(stored / (64 * 256), expected, rel_tol=1e-12)


def test_piecewise_costs_exactly_what_asymmetric_uniform_costs():
    for bits in (2, 3, 4, 8):
        for group in (32, 64, 128, "channel"):
            lp, fp = build("piecewise", bits, group, None, "mse", 256, 48)
            lu, fu = build("uniform", bits, group, False, "mse", 256, 48)
            assert fp.bits_per_weight(lp) == fu.bits_per_weight(lu)


def test_piecewise_grid_has_zero_and_dense_centre():
    for bits, table in ((2, piecewise_table(2)), (3, piecewise_table(3)), (4, piecewise_table(4))):
        assert table.shape == (2**bits, 2)
        assert tuple(table[0].tolist()) == (2 ** (bits - 1), 1.0)  # entry 0 is the uniform grid
        assert bool((table[:, 1] >= 1).all())  # tails are never denser than the centre


def test_three_bit_codes_take_three_bits():
    layer, f = build("uniform", 3, 64, False, "minmax", 256, 8)
    assert f.quantize(torch.randn(8, 256), layer)["qweight"].shape == (8, 256 * 3 // 8)
    codes = unpack_codes(f.quantize(torch.randn(8, 256), layer)["qweight"], 3, 256)
    assert int(codes.max()) <= 7


@pytest.mark.parametrize("grid,symmetric", [("uniform", False), ("uniform", True), ("piecewise", None), ("fp8", None)])
def test_huge_weights_work_with_float32_scales(grid, symmetric):
    w = torch.randn(4, 64) * 1e30
    layer, f = build(grid, 8 if grid == "fp8" else 4, "channel" if grid == "fp8" else 32, symmetric, "minmax", 64, 4, "float32")
    tensors = f.quantize(w, layer)
    deq = f.dequantize(tensors, layer, torch.float32)
    assert bool(torch.isfinite(deq).all())
    check_nearest_level(w, deq, tensors, layer)


def test_huge_weights_with_float16_scales_raise_a_clear_error():
    layer, f = build("uniform", 4, 32, False, "minmax", 64, 2)
    with pytest.raises(ValueError, match="scale_dtype='float32'"):
        f.quantize(torch.full((2, 64), 1e9), layer)


def test_nan_weights_are_refused():
    layer, f = build("piecewise", 4, 32, None, "mse", 64, 2)
    w = torch.randn(2, 64)
    w[1, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        f.quantize(w, layer)


@pytest.mark.parametrize("grid", ["piecewise", "uniform", "fp8"])
def test_quantization_ignores_the_default_dtype(grid):
    """Hosts such as vLLM load models under torch.set_default_dtype(bfloat16); quantizing a
    bf16 weight there must give exactly what it gives under the float32 default."""
    from piecewise_quant.quantization import layer_spec_for

    spec = QuantSpec(grid=grid, bits=None if grid == "fp8" else 4, group_size="channel" if grid == "fp8" else 32)
    layer = layer_spec_for("l", spec, 64, 16)
    fmt = get_format(grid)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    want = fmt.quantize(w, layer)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        got = fmt.quantize(w, layer)
    finally:
        torch.set_default_dtype(previous)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_to_linear_is_the_dequantized_layer():
    """``QuantLinear.to_linear`` (what dequantizing a model puts in place): same outputs as the
    quantized layer, bias kept, in the asked dtype."""
    import piecewise_quant as pq

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 24))
    pq.quantize(model, pq.PiecewiseQuantConfig(bits=4, group_size=32, modules_to_not_convert=[]), progress=False)
    q = model[0]
    x = torch.randn(5, 64)
    lin = q.to_linear()
    assert type(lin) is torch.nn.Linear and lin.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(lin(x), q(x), rtol=0, atol=1e-6)
        assert torch.equal(lin.bias, q.bias)
    assert q.to_linear(torch.bfloat16).weight.dtype == torch.bfloat16


@pytest.mark.parametrize("grid,symmetric,bits", [(g, s, b) for g, s, bs in FORMATS for b in bs] + [("fp8", None, 8)])
@pytest.mark.parametrize("group", ["channel", "tensor", 16])
def test_format_levels_match_an_independent_decoding(grid, symmetric, bits, group):
    """``WeightFormat.levels`` (what plots and grid checks use) agrees with this file's own decoding,
    and the piecewise breakpoints bound the dense centre."""
    if grid == "fp8" and group == 16:
        group = "channel"
    layer, fmt = build(grid, bits, group, symmetric, "minmax", 32, 8)
    tensors = fmt.quantize(make_weight("laplace", 8, 32, 3), layer)
    torch.testing.assert_close(fmt.levels(tensors, layer), group_levels(tensors, layer), rtol=0, atol=0)
    bp = fmt.breakpoints(tensors, layer)
    if grid != "piecewise":
        assert bp is None
        return
    levels = fmt.levels(tensors, layer)
    steps = levels.sort(-1).values.diff(dim=-1)
    inner = levels.abs() <= bp.unsqueeze(-1) * (1 + 1e-6)
    assert bool(inner.any(-1).all()) and bp.shape == levels.shape[:2] and bool(steps.min() >= 0)
