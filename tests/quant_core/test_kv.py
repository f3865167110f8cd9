"""KVArgs validation, KV quantize/dequantize error bounds (float64 reference), packing sizes, and
the ``kv_cache`` field of PiecewiseQuantConfig (shortcuts, round trip, no mutation)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import piecewise_quant as pq
from piecewise_quant.args import KVArgs
from piecewise_quant.kv import cat, dequantize_kv, fake_quantize_kv, quantize_kv, storage_bytes


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(bits=5), "bits must be one of"),
        (dict(bits=True), "bits must be one of"),
        (dict(bits=16), "bits must be one of"),
        (dict(format="fp8", bits=4), "bits must be one of"),
        (dict(format="fp8", bits=8, symmetric=False), "symmetric"),
        (dict(format="nf4"), "format must be"),
        (dict(key_axis="head"), "key_axis"),
        (dict(value_axis="channel"), "value_axis"),
        (dict(group_size=0), "group_size"),
        (dict(group_size=True), "group_size"),
        (dict(residual_length=-1), "residual_length"),
        (dict(sink_tokens=1.5), "sink_tokens"),
        (dict(symmetric="yes"), "symmetric"),
        (dict(grid="nf4"), "grid must be one of"),
        (dict(grid="piecewise", format="fp8", bits=8), "grid='piecewise' needs format='int'"),
        (dict(grid="piecewise", symmetric=True), "symmetric does not apply"),
    ],
)
def test_kvargs_rejects_bad_fields(fields, match):
    with pytest.raises(ValueError, match=match):
        KVArgs(**fields)


def test_kvargs_defaults_and_coerce():
    kv = KVArgs()
    got = (kv.bits, kv.key_axis, kv.value_axis, kv.group_size, kv.residual_length, kv.symmetric)
    assert got == (4, "channel", "token", 32, 128, False)
    assert KVArgs(format="fp8", bits=8).symmetric is True
    d = {"bits": 2, "group_size": 64}
    before = copy.deepcopy(d)
    assert KVArgs.coerce(d) == KVArgs(bits=2, group_size=64)
    assert d == before
    assert KVArgs.coerce(kv.to_dict()) == kv
    with pytest.raises(ValueError, match="unknown kv_cache fields"):
        KVArgs.coerce({"nbits": 4})
    assert kv.bits_per_value("token") == 4 + 32 / 32


def _reference_groups(x: torch.Tensor, axis: str, g: int) -> torch.Tensor:
    b, h, t, d = x.shape
    if axis == "token":
        return x.reshape(b, h, t, d // g, g)
    return x.reshape(b, h, t // g, g, d).transpose(-1, -2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_asymmetric_error_within_half_step_of_float64_range(bits, axis):
    torch.manual_seed(bits)
    x = torch.randn(2, 3, 64, 32) * torch.linspace(0.1, 4, 32)  # channels of very different ranges
    x[0, 0, 5, 7] = 25.0  # an outlier
    kv = KVArgs(bits=bits, group_size=16)
    q = quantize_kv(x, kv, axis)
    y = dequantize_kv(q).double()
    ref = _reference_groups(x.double(), axis, 16)
    step = (ref.amax(-1) - ref.amin(-1)) / (2**bits - 1)  # float64 reference step per group
    err = (_reference_groups(y, axis, 16) - ref).abs().amax(-1)
    # half a step, plus float16 metadata: the step rounded up (< 2**-10 relative), the zero point's rounding
    zero_err = ref.amin(-1).abs() * 2**-11
    assert bool((err <= step * 0.5 * (1 + 2**-9) + zero_err + 1e-6).all())
    # codes really take `bits` bits (plus float16 scale and zero per group)
    assert q.codes.numel() == x.numel() * bits // 8
    assert storage_bytes(q.tensors()) * 8 / x.numel() == pytest.approx(kv.bits_per_value(axis))


@pytest.mark.parametrize("fields", [dict(bits=4, symmetric=True), dict(bits=8, symmetric=True), dict(format="fp8", bits=8)])
def test_symmetric_and_fp8_error(fields):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 64)
    kv = KVArgs(group_size=32, **fields)
    y = fake_quantize_kv(x, kv, "token").double()
    amax = _reference_groups(x.double(), "token", 32).abs().amax(-1, keepdim=True)
    err = _reference_groups((y - x.double()), "token", 32).abs()
    if kv.format == "fp8":
        assert bool((err <= 2**-4 * _reference_groups(x.double(), "token", 32).abs() + amax / 448 * 2**-6 + 1e-6).all())
    else:
        assert bool((err <= amax / kv.qmax * 0.5 * (1 + 2**-9) + 1e-6).all())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_piecewise_search_is_the_formats_search(bits):
    from piecewise_quant.config import LayerSpec, QuantSpec
    from piecewise_quant.formats.piecewise import PiecewiseFormat
    from piecewise_quant.kv import piecewise_search

    torch.manual_seed(bits)
    groups = torch.randn(300, 32) * torch.rand(300, 1) * 3
    groups[:40] = groups[:40].abs() + 0.5  # one-sided groups (keys with an offset)
    groups[40:60, 3] *= 12  # outliers
    groups[60] = 0.0
    s, k = piecewise_search(groups, bits, mse=False)
    ref_s, ref_k = PiecewiseFormat().search(groups, bits, "minmax")
    assert torch.equal(k, ref_k) and torch.equal(s, ref_s)
    # the MSE search (what the cache runs) tries the min-max choice too, so it is never worse, and
    # it fits the format's own MSE search (which adds a finer scale stage) within a few percent
    layer = LayerSpec("kv", QuantSpec(grid="piecewise", bits=bits, group_size=32, observer="minmax"), 32, 300, 32)

    def err(scale, ids):
        fmt = PiecewiseFormat()
        y = fmt.fake_quantize(groups, {"scale": scale, "breakpoint": ids}, layer)
        return (y - groups).square().sum(dim=1)

    mse_s, mse_k = piecewise_search(groups, bits)
    assert bool((err(mse_s, mse_k) <= err(s, k) * (1 + 1e-6) + 1e-12).all())
    fmt_s, fmt_k = PiecewiseFormat().search(groups, bits, "mse")
    assert float(err(mse_s, mse_k).sum()) <= 1.05 * float(err(fmt_s, fmt_k).sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_piecewise_kv_is_the_weight_formats_grid(bits, axis):
    """Per group, the piecewise K/V codes decode to what the project's piecewise weight format
    gives for the same group with the (scale, breakpoint) the cache chose, stored in fewer bits than
    the asymmetric uniform grid (no zero point, a uint8 breakpoint id)."""
    from piecewise_quant.config import LayerSpec, QuantSpec
    from piecewise_quant.registry import get_format

    torch.manual_seed(bits)
    x = torch.randn(2, 2, 32, 32) * torch.linspace(0.2, 3, 32)
    x[1, 0, 3, 5] = 30.0
    kv = KVArgs(bits=bits, group_size=16, grid="piecewise")
    q = quantize_kv(x, kv, axis)
    assert q.zero is None and q.breakpoint.dtype == torch.uint8 and q.scale.dtype == torch.float16
    got = _reference_groups(dequantize_kv(q), axis, 16).reshape(-1, 16)
    rows = _reference_groups(x, axis, 16).reshape(-1, 16)
    fmt = get_format("piecewise")
    layer = LayerSpec("kv", QuantSpec(grid="piecewise", bits=bits, group_size=16), 16, rows.shape[0], 16)
    scale, ids = q.scale.float().reshape(-1), q.breakpoint.long().reshape(-1)  # in the reference's group order
    ref = fmt.dequantize(fmt.encode(rows, {"scale": scale, "breakpoint": ids}, layer), layer, torch.float32)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert storage_bytes(q.tensors()) * 8 / x.numel() == pytest.approx(kv.bits_per_value(axis)) == bits + 24 / 16
    assert fake_quantize_kv(x, kv, axis).dtype == x.dtype


@pytest.mark.parametrize("tier", ["best", "generic"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_piecewise_c_kernel_makes_the_torch_choice(bits, tier, monkeypatch):
    """The cache's C search and encoding (``kv_piecewise``) against the torch code: the same
    breakpoint, scale and codes for (nearly) every group; where float32 sums in another order
    flip a near-tie (decided before the scale is rounded to float16), the C choice's error is
    within 0.2% of the torch one's. NaN falls back."""
    from piecewise_quant.kernels import kv_attention
    from piecewise_quant.kv import _piecewise_c, _piecewise_torch

    if kv_attention._ext() is None:
        pytest.skip("the compiled CPU kernels are not built")
    if tier == "generic":
        monkeypatch.setenv("PIECEWISE_QUANT_CPU_TIER", "0")
    torch.manual_seed(bits)
    groups = torch.randn(2000, 32) * torch.rand(2000, 1) * 4
    groups[:200] = groups[:200].abs() + 0.3
    groups[200:300, 5] *= 20
    groups[300] = 0.0
    c_codes, c_scale, c_ids = _piecewise_c(groups, bits)
    t_codes, t_scale, t_ids = _piecewise_torch(groups, bits)
    same = (c_ids == t_ids) & (c_scale == t_scale)
    assert float(same.float().mean()) >= 0.98  # 2 bits: few levels, many exact ties between ids
    assert torch.equal(c_codes[same], t_codes[same])

    def err(codes, scale, ids):
        from piecewise_quant.kv import level_table

        lut = level_table(bits)
        return ((lut[ids.long()[:, None], codes.long()] * scale.float()[:, None] - groups) ** 2).sum(1)

    assert bool((err(c_codes, c_scale, c_ids) <= err(t_codes, t_scale, t_ids) * (1 + 2e-3) + 1e-9).all())
    nan = groups[:4].clone()
    nan[1, 3] = float("nan")
    assert _piecewise_c(nan, bits) is None


@pytest.mark.parametrize("bits", [3, 4])
def test_piecewise_kv_beats_uniform_on_heavy_tailed_tokens(bits):
    """The reason to offer it: on heavy-tailed per-token groups (what K/V rows look like) the
    piecewise grid has the lower error at equal code bits and fewer stored bits."""
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((1, 4, 256, 64))
    err = {grid: float((fake_quantize_kv(x, KVArgs(bits=bits, group_size=64, grid=grid), "token") - x).square().sum())
           for grid in ("uniform", "piecewise")}
    assert err["piecewise"] < 0.8 * err["uniform"]
    bpv = {grid: KVArgs(bits=bits, group_size=64, grid=grid).bits_per_value("token") for grid in ("uniform", "piecewise")}
    assert bpv["piecewise"] < bpv["uniform"]


def test_cat_and_partial_channel_blocks():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 48, 16)
    kv = KVArgs(bits=4, group_size=16)
    whole = quantize_kv(x, kv, "channel")
    parts = cat([quantize_kv(x[:, :, i : i + 16], kv, "channel") for i in range(0, 48, 16)])
    assert torch.equal(dequantize_kv(whole), dequantize_kv(parts)) and parts.tokens == 48
    assert fake_quantize_kv(x[:, :, :40], kv, "channel").shape == (2, 2, 40, 16)  # a partial block of 8
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_kv(x[:, :, :40], kv, "channel")
    with pytest.raises(ValueError, match="must divide head_dim"):
        quantize_kv(x, KVArgs(group_size=12), "token")


def test_config_kv_cache_shortcuts_and_round_trip():
    cfg = pq.PiecewiseQuantConfig(bits=4, kv_bits=2, kv_group_size=64, kv_residual_length=16)
    assert cfg.kv_cache == KVArgs(bits=2, group_size=64, residual_length=16)
    assert cfg.kv_bits is None  # shortcuts build kv_cache and read back as None
    user = {"bits": 8, "key_axis": "token", "residual_length": 0}
    before = copy.deepcopy(user)
    cfg2 = pq.PiecewiseQuantConfig(kv_cache=user, kv_group_size=16)
    assert user == before
    assert cfg2.kv_cache == KVArgs(bits=8, key_axis="token", residual_length=0, group_size=16)
    for c in (cfg, cfg2):
        d = json.loads(c.to_json_string())
        assert pq.PiecewiseQuantConfig.from_dict(d) == c
        assert d["kv_cache"]["bits"] == c.kv_cache.bits


def test_config_without_kv_cache_serialises_as_before():
    d = pq.PiecewiseQuantConfig(bits=4).to_dict()
    assert "kv_cache" not in d and "kv_bits" not in d
    assert pq.PiecewiseQuantConfig.from_dict(d).kv_cache is None


def test_config_rejects_bad_kv_fields():
    with pytest.raises(ValueError, match="kv_cache.bits"):
        pq.PiecewiseQuantConfig(kv_bits=5)
    with pytest.raises(ValueError, match="unknown kv_cache fields"):
        pq.PiecewiseQuantConfig.from_dict({"kv_cache": {"bits": 4, "axis": 0}})
    with pytest.raises(ValueError, match="kv_cache must be"):
        pq.PiecewiseQuantConfig(kv_cache=4)
