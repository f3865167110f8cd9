"""The AVX2 tier's integer kernel (``i16_*`` in ``pq_cpu.c``): int16 weights times int16 activation
pieces, forced with ``PIECEWISE_QUANT_CPU_TIER=1`` so that it runs on AVX-512 machines too.

What a user relies on: the same results as the float64 product within the fp32/bf16 tolerances of
``test_cpu_backend.py``, at the extremes of the int32 sums (8-bit codes and activations at full scale
over a 4096-wide row), with NaN handled as the reference does, and ``explain`` naming the kernel."""

from __future__ import annotations

import pytest
import torch
from pq_kernel_checks import expected as _expected
from pq_kernel_checks import relerr as _relerr

import piecewise_quant as pq
from piecewise_quant.kernels import cpu_backend, reference
from piecewise_quant.kernels.backends import ENV_FORCE

pytestmark = pytest.mark.skipif(
    not cpu_backend.status()["available"], reason=f"CPU kernels unavailable: {cpu_backend.status()['reason']}"
)

TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1.5e-3}


@pytest.fixture(autouse=True)
def avx2(monkeypatch):
    monkeypatch.setenv("PIECEWISE_QUANT_CPU_TIER", "1")
    monkeypatch.setattr(cpu_backend, "status", lambda: {"available": True, "isa": "avx2", "reason": None,
                                                         "features": ""})


def _quantize(lin: torch.nn.Linear, **cfg) -> torch.nn.Module:
    return pq.quantize(torch.nn.Sequential(lin), pq.PiecewiseQuantConfig(observer="minmax", **cfg), progress=False)[0]


def test_explain_names_the_integer_kernel_where_the_blocks_fit():
    assert cpu_backend.explain("uniform_sym", 4, 128, 4096) == "cpu avx2 (integer)"
    assert cpu_backend.explain("piecewise", 3, 64, 4096, torch.bfloat16) == "cpu avx2 (integer)"
    assert cpu_backend.explain("uniform_asym", 8, -1, 4096, act_format="int8") == "cpu avx2 (integer)"
    # blocks of 16 weights at every width: 4-bit groups of 16 (NVFP4's) too
    assert cpu_backend.explain("uniform_sym", 4, 16, 4096) == "cpu avx2 (integer)"
    assert cpu_backend.explain("nvfp4", 4, 16, 4096, torch.bfloat16) == "cpu avx2 (integer)"
    assert cpu_backend.explain("uniform_sym", 3, 16, 4096) == "cpu avx2 (integer)"
    assert cpu_backend.explain("uniform_sym", 4, -1, 40) == "cpu avx2 (fp32)"
    assert cpu_backend.explain("piecewise", 8, 128, 4096) == "cpu avx2 (fp32)"
    assert cpu_backend.explain("fp8_e4m3", 8, -1, 4096) == "cpu avx2 (fp32)"


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_scale_8bit_codes_and_activations_over_a_wide_row_do_not_overflow(sign, dtype):
    k = 4096  # per channel: one group, several int32 runs of 1024 weights
    lin = torch.nn.Linear(k, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.rand(8, k))
        lin.weight[:, 0] = 0.0
        lin.weight[0] = 1.0  # row 0: the largest code (255) everywhere but column 0
        lin.weight[0, 0] = 0.0
    q = _quantize(lin, grid="uniform", bits=8, group_size=-1, symmetric=False)
    assert int(q.qweight[0, 1:].min()) == 255
    x = torch.full((1, k), sign, dtype=dtype)  # every activation at the full int16 scale
    y = q(x)
    assert _relerr(y, _expected(q, x)) < TOL[dtype]


@pytest.mark.parametrize("grid,bits,sym,group", [
    ("uniform", 4, True, 128), ("uniform", 4, False, 32), ("uniform", 3, False, 16), ("uniform", 2, True, 64),
    ("uniform", 8, False, 16), ("piecewise", 4, None, 32), ("piecewise", 3, None, 128), ("piecewise", 2, None, 16),
    ("uniform", 4, True, 16),  # 4-bit groups of 16: 16 codes at a time, activations in natural order
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_formats_match_the_float64_product_for_decode_rows(grid, bits, sym, group, dtype):
    torch.manual_seed(1)
    cfg = dict(grid=grid, bits=bits, group_size=group)
    if sym is not None:
        cfg["symmetric"] = sym
    q = _quantize(torch.nn.Linear(512, 40, bias=False), **cfg)
    for m in (1, 3, 5, cpu_backend.GEMV_MAX_ROWS):
        x = torch.randn(m, 512).to(dtype)
        assert _relerr(q(x), _expected(q, x)) < TOL[dtype], (m, dtype)


def test_fp32_rows_with_a_wide_dynamic_range_keep_fp32_accuracy():
    torch.manual_seed(2)
    q = _quantize(torch.nn.Linear(1024, 64, bias=False), grid="piecewise", bits=4, group_size=128)
    x = torch.randn(2, 1024) * torch.logspace(-4, 1, 1024)  # magnitudes 1e-4 .. 10 in one row
    assert _relerr(q(x), _expected(q, x)) < TOL[torch.float32]


def test_nan_and_inf_rows_give_what_the_reference_gives(monkeypatch):
    torch.manual_seed(3)
    q = _quantize(torch.nn.Linear(256, 32, bias=False), grid="uniform", bits=4, group_size=128)
    x = torch.randn(3, 256)
    x[0, 5] = float("nan")
    x[2, 9] = float("inf")
    y = q(x)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()
    assert _relerr(y[1:2], _expected(q, x[1:2])) < TOL[torch.float32]

    w8a8 = _quantize(torch.nn.Linear(256, 32, bias=False), grid="uniform", bits=8, group_size=-1, symmetric=True,
                     act_bits=8)
    x = torch.randn(2, 256)
    x[0, 5] = float("nan")
    y = w8a8(x)
    monkeypatch.setenv(ENV_FORCE, "reference")
    expected = w8a8(x)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.allclose(y.nan_to_num(), expected.nan_to_num(), atol=1e-5)


@pytest.mark.parametrize("act_bits", [8, 4])
def test_integer_activations_are_exact_integer_products(act_bits):
    torch.manual_seed(4)
    q = _quantize(torch.nn.Linear(512, 48, bias=False), grid="piecewise", bits=4, group_size=128, act_bits=act_bits)
    x = torch.randn(4, 512)
    _, act = q.act_quantizer.prepare(x)
    xq = reference.quantize_activation(x, act.format, act.mode, act.scale, act.clip_ratio, act.topk)
    assert _relerr(q(x), xq.double() @ q.dequantize(torch.float64).t()) < 2e-6


@pytest.mark.parametrize("grid,sym,group,k", [
    ("uniform", True, 16, 384), ("uniform", False, 48, 384), ("piecewise", None, 16, 384), ("nvfp4", None, 16, 384),
    ("uniform", True, -1, 80),  # one group, 80 wide: not a multiple of 32
], ids=str)
def test_4bit_codes_outside_blocks_of_32_run_the_integer_kernel(grid, sym, group, k):
    """4-bit groups of 16 or 48 (NVFP4's included) and rows whose width is not a multiple of 32 decode
    16 codes at a time against activations in natural order; the integer path is forced (path 1
    returns False where it cannot run), so the fp32 kernel cannot stand in for it."""
    torch.manual_seed(5)
    cfg = dict(grid=grid, bits=4, group_size=group)
    if sym is not None:
        cfg["symmetric"] = sym
    q = _quantize(torch.nn.Linear(k, 33, bias=False), **cfg)
    w = q.fmt.weight_operand(q.quantized_tensors(), q.layer_spec)
    ext, _ = cpu_backend._extension()
    desc = cpu_backend._describe(ext, w.qweight, w.scales, w.aux, w.format, w.bits, w.group_size, w.in_features)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for m in (1, 2, 5):
            x = torch.randn(m, k).to(dtype)
            y = torch.empty(m, 33, dtype=dtype)
            assert ext.gemv(desc, x.data_ptr(), cpu_backend._DTYPES[dtype], m, k, y.data_ptr(), cpu_backend._DTYPES[dtype],
                            33, 0, 0, 1, 1, 0, 127.0, 1.0, 0, 0, 1)  # tier 1, path 1: the int16 kernel, or False
            assert _relerr(y, _expected(q, x)) < TOL[dtype], (dtype, m)
            assert _relerr(q(x), _expected(q, x)) < TOL[dtype], (dtype, m)
    assert cpu_backend.explain(w.format, 4, group, k) == "cpu avx2 (integer)"
