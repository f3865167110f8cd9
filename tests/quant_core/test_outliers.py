"""Dense-and-sparse outliers (``QuantSpec(outliers=...)``): config, storage, bits, compute, GPTQ."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import piecewise_quant as pq
from piecewise_quant import outliers
from piecewise_quant.calibration.gptq import gptq_quantize, hessian_from_inputs
from piecewise_quant.kernels.sparse_add import OutlierMatrix, sparse_add_reference
from piecewise_quant.quantization import layer_spec_for
from piecewise_quant.registry import get_format

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy-2026-12-03"


def _heavy_weight(out: int = 48, inn: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * 0.02
    spikes = torch.rand(out, inn, generator=g) < 0.004
    return torch.where(spikes, w * 25, w)


def _layer(grid="piecewise", bits=3, group_size=64, out=48, inn=256, **kw):
    spec = pq.QuantSpec(grid=grid, bits=bits, group_size=group_size, **kw)
    return layer_spec_for("l", spec, inn, out)


# ---- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 0.0, 1.0, 1.5, -2, True, "1%", float("nan")])
def test_bad_outlier_values_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="outliers must be"):
        pq.QuantSpec(bits=3, outliers=bad)


def test_outlier_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="outlier_method must be one of"):
        pq.QuantSpec(bits=3, outliers=1, outlier_method="fisher")
    with pytest.raises(ValueError, match="group_size=<int> or 'channel'"):
        pq.QuantSpec(grid="uniform", bits=3, group_size="tensor", outliers=0.01)
    with pytest.raises(ValueError, match="smaller than group_size=32"):
        pq.QuantSpec(bits=3, group_size=32, outliers=32)
    with pytest.raises(ValueError, match=r"overrides\['\*.down_proj'\]: outliers must be"):
        pq.PiecewiseQuantConfig(bits=3, overrides={"*.down_proj": {"outliers": 2.5}})


def test_config_round_trips_and_configs_without_outliers_keep_their_bytes():
    cfg = pq.PiecewiseQuantConfig(bits=3, outliers=0.01, outlier_method="magnitude",
                                  overrides={"*.down_proj": {"outliers": 2}, "*.q_proj": {"outliers": None}})
    d = json.loads(cfg.to_json_string())
    assert d["outliers"] == 0.01 and d["outlier_method"] == "magnitude"
    back = pq.PiecewiseQuantConfig.from_dict(d)
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert back.spec_for("model.layers.0.mlp.down_proj").outliers == 2
    assert back.spec_for("model.layers.0.self_attn.q_proj").outliers is None
    plain = pq.PiecewiseQuantConfig(bits=3).to_dict()
    assert "outliers" not in plain and "outlier_method" not in plain


def test_a_legacy_config_without_the_fields_loads():
    data = json.loads((LEGACY / "config.json").read_text())["quantization_config"]
    assert "outliers" not in json.dumps(data)
    cfg = pq.PiecewiseQuantConfig.from_dict(data)
    assert cfg.outliers is None and cfg.to_dict() == pq.PiecewiseQuantConfig.from_dict(cfg.to_dict()).to_dict()


# ---- storage and bits ---------------------------------------------------------------------------


@pytest.mark.parametrize("grid, group_size, spec_outliers, k, idx_dtype", [
    ("piecewise", 64, 2, 2, torch.uint8),
    ("uniform", 128, 0.01, 2, torch.uint8),  # ceil(0.01 * 128)
    ("piecewise", "channel", 3, 3, torch.int16),  # groups of 512 need 16-bit positions
])
def test_layout_and_bits_per_weight_count_every_stored_bit(grid, group_size, spec_outliers, k, idx_dtype):
    inn, out = 512, 48
    layer = _layer(grid, 3, group_size, out, inn, outliers=spec_outliers)
    dense = outliers.dense_layer(layer)
    fmt = get_format(grid)
    lay = fmt.layout(layer)
    n_groups = layer.n_groups
    assert outliers.per_group(layer) == k
    assert lay["outlier_idx"].shape == (out, n_groups * k) and lay["outlier_idx"].dtype == idx_dtype
    assert lay["outlier_vals"].shape == (out, n_groups * k) and lay["outlier_vals"].dtype == torch.float16
    idx_bits = torch.iinfo(idx_dtype).bits
    want = fmt.bits_per_weight(dense) + out * n_groups * k * (idx_bits + 16) / (out * inn)
    assert math.isclose(fmt.bits_per_weight(layer), want, rel_tol=0, abs_tol=1e-12)
    tensors = fmt.quantize(_heavy_weight(out, inn), layer)
    stored = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    assert stored == fmt.bits_per_weight(layer) * out * inn


@pytest.mark.parametrize("method", ["hessian", "magnitude"])
def test_outliers_are_exact_and_cut_the_weight_error(method):
    w = _heavy_weight()
    layer = _layer(outliers=2, outlier_method=method)
    fmt = get_format("piecewise")
    t = fmt.quantize(w, layer)
    deq = fmt.dequantize(t, layer, torch.float64)
    cols = outliers.global_columns(t["outlier_idx"], layer)
    kept = w.double().gather(1, cols)
    # each kept weight is exact to float16 rounding of its correction
    assert (deq.gather(1, cols) - kept).abs().max() <= 1e-3 * kept.abs().max()
    plain = get_format("piecewise").quantize(w, outliers.dense_layer(layer))
    err_plain = (fmt.dequantize(plain, outliers.dense_layer(layer), torch.float64) - w.double()).square().sum()
    assert (deq - w.double()).square().sum() < 0.5 * err_plain


# ---- compute ------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 40])
def test_sparse_add_matches_the_float64_reference(m):
    g = torch.Generator().manual_seed(m)
    out, inn, per_row = 24, 96, 5
    cols = torch.stack([torch.randperm(inn, generator=g)[:per_row] for _ in range(out)])
    vals = torch.randn(out, per_row, generator=g)
    x, y = torch.randn(m, inn, generator=g), torch.randn(m, out, generator=g)
    got = OutlierMatrix(cols, vals, inn).add_to(y, x)
    assert torch.allclose(got.double(), sparse_add_reference(y, x, cols, vals), atol=1e-5)


def _ell(out: int, width: int, groups: int, k: int, dtype: torch.dtype, seed: int = 0):
    """A random ELL outlier layout: ``k`` sorted positions in each of ``groups`` groups of ``width``."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.cat([torch.randperm(width, generator=g)[:k].sort().values for _ in range(groups)])
                       for _ in range(out)]).to(dtype)
    return idx, torch.randn(out, groups * k, generator=g).half()


def _cpu_kernel_or_skip():
    from piecewise_quant.kernels import cpu_backend
    from piecewise_quant.qlinear import ensure_runtime

    if not cpu_backend.status()["available"]:
        pytest.skip("the compiled CPU kernels are not available here")
    ensure_runtime()


# out, width, groups, per group, index dtype: groups of 128 (uint8), one 384-wide group (int16),
# groups of 32 with a tail of 5 entries per row (int32)
LAYOUTS = [(40, 128, 3, 1, torch.uint8), (9, 384, 1, 3, torch.int16), (20, 32, 3, 5, torch.int32)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["u8", "i16", "i32"])
@pytest.mark.parametrize("m", [1, 3, 4, 17, 70])  # gathered rows, a transposed block, two blocks
def test_the_cpu_kernel_sparse_add_matches_the_float64_reference(layout, m):
    _cpu_kernel_or_skip()
    out, width, groups, k, dt = layout
    inn = width * groups + 7  # columns past the last group are never touched
    idx, vals = _ell(out, width, groups, k, dt, seed=m)
    om = OutlierMatrix(idx, vals, inn, k, width)
    g = torch.Generator().manual_seed(100 + m)
    for xd in (torch.float32, torch.bfloat16, torch.float16):
        for yd in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(2, m, inn, generator=g).to(xd)
            y = torch.randn(2, m, out, generator=g).to(yd)
            assert om._kernel(y, x) is not None
            ref = sparse_add_reference(y.reshape(-1, out), x.reshape(-1, inn), om.columns(), vals)
            got = om.add_to(y.clone(), x)
            assert got.shape == y.shape and got.dtype == yd
            # float32 accumulation, one rounding into y's dtype
            ulp = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[yd]
            err = (got.reshape(-1, out).double() - ref).abs()
            assert (err <= ulp * ref.abs() + 1e-4).all(), (xd, yd, err.max().item())


def test_the_cpu_kernel_splits_rows_over_threads_with_the_same_result():
    _cpu_kernel_or_skip()
    idx, vals = _ell(1024, 64, 16, 4, torch.uint8)  # 64 rows x 1024 outputs x 64 entries: over the 2-thread bar
    om = OutlierMatrix(idx, vals, 1024, 4, 64)
    x, y = torch.randn(64, 1024), torch.randn(64, 1024)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = om.add_to(y.clone(), x)
        torch.set_num_threads(2)
        two = om.add_to(y.clone(), x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # rows are split, never the sum of one row
    assert torch.allclose(one.double(), sparse_add_reference(y, x, om.columns(), vals), atol=1e-4)


def test_the_cpu_kernel_and_torch_sparse_agree():
    _cpu_kernel_or_skip()
    idx, vals = _ell(64, 128, 4, 2, torch.uint8)
    fast = OutlierMatrix(idx, vals, 512, 2, 128)
    csr = OutlierMatrix(idx, vals.float(), 512, 2, 128)  # float32 values: the torch.sparse path
    x = torch.randn(5, 512)
    assert fast._kernel(torch.zeros(5, 64), x) is not None and csr._kernel(torch.zeros(5, 64), x) is None
    assert torch.allclose(fast.add_to(torch.zeros(5, 64), x), csr.add_to(torch.zeros(5, 64), x), atol=1e-5)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("m", [1, 9])
def test_a_position_outside_its_group_is_refused_not_read(use_kernel, m, monkeypatch):
    _cpu_kernel_or_skip()
    if not use_kernel:
        monkeypatch.setenv("PIECEWISE_QUANT_KERNEL_BACKEND", "reference")
    idx, vals = _ell(16, 128, 2, 1, torch.uint8)
    idx[5, 1] = 200  # a corrupt checkpoint: position 200 of a group of 128
    om = OutlierMatrix(idx, vals, 256, 1, 128, name="model.layers.0.mlp.down_proj")
    assert (om._kernel(torch.zeros(m, 16), torch.zeros(m, 256)) is not None) == use_kernel
    with pytest.raises(ValueError, match=r"down_proj.*outside its group of 128"):
        om.add_to(torch.zeros(m, 16), torch.randn(m, 256))


def test_a_corrupt_position_is_refused_when_dequantizing():
    lin = torch.nn.Linear(256, 48)
    q = pq.QuantLinear.from_linear(lin, _layer(outliers=1), get_format("piecewise"))
    q.outlier_idx[3, 0] = 64  # groups of 64: positions 0..63
    with pytest.raises(ValueError, match="outside its group of 64"):
        q.dequantize(torch.float32)
    with pytest.raises(ValueError, match="outside its group of 64"), torch.no_grad():
        q(torch.randn(2, 256))


def test_cpu_inference_keeps_no_second_copy_of_the_outliers():
    _cpu_kernel_or_skip()
    lin = torch.nn.Linear(256, 48)
    q = pq.QuantLinear.from_linear(lin, _layer(outliers=2), get_format("piecewise"))
    x = torch.randn(3, 256)
    with torch.no_grad():
        y = q(x)
    assert q._sparse._csr is None  # the kernel read the stored tensors; no float32 CSR was built
    ref = x.double() @ q.dequantize(torch.float64).t() + lin.bias.double()
    assert torch.allclose(y.double(), ref, atol=2e-5)


def test_gradients_take_the_differentiable_path():
    _cpu_kernel_or_skip()
    idx, vals = _ell(8, 64, 2, 2, torch.uint8)
    om = OutlierMatrix(idx, vals, 128, 2, 64)
    x = torch.randn(3, 128, dtype=torch.float64).float().requires_grad_(True)
    assert om._kernel(torch.zeros(3, 8), x) is None
    om.add_to(torch.zeros(3, 8), x).sum().backward()
    dense = torch.zeros(8, 128, dtype=torch.float64).scatter_add_(1, om.columns(), vals.double())
    assert torch.allclose(x.grad.double(), dense.sum(0).expand(3, -1), atol=1e-6)


@pytest.mark.parametrize("grid", ["piecewise", "uniform"])
@pytest.mark.parametrize("m", [1, 17])
def test_quant_linear_is_dense_plus_sparse(grid, m):
    w = _heavy_weight()
    lin = torch.nn.Linear(256, 48)
    lin.weight.data.copy_(w)
    layer = _layer(grid, outliers=0.03)
    q = pq.QuantLinear.from_linear(lin, layer, get_format(grid))
    t = q.quantized_tensors()
    dense = get_format(grid).dequantize(outliers.split_tensors(t), outliers.dense_layer(layer), torch.float64)
    x = torch.randn(2, m, 256)
    ref = sparse_add_reference(x.double() @ dense.t() + lin.bias.double(), x.double(),
                               outliers.global_columns(t["outlier_idx"], layer), t["outlier_vals"])
    with torch.no_grad():
        fast = q(x)
    op = q(x.clone().requires_grad_(True)).detach()  # gradients: the op path, not the prepared call
    for got in (fast, op):
        assert got.shape == (2, m, 48)
        assert torch.allclose(got.double(), ref, atol=2e-5, rtol=1e-5)
    assert torch.allclose(q.dequantize(torch.float64), dense + (q.dequantize(torch.float64) - dense), atol=0)
    assert "outliers=0.03" in repr(q)


def test_the_sparse_cache_follows_the_stored_tensors():
    lin = torch.nn.Linear(256, 48)
    q = pq.QuantLinear.from_linear(lin, _layer(outliers=1), get_format("piecewise"))
    x = torch.randn(3, 256)
    with torch.no_grad():
        before = q(x)
        q.outlier_vals.mul_(2)  # an in-place write must not leave a stale matrix behind
        after = q(x)
    assert not torch.allclose(before, after)
    ref = x.double() @ q.dequantize(torch.float64).t() + lin.bias.double()
    assert torch.allclose(after.double(), ref, atol=2e-5)


# ---- GPTQ ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_problem():
    w = _heavy_weight(64, 256, seed=3)
    x = torch.randn(1024, 256, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.3, 2.0, 256)
    return w, hessian_from_inputs(x)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_with_outliers_beats_gptq_without(gptq_problem, act_order):
    w, h = gptq_problem
    fmt = get_format("uniform")
    plain = _layer("uniform", 3, 256, 64, 256)
    with_out = _layer("uniform", 3, 256, 64, 256, outliers=1)
    cheaper = _layer("uniform", 3, 64, 64, 256)  # smaller groups: more bits than one outlier per 256
    r_with = gptq_quantize(w, h, with_out, fmt, act_order=act_order)
    r_plain = gptq_quantize(w, h, plain, fmt, act_order=act_order)
    r_g64 = gptq_quantize(w, h, cheaper, fmt, act_order=act_order)
    assert fmt.bits_per_weight(with_out) < fmt.bits_per_weight(cheaper)
    assert r_with.error < 0.6 * r_plain.error and r_with.error < r_g64.error
    # the stored tensors are what GPTQ reports, and every group keeps exactly one outlier
    assert torch.equal(fmt.dequantize(r_with.tensors, with_out, torch.float32), r_with.weight)
    assert r_with.tensors["outlier_idx"].shape == (64, 1)


# ---- transformers save / reload -----------------------------------------------------------------


def test_from_pretrained_round_trip_is_bit_exact(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    qcfg = pq.PiecewiseQuantConfig(bits=3, group_size=32, outliers=1, observer="minmax",
                                   overrides={"*.down_proj": {"grid": "uniform", "outliers": 0.1}})
    pq.quantize(model, qcfg, progress=False)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == qcfg.to_dict()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    down = back.model.layers[0].mlp.down_proj
    assert isinstance(down, pq.QuantLinear) and down.outlier_idx.shape == (64, 4 * 4)  # ceil(0.1 * 32) per group
    for name, q in pq.quantized_layers(model).items():
        r = back.get_submodule(name)
        for t, v in q.quantized_tensors().items():
            assert torch.equal(r.quantized_tensors()[t], v), f"{name}.{t}"
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


# ---- calibration: aware fits, GPTQ and mixed precision on a tiny Llama ----------------------------


def _tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # heavy tails, as trained models have
        for lin in (m for m in model.model.modules() if isinstance(m, torch.nn.Linear)):
            spikes = torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.01
            lin.weight.mul_(torch.where(spikes, 12.0, 1.0))
    return model


def _ids(n=8, length=32, seed=0):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _output_error(model, ref_logits):
    with torch.no_grad():
        return float((model(_ids(2, 32, 9)).logits - ref_logits).square().mean())


@pytest.mark.parametrize("preset", ["aware", "gptq"])
def test_calibrated_outliers_lower_the_output_error(preset):
    import copy

    base = _tiny_llama()
    with torch.no_grad():
        ref = base(_ids(2, 32, 9)).logits
    errors = {}
    for o in (None, 1):
        model = copy.deepcopy(base)
        cal = pq.CalibrationConfig.preset(preset, n_samples=8, seq_len=32)
        pq.calibrate(model, pq.PiecewiseQuantConfig(bits=3, group_size=32, outliers=o, calibration=cal), _ids(),
                     progress=False)
        q = pq.quantized_layers(model)
        assert all(("outlier_idx" in m.quantized_tensors()) == (o is not None) for m in q.values())
        errors[o] = _output_error(model, ref)
    assert errors[1] < 0.8 * errors[None]


def test_mixed_precision_weighs_outliers_against_bits():
    model = _tiny_llama()
    cal = pq.CalibrationConfig.preset("gptq", n_samples=8, seq_len=32, mixed_precision_budget=3.0,
                                      mixed_precision_bits=(2, 3, 4), mixed_precision_grids=("uniform",))
    report = pq.calibrate(model, pq.PiecewiseQuantConfig(grid="uniform", bits=3, group_size=32, outliers=1,
                                                         calibration=cal), _ids(), progress=False)
    assert report.mixed_precision["average_bits_per_weight"] <= 3.0
    saved = pq.PiecewiseQuantConfig.from_dict(model.config.quantization_config)
    layers = pq.quantized_layers(model)
    kinds = {(m.spec.bits, m.spec.outliers) for m in layers.values()}
    assert any(o is None for _, o in kinds) and any(o == 1 for _, o in kinds), kinds  # both kinds chosen
    assert any(v.endswith("+o1") for v in report.mixed_precision["plan"].values())
    for name, m in layers.items():
        assert saved.spec_for(name) == m.spec
        assert ("outlier_idx" in m.quantized_tensors()) == (m.spec.outliers is not None)
