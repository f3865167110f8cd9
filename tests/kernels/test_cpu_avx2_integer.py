"""The AVX2 tier's integer kernel (``i16_*`` in ``pq_cpu.c``): int16 weights times int16 activation
pieces, forced with ``PIECEWISE_QUANT_CPU_TIER=1`` so that it runs on AVX-512 machines too.

What a user relies on: the same results as the float64 product within the fp32/bf16 tolerances of
``test_cpu_backend.py``, at the extremes of the int32 sums (8-bit codes and activations at full scale
over a 4096-wide row), with NaN handled as the reference does, and ``explain`` naming the kernel."""

from __future__ import annotations

import pytest
import torch

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


def _relerr(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _expected(q, x):
    return x.double() @ q.dequantize(torch.float64).t()


def test_explain_names_the_integer_kernel_where_the_blocks_fit():
    assert cpu_backend.explain("uniform_sym", 4, 128, 4096) == "cpu avx2 (integer)"
    assert cpu_backend.explain("piecewise", 3, 64, 4096, torch.bfloat16) == "cpu avx2 (integer)"
    assert cpu_backend.explain("uniform_asym", 8, -1, 4096, act_format="int8") == "cpu avx2 (integer)"
    # 4-bit codes go in blocks of 32 weights, other widths in blocks of 16
    assert cpu_backend.explain("uniform_sym", 4, 16, 4096) == "cpu avx2 (fp32)"
    assert cpu_backend.explain("uniform_sym", 3, 16, 4096) == "cpu avx2 (integer)"
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
    ("uniform", 4, True, 16),  # not a block of 32: the fp32 kernel
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
