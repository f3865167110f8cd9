"""Asymmetric dynamic per-token integer activations (``act_mode="dynamic_per_token_asym"``): a scale
and an offset per token, every host path equal to the float64 reference of the same rounding."""

from __future__ import annotations

import pytest
import torch
from pq_tiny_models import logits as _logits
from pq_tiny_models import tiny_llama

import piecewise_quant as pq
from piecewise_quant.args import ActArgs, OnlineRotation
from piecewise_quant.kernels import reference
from piecewise_quant.quantization import layer_spec_for

ASYM = "dynamic_per_token_asym"


def _asym_float64(x: torch.Tensor, qmax: float, clip: float) -> torch.Tensor:
    """The same rounding written out in float64: 2*qmax+2 levels from each row's minimum to maximum."""
    xd = x.double()
    hi, lo = xd.amax(-1, keepdim=True), xd.amin(-1, keepdim=True)
    mid, half = (hi + lo) / 2, (hi - lo) / 2 * clip
    step = 2 * half / (2 * qmax + 1)
    q = torch.clamp(torch.round((xd - (mid - half)) / step), 0, 2 * qmax + 1)
    return q * step + mid - half


@pytest.mark.parametrize("fmt,qmax", [("int4", 7.0), ("int8", 127.0)])
def test_each_token_uses_every_level_between_its_minimum_and_maximum(fmt, qmax):
    torch.manual_seed(0)
    x = torch.randn(6, 512) * torch.rand(6, 1) * 4 + torch.randn(6, 1) * 3  # skewed rows of different ranges
    y = reference.quantize_activation(x, fmt, ASYM)
    step = (x.amax(-1) - x.amin(-1)) / (2 * qmax + 1)
    for row, s in zip(y, step):
        levels = torch.unique(row)
        assert len(levels) <= 2 * qmax + 2
        gaps = (levels[1:] - levels[:-1]) / s
        assert torch.allclose(gaps, torch.round(gaps), atol=1e-3)  # one grid per token
    torch.testing.assert_close(y.amax(-1), x.amax(-1), rtol=1e-5, atol=1e-5)  # both ends are levels
    torch.testing.assert_close(y.amin(-1), x.amin(-1), rtol=1e-5, atol=1e-5)
    assert bool(((y - x).abs() <= step.unsqueeze(-1) / 2 * 1.0001).all())
    torch.testing.assert_close(y.double(), _asym_float64(x, qmax, 1.0), rtol=0, atol=1e-5)


def test_int4_asym_halves_the_error_of_symmetric_on_one_sided_tokens():
    torch.manual_seed(1)
    x = torch.relu(torch.randn(64, 256)) + 0.05 * torch.randn(64, 256)  # GELU/ReLU-like inputs
    err_sym = (reference.quantize_activation(x, "int4", "dynamic_per_token") - x).pow(2).mean()
    err_asym = (reference.quantize_activation(x, "int4", ASYM) - x).pow(2).mean()
    assert err_asym < 0.5 * err_sym


def test_clip_shrinks_the_range_about_its_midpoint_and_special_rows_stay_honest():
    x = torch.tensor([[0.0, 1.0, 2.0, 10.0]])
    y = reference.quantize_activation(x, "int4", ASYM, clip_ratio=0.5)
    assert float(y.max()) == pytest.approx(7.5) and float(y.min()) == pytest.approx(2.5)
    const = torch.full((2, 16), -1.75)
    assert torch.equal(reference.quantize_activation(const, "int4", ASYM), const)  # scale 0: exact
    bad = torch.randn(3, 16)
    bad[0, 2], bad[1, 5] = float("nan"), float("inf")
    out = reference.quantize_activation(bad, "int8", ASYM)
    assert bool(out[:2].isnan().all()) and bool(out[2].isfinite().all())  # NaN/Inf are not hidden as zeros


@pytest.mark.parametrize("kw,match", [
    (dict(act_bits=8, act_format="fp8", act_mode=ASYM), "needs act_format='int'"),
    (dict(act_bits=4, act_mode=ASYM, act_topk=2), "act_topk=0"),
    (dict(act_bits=4, act_mode="dynamic_per_token_asymm"), "act_mode must be one of"),
])
def test_bad_asymmetric_settings_are_refused_with_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        pq.PiecewiseQuantConfig(**kw)


def test_act_args_carry_the_mode_and_refuse_what_cannot_be_asymmetric():
    args = pq.QuantSpec(act_bits=4, act_mode=ASYM).act_args
    assert (args.symmetric, args.kernel_mode, args.describe()) == (False, ASYM, "int4/token asym")
    grouped = ActArgs.from_spec(pq.QuantSpec(act_bits=4, act_mode=ASYM), strategy="group", group_size=32)
    assert grouped.kernel_mode == ASYM
    with pytest.raises(ValueError, match="dynamic integer"):
        ActArgs(format="int", bits=8, strategy="tensor", dynamic=False, symmetric=False)


@pytest.mark.parametrize("rotation", [None, "r4", "balance"])
@pytest.mark.parametrize("rows,dtype", [(1, torch.float32), (4, torch.bfloat16), (40, torch.float32)])
def test_quant_linear_quantizes_the_rotated_rows_asymmetrically_on_every_cpu_path(rows, dtype, rotation, monkeypatch):
    """1-16 rows are rotated and rounded inside the prepared CPU call (the offset as a piece of
    ones, the codes as another), more take the reference's rounding and the tiled kernels; either
    way the layer's output is the float64 product of the asymmetric rounding of its (rotated)
    input and its dequantized weight."""
    from piecewise_quant.kernels import cpu_backend

    calls = []
    prepared_call = cpu_backend.Prepared.__call__

    def spy(self, x, bias, rotation=None, act=None):
        out = prepared_call(self, x, bias, rotation, act)
        calls.append((act, out is not None))
        return out

    monkeypatch.setattr(cpu_backend.Prepared, "__call__", spy)
    torch.manual_seed(0)
    w = torch.randn(64, 256) / 16
    spec = pq.QuantSpec(grid="piecewise", bits=4, group_size=128, act_bits=4, act_mode=ASYM, act_clip_ratio=0.9)
    fmt = pq.get_format("piecewise")
    rot = None if rotation is None else OnlineRotation(True, False, 0, balance=rotation == "balance")
    layer = layer_spec_for("d", spec, 256, 64, rot)
    tensors = fmt.quantize(w, layer)
    q = pq.QuantLinear.empty(layer, fmt, bias=False)
    q.load_quantized(tensors)
    plain = pq.QuantLinear.empty(layer_spec_for("d", spec, 256, 64), fmt, bias=False)
    plain.load_quantized(tensors)
    weight = plain.dequantize(torch.float32)  # the stored weight, in the rotated basis the rows arrive in
    if rotation == "balance":
        q._buffers["balance_scale"].copy_(torch.rand(256).add(0.5).half())
    assert q.act_quantizer.fused == (7.0, pytest.approx(0.9), False)
    x = (torch.randn(rows, 256) * 2 + 0.8).to(dtype)
    with torch.no_grad():
        y = q(x)
        xr = q._rot_in(x) if rotation is not None else x
    if dtype == torch.float32:
        expect = _asym_float64(xr, 7.0, 0.9) @ weight.double().T
        torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-5)
    else:  # a few bfloat16 rows are rotated in float32 inside the call, then rounded as the reference does
        xr = q._rot_in(x.float()) if rotation is not None else x.float()
        if rotation is not None and cpu_backend.status()["isa"] != "avx512-vnni":
            xr = q._rot_in(x).float()  # no fused asymmetric call here: the rows are rotated in their dtype first
        expect = reference.quantize_activation(xr, "int4", ASYM, None, 0.9).double() @ weight.double().T
        assert float((y.double() - expect).norm() / expect.norm()) < 1e-2
    if rows <= cpu_backend.GEMV_MAX_ROWS and cpu_backend.status()["isa"] == "avx512-vnni":
        assert calls == [((7.0, pytest.approx(0.9), False), True)]
    symmetric = reference.quantize_activation(xr.float(), "int4", "dynamic_per_token", None, 0.9) @ weight.T
    assert float((y.double() - expect).norm()) < 0.1 * float((symmetric.double() - expect).norm())


def test_asymmetric_w4a4_model_saves_and_reloads_bit_exactly(tmp_path):
    model = tiny_llama()
    cfg = pq.PiecewiseQuantConfig(bits=4, group_size=32, act_bits=4, act_mode=ASYM, act_clip_ratio=0.9,
                                  rotation="quarot")
    pq.quantize(model, cfg, progress=False)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.act_quantizer.args.kernel_mode == ASYM
    before = _logits(model)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.model.layers[0].mlp.down_proj.act_quantizer.args.kernel_mode == ASYM
    assert torch.equal(_logits(again), before)


@pytest.mark.parametrize("rows", [1, 20])
def test_w8a8_asymmetric_takes_no_symmetric_shortcut(rows):
    """8-bit per-channel weights with int8 activations: many rows would take torch's int8 GEMM when
    symmetric; asymmetric rows are rounded with their offset on every path."""
    torch.manual_seed(2)
    lin = torch.nn.Linear(256, 48, bias=True)
    spec = pq.QuantSpec(grid="uniform", bits=8, group_size="channel", symmetric=True, act_bits=8, act_mode=ASYM)
    layer = layer_spec_for("l", spec, 256, 48)
    q = pq.QuantLinear.from_linear(lin, layer, pq.get_format("uniform"))
    x = torch.relu(torch.randn(rows, 256)) * 3
    with torch.no_grad():
        y = q(x)
    expect = _asym_float64(x, 127.0, 1.0) @ q.dequantize(torch.float32).double().T + q.bias.double()
    torch.testing.assert_close(y.double(), expect, rtol=1e-4, atol=1e-4)  # float32 sums of a one-sided input
    symmetric = reference.quantize_activation(x, "int8", "dynamic_per_token") @ q.dequantize(torch.float32).T
    assert float((y.double() - expect).abs().max()) < 0.1 * float((symmetric.double() + q.bias.double() - expect).abs().max())


def test_constant_and_tiny_range_rows_are_their_offset_on_the_prepared_cpu_call():
    """A constant row has step 0 and is exactly its value; a row whose range is a few subnormals has
    a step that underflows to 0 and is the reference's offset (its minimum, to within a subnormal).
    Both go through the fused CPU call (few rows) next to an ordinary row, which is unaffected."""
    from piecewise_quant.kernels import cpu_backend

    if cpu_backend.status()["isa"] != "avx512-vnni":
        pytest.skip("the integer activation call needs AVX-512 VNNI")
    torch.manual_seed(3)
    spec = pq.QuantSpec(grid="uniform", bits=4, group_size=128, act_bits=4, act_mode=ASYM)
    layer = layer_spec_for("c", spec, 256, 32)
    q = pq.QuantLinear.from_linear(torch.nn.Linear(256, 32, bias=False), layer, pq.get_format("uniform"))
    tiny = torch.zeros(256)
    tiny[::2] = 1e-44
    x = torch.stack([torch.full((256,), 2.5), torch.zeros(256), tiny, torch.randn(256)])
    with torch.no_grad():
        y = q(x)
    w = q.dequantize(torch.float32).double()
    expect = reference.quantize_activation(x, "int4", ASYM).double() @ w.T
    torch.testing.assert_close(y[:3].double(), expect[:3], rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(y[0].double(), 2.5 * w.sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(y[3].double(), expect[3], rtol=1e-4, atol=1e-4)
