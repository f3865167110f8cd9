"""The CPU kernel backend (``kernels/cpu_backend.py`` + the compiled ``_pq_cpu``) against the reference.

Every built-in format, group size, activation dtype and activation-quantization mode is compared with
the product of the dequantized weight computed in float64, on both instruction-set tiers this machine
has (``PIECEWISE_QUANT_CPU_TIER=1`` forces the AVX2 kernels), for a single row (the fused kernels),
a few rows and many rows (dequantized blocks + torch's GEMM).
"""

from __future__ import annotations

import json
import platform
import warnings

import pytest
import torch
from pq_kernel_checks import expected as _expected
from pq_kernel_checks import relerr as _relerr

import piecewise_quant as pq
from piecewise_quant.kernels import cpu_backend, ops, reference
from piecewise_quant.kernels.backends import ENV_FORCE

pytestmark = pytest.mark.skipif(
    not cpu_backend.status()["available"], reason=f"CPU kernels unavailable: {cpu_backend.status()['reason']}"
)

# relative error (Frobenius norm) against the float64 product, by activation dtype: fp32 keeps fp32
# accuracy; bf16/fp16 outputs are rounded to their dtype
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1.5e-3}

FORMATS = [
    ("uniform", 4, True), ("uniform", 4, False), ("uniform", 3, False), ("uniform", 2, True),
    ("uniform", 8, True), ("uniform", 8, False),
    ("piecewise", 4, None), ("piecewise", 3, None), ("piecewise", 2, None), ("piecewise", 8, None),
]


def _quantized(grid, bits, group_size, symmetric=None, k=256, n=48, bias=False, seed=0, **kw):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    cfg = dict(grid=grid, bits=bits, group_size=group_size, observer="minmax", **kw)
    if symmetric is not None:
        cfg["symmetric"] = symmetric
    return pq.quantize(torch.nn.Sequential(lin), pq.PiecewiseQuantConfig(**cfg), progress=False)[0]


@pytest.fixture(params=["best", "avx2"])
def tier(request, monkeypatch):
    if request.param == "avx2":
        monkeypatch.setenv("PIECEWISE_QUANT_CPU_TIER", "1")
    return request.param


@pytest.mark.parametrize("grid,bits,sym", FORMATS, ids=lambda v: str(v))
@pytest.mark.parametrize("group", [32, 128, "channel"])
def test_every_format_matches_the_float64_product(tier, grid, bits, sym, group):
    q = _quantized(grid, bits, group, sym)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for m in (1, 3, cpu_backend.GEMV_MAX_ROWS + 5):
            x = torch.randn(m, q.in_features).to(dtype)
            y = q(x)
            assert y.dtype == dtype and y.shape == (m, q.out_features)
            err = _relerr(y, _expected(q, x))
            assert err < TOL[dtype], (grid, bits, group, dtype, m, err)


@pytest.mark.parametrize("group", [64, 256, "tensor", 40])
def test_other_group_sizes_and_ragged_shapes(tier, group):
    k = 280 if group == 40 else 512
    for grid, bits, sym in (("uniform", 4, False), ("piecewise", 4, None), ("piecewise", 3, None), ("uniform", 8, True)):
        q = _quantized(grid, bits, group, sym, k=k, n=37, bias=True)  # odd: the last row has no pair
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 5, k).to(dtype)
            y = q(x)
            assert y.shape == (2, 5, 37)
            assert _relerr(y, _expected(q, x)) < TOL[dtype]


def test_fp8_weights(tier):
    for group in ("channel", "tensor"):
        q = _quantized("fp8", 8, group, k=256, n=40)
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(3, 256).to(dtype)
            assert _relerr(q(x), _expected(q, x)) < TOL[dtype]


def test_non_contiguous_3d_inputs_bias_and_empty_batches():
    q = _quantized("piecewise", 4, 128, k=256, n=64, bias=True)
    x = torch.randn(256, 6, 3).permute(2, 1, 0)  # (3, 6, 256), last dim strided
    assert not x.is_contiguous()
    y = q(x)
    torch.testing.assert_close(y, _expected(q, x.contiguous()).float(), rtol=2e-6, atol=2e-6)
    assert q(torch.randn(0, 256)).shape == (0, 64)
    assert q(torch.randn(2, 0, 256)).shape == (2, 0, 64)


@pytest.mark.parametrize("act_bits,mode,topk", [(8, "dynamic_per_token", 0), (8, "dynamic_per_token", 2),
                                                (4, "dynamic_per_token", 0), (8, "static_per_tensor", 0)])
@pytest.mark.parametrize("grid,bits,sym", [("uniform", 8, True), ("uniform", 4, False), ("piecewise", 4, None),
                                           ("piecewise", 3, None)])
def test_integer_activations_follow_the_reference_quantizer(grid, bits, sym, act_bits, mode, topk):
    q = _quantized(grid, bits, "channel" if bits == 8 else 128, sym, act_bits=act_bits, act_mode=mode,
                   act_topk=topk, act_clip_ratio=0.9)
    if q.act_scale is not None:
        q.act_scale.fill_(0.02)
    for m in (1, 2, 4, cpu_backend.GEMV_MAX_ROWS + 3):  # 2: row pairs times two activation rows
        x = torch.randn(m, q.in_features)
        _, act = q.act_quantizer.prepare(x)
        xq = reference.quantize_activation(x, act.format, act.mode, act.scale, act.clip_ratio, act.topk)
        expected = xq.double() @ q.dequantize(torch.float64).t()
        assert _relerr(q(x), expected) < 2e-6


@pytest.mark.parametrize("group", ["channel", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_many_rows_run_torch_int8_gemm_on_the_stored_codes(group, dtype, monkeypatch):
    q = _quantized("uniform", 8, group, True, act_bits=8, bias=True)
    stored = q.qweight.clone()
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or real(a, b))
    x = torch.randn(3, cpu_backend.GEMV_MAX_ROWS, q.in_features, dtype=dtype)
    xq = reference.quantize_activation(x, "int8", "dynamic_per_token")
    expected = xq.double() @ q.dequantize(torch.float64).t() + q.bias.double()
    y = q(x)
    assert calls == [(3 * cpu_backend.GEMV_MAX_ROWS, q.in_features)]
    assert y.dtype == dtype and y.shape == (3, cpu_backend.GEMV_MAX_ROWS, q.out_features)
    assert _relerr(y, expected) < (2e-6 if dtype == torch.float32 else 8e-3)
    assert torch.equal(q.qweight, stored)  # the signed levels go to a scratch buffer, never into the layer
    assert cpu_backend.explain("uniform_sym", 8, -1, 256, dtype, "int8", rows=48) == "cpu int8 GEMM (torch._int_mm)"


def test_scratch_buffers_made_under_inference_mode_still_serve_calls_outside_it(monkeypatch):
    # the W8A8 GEMM's levels and the tiled path's blocks go to per-thread scratch buffers; one first
    # allocated under torch.inference_mode() used to be an inference tensor that later calls could not write
    monkeypatch.setattr(cpu_backend._local, "buffers", {}, raising=False)
    w8a8 = _quantized("uniform", 8, "channel", True, act_bits=8)
    w4 = _quantized("piecewise", 4, 128)
    x = torch.randn(cpu_backend.INT8_GEMM_MIN_ROWS, 256)
    with torch.inference_mode():
        inside = (w8a8(x), w4(x))
    outside = (w8a8(x), w4(x))
    assert all(torch.equal(a, b) for a, b in zip(inside, outside))


@pytest.mark.parametrize("grid", ["mxfp4", "nvfp4"])
def test_fp4_layers_quantized_under_inference_mode_run_and_follow_new_scales(grid):
    # inference tensors have no version counter, which the decoded-scale cache is keyed on
    x = torch.randn(2, 256)
    with torch.inference_mode():
        q = _quantized(grid, 4, 32 if grid == "mxfp4" else 16)
        y = q(x)
        assert _relerr(y, _expected(q, x)) < 2e-6
        scales = q.scales.clone()  # MXFP4's E8M0 exponents + 1: every block scale doubled
        changed = scales + 1 if grid == "mxfp4" else torch.flip(scales, [0]).contiguous()
        q.load_quantized({**q.quantized_tensors(), "scales": changed})
        y2 = q(x)
    assert _relerr(y2, _expected(q, x)) < 2e-6 and not torch.equal(y, y2)


@pytest.mark.parametrize("order", [None, False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", [(256, 48), (64, 160)], ids=["wide", "tall"])
def test_w8a8_many_rows_give_the_same_result_in_either_operand_order(k, n, dtype, order, monkeypatch):
    q = _quantized("uniform", 8, "channel", True, k=k, n=n, act_bits=8, bias=True)
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(tuple(a.shape)) or real(a, b))
    monkeypatch.setattr(cpu_backend, "INT8_GEMM_WEIGHT_LEFT", order)
    x = torch.randn(3, cpu_backend.GEMV_MAX_ROWS, k, dtype=dtype)
    xq = reference.quantize_activation(x, "int8", "dynamic_per_token")
    expected = xq.double() @ q.dequantize(torch.float64).t() + q.bias.double()
    y = q(x)
    weight_left = n >= k if order is None else order  # by shape: the weight on the left when out >= in
    assert calls == [(n, k) if weight_left else (3 * cpu_backend.GEMV_MAX_ROWS, k)]
    assert y.dtype == dtype and y.shape == (3, cpu_backend.GEMV_MAX_ROWS, n) and y.is_contiguous()
    assert _relerr(y, expected) < (2e-6 if dtype == torch.float32 else 8e-3)
    monkeypatch.setattr(cpu_backend, "INT8_GEMM_WEIGHT_LEFT", not weight_left)
    assert torch.equal(q(x), y)  # the same int32 sums and the same float products in the other order


@pytest.mark.parametrize("topk", [0, 2])
def test_w8a8_many_rows_quantize_activations_bit_for_bit_like_the_reference(topk, monkeypatch):
    q = _quantized("uniform", 8, "channel", True, act_bits=8, act_topk=topk)
    captured = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: captured.append(a.clone()) or real(a, b))
    x = torch.randn(cpu_backend.INT8_GEMM_MIN_ROWS + 3, q.in_features) * torch.logspace(-3, 3, q.in_features)
    x[1] = 0.0  # a zero row: scale 1, codes 0
    q(x)
    assert len(captured) == 1
    xf = x.float()
    mag = xf.abs()
    rng = mag.topk(topk + 1, dim=-1).values[..., -1:] if topk else mag.amax(-1, keepdim=True)
    scale = rng / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    xq = reference.quantize_activation(x, "int8", "dynamic_per_token", None, 1.0, topk)
    assert torch.equal(captured[0].float() * scale, xq)


def test_w8a8_many_rows_give_inf_rows_what_the_reference_gives(monkeypatch):
    q = _quantized("uniform", 8, "channel", True, act_bits=8, bias=True)
    x = torch.randn(cpu_backend.INT8_GEMM_MIN_ROWS + 1, 256)
    x[2, 5] = float("inf")
    x[4, 9] = float("-inf")
    y = q(x)
    monkeypatch.setenv(ENV_FORCE, "reference")
    expected = q(x)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    assert torch.allclose(y.nan_to_num(), expected.nan_to_num(), atol=1e-5)


@pytest.mark.parametrize("order", [False, True])
def test_w8a8_many_rows_keep_the_int8_gemm_for_the_finite_rows_beside_nan_and_inf(order, monkeypatch):
    q = _quantized("uniform", 8, "channel", True, k=64, n=96, act_bits=8, bias=True)
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(1) or real(a, b))
    monkeypatch.setattr(cpu_backend, "INT8_GEMM_WEIGHT_LEFT", order)
    x = torch.randn(cpu_backend.INT8_GEMM_MIN_ROWS + 4, 64)
    x[1, 3] = float("nan")  # NaN: the reference's scale is NaN, so the row quantizes to zeros (bias out)
    x[5, 7] = float("inf")  # Inf: an infinite scale, the whole row NaN
    x[8, 0], x[8, 9] = float("-inf"), float("nan")  # both: the NaN decides
    y = q(x)
    assert calls == [1]  # one integer GEMM, no fall back to the reference for the whole batch
    monkeypatch.setenv(ENV_FORCE, "reference")
    expected = q(x)
    assert torch.equal(y.isnan(), expected.isnan())
    assert y[5].isnan().all() and torch.isfinite(y[1]).all() and torch.isfinite(y[8]).all()
    assert torch.allclose(y.nan_to_num(), expected.nan_to_num(), rtol=2e-6, atol=1e-6)


def test_fp8_activations_follow_the_reference_quantizer():
    q = _quantized("fp8", 8, "channel", act_bits=8, act_format="fp8")
    x = torch.randn(2, q.in_features)
    xq = reference.quantize_activation(x, "fp8_e4m3", "dynamic_per_token", None, 1.0, 0)
    assert _relerr(q(x), xq.double() @ q.dequantize(torch.float64).t()) < 2e-6


def test_nan_activations_give_nan_like_the_reference(monkeypatch):
    q = _quantized("uniform", 4, 128)
    x = torch.randn(2, 256)
    x[0, 7] = float("nan")
    y = q(x)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()

    # W8A8 many rows (torch's int8 GEMM): a row holding NaN gets what the reference gives it
    w8a8 = _quantized("uniform", 8, "channel", True, act_bits=8, bias=True)
    x = torch.randn(cpu_backend.INT8_GEMM_MIN_ROWS + 1, 256)
    x[0, 7] = float("nan")
    y = w8a8(x)
    monkeypatch.setenv(ENV_FORCE, "reference")
    expected = w8a8(x)
    assert torch.equal(y[0].isnan(), expected[0].isnan()) and torch.allclose(y.nan_to_num(), expected.nan_to_num(), atol=1e-5)


def test_results_do_not_depend_on_the_thread_count():
    q = _quantized("piecewise", 4, 128, k=1024, n=512)
    x = torch.randn(2, 1024)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = q(x)
        torch.set_num_threads(2)
        two = q(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_the_backend_is_chosen_and_the_reference_is_the_fallback(monkeypatch):
    from piecewise_quant.kernels import select_backend

    pq.qlinear.ensure_runtime()
    assert select_backend("cpu", "piecewise", 4, 128, torch.float32, "none").name == "cpu"
    monkeypatch.setenv(ENV_FORCE, "reference")
    assert select_backend("cpu", "piecewise", 4, 128, torch.float32, "none") is None


def test_missing_extension_warns_once_and_uses_the_reference(monkeypatch):
    q = _quantized("uniform", 4, 128)
    x = torch.randn(2, 256)
    monkeypatch.setattr(cpu_backend, "_extension", lambda: (None, "the compiled extension is missing (test)"))
    monkeypatch.setattr(cpu_backend, "_warned", False)
    with pytest.warns(RuntimeWarning, match="compiled extension is missing"):
        y = q(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q(x)  # no second warning
    monkeypatch.setenv(ENV_FORCE, "reference")
    torch.testing.assert_close(y, q(x), rtol=0, atol=0)


def test_gradients_through_the_cpu_kernels_match_the_float_layer():
    q = _quantized("piecewise", 4, 128, bias=True)
    q.bias.requires_grad_(True)
    x = torch.randn(3, 256, requires_grad=True)
    q(x).square().sum().backward()
    w = q.dequantize().detach()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = q.bias.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, w, b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.bias.grad, b2.grad, rtol=1e-5, atol=1e-5)


def _safetensors_parts(path):
    """(parsed header, data bytes): the header's JSON key order is not stable across saves
    (safetensors keeps metadata in a hash map), so it is compared parsed; the data byte for byte."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def test_running_the_kernels_leaves_the_checkpoint_bytes_unchanged(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    pq.quantize(model, pq.PiecewiseQuantConfig(bits=4, group_size=128), progress=False)
    pq.save_quantized(model, tmp_path / "before")
    with torch.no_grad():
        for m in (1, 7, 40):
            model(torch.randn(m, 256))
    pq.save_quantized(model, tmp_path / "after")
    files = sorted(f.name for f in (tmp_path / "before").iterdir())
    assert files == sorted(f.name for f in (tmp_path / "after").iterdir())
    for name in files:
        before, after = tmp_path / "before" / name, tmp_path / "after" / name
        if name.endswith(".safetensors"):
            assert _safetensors_parts(before) == _safetensors_parts(after), name
        else:
            assert before.read_bytes() == after.read_bytes(), name


def test_quantized_layer_holds_no_float_copy_of_its_weight():
    q = _quantized("uniform", 4, 128, k=1024, n=512)
    stored = sum(t.numel() * t.element_size() for t in q.quantized_tensors().values())
    q(torch.randn(1, 1024))
    q(torch.randn(40, 1024))
    resident = sum(b.numel() * b.element_size() for b in q.buffers()) + sum(
        p.numel() * p.element_size() for p in q.parameters())
    assert resident <= 1.1 * stored


SMALL_GROUPS = [("uniform", 4, True, 16), ("uniform", 4, False, 32), ("uniform", 3, False, 64), ("uniform", 8, True, 16),
                ("piecewise", 4, None, 32), ("piecewise", 3, None, 16), ("mxfp4", 4, None, 32), ("nvfp4", 4, None, 16)]


@pytest.mark.skipif(cpu_backend.status()["isa"] != "avx512-vnni", reason="the integer kernel needs AVX-512 VNNI")
@pytest.mark.parametrize("grid,bits,sym,group", SMALL_GROUPS, ids=lambda v: str(v))
def test_groups_under_a_block_run_the_integer_kernel_at_its_accuracy(grid, bits, sym, group):
    """Groups of 16/32/64 (FP4's blocks included) take the integer kernel, scales applied lane by lane,
    and keep its accuracy for float and integer activations."""
    q = _quantized(grid, bits, group, sym, k=384, n=33, bias=True)
    w = q.fmt.weight_operand(q.quantized_tensors(), q.layer_spec)
    ext, _ = cpu_backend._extension()
    desc = cpu_backend._describe(ext, w.qweight, w.scales, w.aux, w.format, w.bits, w.group_size, w.in_features)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for m in (1, 2, 5):
            x = torch.randn(m, 384).to(dtype)
            y = torch.empty(m, 33, dtype=dtype)
            assert ext.gemv(desc, x.data_ptr(), cpu_backend._DTYPES[dtype], m, 384, y.data_ptr(), cpu_backend._DTYPES[dtype],
                            33, 0, 0, 1, -1, 0, 127.0, 1.0, 0, 0, 1)  # path 1: the integer kernel, or False
            assert _relerr(y, _expected(q, x) - q.bias.double()) < TOL[dtype], (dtype, m)
            assert _relerr(q(x), _expected(q, x)) < TOL[dtype]
    assert cpu_backend.explain(w.format, bits, group, 384) == "cpu avx512-vnni (integer)"
    act = _quantized(grid, bits, group, sym, k=384, n=33, act_bits=8)
    for m in (1, 3):
        x = torch.randn(m, 384)
        xq = reference.quantize_activation(x, "int8", "dynamic_per_token")
        assert _relerr(act(x), xq.double() @ act.dequantize(torch.float64).t()) < 2e-6


def test_explain_names_the_kernel_or_the_reason():
    isa = cpu_backend.status()["isa"]
    assert cpu_backend.explain("piecewise", 4, 128, 4096).startswith(f"cpu {isa}")
    assert cpu_backend.explain("uniform_sym", 4, 12, 96).startswith("reference (group size 12")
    assert cpu_backend.explain("piecewise", 4, 128, 4096, rows=64) == "cpu dequantized blocks + torch float32 GEMM"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the kernels are x86-64 only")
def test_the_extension_is_built_on_this_platform():
    assert cpu_backend.status()["available"], cpu_backend.status()["reason"]


def test_the_op_dispatches_to_the_cpu_backend(monkeypatch):
    q = _quantized("uniform", 4, 128)
    calls = []
    real = cpu_backend._linear

    def counting(*args):
        calls.append(1)
        return real(*args)

    pq.qlinear.ensure_runtime()
    from piecewise_quant.kernels import backends

    backend = backends.registered_backends()["cpu"]
    monkeypatch.setitem(backends._BACKENDS, "cpu", backend.__class__(backend.name, backend.device_type, backend.supports,
                                                                      counting, backend.priority))
    t = q.quantized_tensors()
    ops.linear(torch.randn(2, 256), t["qweight"], t["scales"], t.get("qzeros"), None, None, "uniform_asym", 4, 128, 256,
               "none", "dynamic_per_token", 1.0, 0)
    assert calls


def test_the_prepared_decode_path_follows_new_tensors_and_the_forced_backend(monkeypatch):
    q = _quantized("uniform", 4, 128, seed=0)
    other = _quantized("uniform", 4, 128, seed=1)
    x = torch.randn(1, 256)
    with torch.no_grad():
        first = q(x)
        q.load_quantized({k: v.clone() for k, v in other.quantized_tensors().items()})  # copied into the same buffers
        assert torch.equal(q(x), other(x)) and not torch.equal(q(x), first)
        q.to(torch.float32)  # new buffer objects
        for name, t in other.quantized_tensors().items():
            q._buffers[name] = t.clone()
        assert torch.equal(q(x), other(x))
        monkeypatch.setenv(ENV_FORCE, "reference")
        assert _relerr(q(x), _expected(other, x)) < 2e-6
        assert torch.equal(q(x), reference.linear(x, *[other.quantized_tensors()[k] for k in ("qweight", "scales")],
                                                  other.quantized_tensors().get("qzeros"), None, None, "uniform_asym", 4,
                                                  128, 256))


def test_a_layer_that_has_run_deep_copies_and_pickles():
    import copy
    import io

    q = _quantized("uniform", 4, 128)
    x = torch.randn(1, q.in_features)
    y = q(x)  # builds the prepared decode call
    for clone in (copy.deepcopy(q), torch.load(io.BytesIO(_saved(q)), weights_only=False)):
        assert torch.equal(clone(x), y)
        clone.qweight.zero_()
        assert torch.equal(q(x), y)  # the copy's tensors are its own


def _saved(module) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(module, buf)
    return buf.getvalue()
