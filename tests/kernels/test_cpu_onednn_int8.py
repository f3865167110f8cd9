"""W8A8 layers prepacked for oneDNN's u8 x s8 GEMM (``cpu_backend.prepack_int8``): the same bits as
torch's ``_int_mm`` path, opt-in, never stale, and invisible to saving."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

import piecewise_quant as pq
from piecewise_quant.kernels import cpu_backend, reference
from piecewise_quant.kernels.backends import ENV_FORCE

ONEDNN_OK, ONEDNN_REASON = cpu_backend.onednn_int8_status()
needs_onednn = pytest.mark.skipif(not ONEDNN_OK, reason=f"oneDNN int8 GEMM unavailable: {ONEDNN_REASON}")
pytestmark = pytest.mark.skipif(
    not cpu_backend.status()["available"], reason=f"CPU kernels unavailable: {cpu_backend.status()['reason']}"
)


def _w8a8(k=256, n=48, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=bias))
    cfg = dict(grid="uniform", bits=8, group_size="channel", symmetric=True, act_bits=8, observer="minmax")
    cfg.update(kw)
    return pq.quantize(model, pq.PiecewiseQuantConfig(**cfg), progress=False)


def _unpacked(model, x):
    cpu_backend.prepack_int8(model, enable=False)
    try:
        return model(x)
    finally:
        cpu_backend.prepack_int8(model)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,n", [(256, 48), (64, 160)], ids=["wide", "tall"])
def test_prepacked_w8a8_gives_the_bits_of_the_int_mm_path(k, n, dtype):
    model = _w8a8(k, n)
    x = torch.randn(3, cpu_backend.INT8_GEMM_MIN_ROWS, k, dtype=dtype)
    before = model(x)
    assert cpu_backend.prepack_int8(model) == k * n
    calls = []
    real = torch.ops.onednn.qlinear_pointwise
    try:
        torch.ops.onednn.qlinear_pointwise = lambda *a: calls.append(1) or real(*a)
        y = model(x)
    finally:
        torch.ops.onednn.qlinear_pointwise = real
    assert calls == [1]
    assert y.dtype == dtype and y.shape == before.shape
    assert torch.equal(y, before)  # the same exact int32 sums, converted and scaled in the same order
    xq = reference.quantize_activation(x, "int8", "dynamic_per_token")
    q = model[0]
    expected = xq.double() @ q.dequantize(torch.float64).t() + q.bias.double()
    tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1.5e-3}[dtype]
    assert float((y.double() - expected).norm() / expected.norm()) < tol


@needs_onednn
@pytest.mark.parametrize("act", [dict(act_bits=4), dict(act_clip_ratio=0.9), dict(act_mode="static_per_tensor")])
def test_prepacked_w8a8_matches_other_activation_schemes_and_worst_case_codes(act):
    model = _w8a8(**act)
    q = model[0]
    if act.get("act_mode") == "static_per_tensor":
        q.act_scale.fill_(0.02)
    codes = q.qweight.clone()
    codes[:4] = 255  # level +127 (and the row of the largest products with +127 activations)
    codes[4:8] = 1  # level -127
    q.load_quantized({"qweight": codes, "scales": q.scales})
    x = torch.randn(cpu_backend.INT8_GEMM_MIN_ROWS + 2, q.in_features) * 3
    x[0] = 1e3  # every activation at +qmax
    x[1] = -1e3
    before = model(x)
    cpu_backend.prepack_int8(model)
    assert cpu_backend.is_prepacked(q.qweight)
    assert torch.equal(model(x), before)


@needs_onednn
def test_prepacked_w8a8_runs_onednn_from_fewer_rows_within_the_reference_tolerance():
    model = _w8a8(k=512, n=64)
    cpu_backend.prepack_int8(model)
    x = torch.randn(cpu_backend.ONEDNN_MIN_ROWS, 512)
    y = model(x)
    assert torch.equal(y, cpu_backend._int8_gemm(x, model[0].qweight, model[0].scales, "int8", "dynamic_per_token",
                                                  None, 1.0, 0, cpu_backend._packed_for(model[0].qweight))
                       + model[0].bias)
    xq = reference.quantize_activation(x, "int8", "dynamic_per_token")
    expected = xq.double() @ model[0].dequantize(torch.float64).t() + model[0].bias.double()
    assert float((y.double() - expected).norm() / expected.norm()) < 2e-6
    # fewer rows keep the fused decode kernel (faster there), so one row never touches oneDNN
    real = torch.ops.onednn.qlinear_pointwise
    try:
        torch.ops.onednn.qlinear_pointwise = lambda *a: pytest.fail("oneDNN called for one row")
        model(torch.randn(1, 512))
    finally:
        torch.ops.onednn.qlinear_pointwise = real


@needs_onednn
def test_prepacked_w8a8_handles_nan_and_inf_rows_like_the_reference(monkeypatch):
    model = _w8a8(k=64, n=96)
    cpu_backend.prepack_int8(model)
    x = torch.randn(cpu_backend.INT8_GEMM_MIN_ROWS + 4, 64)
    x[1, 3] = float("nan")
    x[5, 7] = float("inf")
    y = model(x)
    monkeypatch.setenv(ENV_FORCE, "reference")
    expected = model(x)
    assert torch.equal(y.isnan(), expected.isnan()) and y[5].isnan().all() and torch.isfinite(y[1]).all()
    assert torch.allclose(y.nan_to_num(), expected.nan_to_num(), rtol=2e-6, atol=1e-6)


@needs_onednn
def test_a_packed_copy_is_never_used_after_the_codes_change_or_the_layer_moves():
    model = _w8a8()
    q = model[0]
    cpu_backend.prepack_int8(model)
    x = torch.randn(cpu_backend.INT8_GEMM_MIN_ROWS, 256)
    q.load_quantized({"qweight": torch.flip(q.qweight, [0]).contiguous(), "scales": torch.flip(q.scales, [0])})
    assert not cpu_backend.is_prepacked(q.qweight)
    assert torch.equal(model(x), _unpacked(model, x))  # the new codes, not the packed old ones
    cpu_backend.prepack_int8(model)
    moved = model.to(torch.float32)  # same tensors: still packed
    assert cpu_backend.is_prepacked(moved[0].qweight)
    cpu_backend.prepack_int8(model, enable=False)
    assert not cpu_backend.is_prepacked(q.qweight)


@needs_onednn
def test_prepacking_changes_neither_the_saved_bytes_nor_other_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.Linear(64, 32))
    cfg = pq.PiecewiseQuantConfig(grid="uniform", bits=8, group_size="channel", symmetric=True, act_bits=8,
                                  overrides={"1": dict(grid="piecewise", bits=4, group_size=32, act_bits=None)})
    q = pq.quantize(model, cfg, progress=False)
    saved = save({k: v.contiguous() for k, v in q.state_dict().items()})
    assert cpu_backend.prepack_int8(q) == 256 * 64  # only the W8A8 layer
    assert not cpu_backend.is_prepacked(q[1].qweight)
    q(torch.randn(20, 256))
    assert save({k: v.contiguous() for k, v in q.state_dict().items()}) == saved
    asym = _w8a8(act_mode="dynamic_per_token_asym")
    assert cpu_backend.prepack_int8(asym) == 0  # asymmetric activations are not u8 x s8 with one zero point


def test_onednn_int8_gemm_is_available_and_exact_on_vnni_cpus():
    if cpu_backend.status()["isa"] != "avx512-vnni":
        pytest.skip("no AVX-512 VNNI here: oneDNN may pair u8 x s8 products in saturating 16-bit sums")
    assert ONEDNN_OK, ONEDNN_REASON


def test_prepack_refuses_where_onednn_is_unavailable_or_inexact(monkeypatch):
    monkeypatch.setattr(cpu_backend, "onednn_int8_status", lambda: (False, "no VNNI here"))
    with pytest.raises(RuntimeError, match="no VNNI here"):
        cpu_backend.prepack_int8(_w8a8())


@needs_onednn
def test_inspect_names_the_prepacked_kernel():
    from piecewise_quant.integrations.cli.common import kernel_label as label

    model = _w8a8()
    assert label(model[0], rows=64) == "cpu int8 GEMM (torch._int_mm)"
    assert label(model[0], rows=8).startswith("cpu avx") or "integer" in label(model[0], rows=8)
    cpu_backend.prepack_int8(model)
    assert label(model[0], rows=64) == "cpu int8 GEMM (oneDNN u8s8, prepacked)"
    assert label(model[0], rows=cpu_backend.ONEDNN_MIN_ROWS) == "cpu int8 GEMM (oneDNN u8s8, prepacked)"
    assert "oneDNN" not in label(model[0], rows=1)


@needs_onednn
def test_a_layer_loaded_in_inference_mode_drops_its_packed_copy_when_its_codes_change():
    model = _w8a8()
    q = model[0]
    x = torch.randn(cpu_backend.INT8_GEMM_MIN_ROWS, 256)
    with torch.inference_mode():
        q._buffers["qweight"] = q.qweight.clone()  # an inference tensor: no version counter
        assert cpu_backend.prepack_int8(model) == 256 * 48 and cpu_backend.is_prepacked(q.qweight)
        before = model(x)
        q.load_quantized({"qweight": torch.flip(q.qweight, [0]).contiguous(), "scales": torch.flip(q.scales, [0])})
        assert not cpu_backend.is_prepacked(q.qweight)
        after = model(x)
        assert torch.equal(after, _unpacked(model, x)) and not torch.equal(after, before)
