"""Asymmetric GPTQ (GPTAQ): each layer is fitted to the float layer's output on the float model's
inputs. The target weight is the least-squares solution, quantizing it lowers the error against
the float output, and the option is a GPTQ setting that configs store and check."""

from __future__ import annotations

import pytest
import torch

import piecewise_quant as pq
from piecewise_quant.calibration import GPTQ
from piecewise_quant.calibration.gptq import float_target, gptq_quantize
from piecewise_quant.config import LayerSpec, QuantSpec
from piecewise_quant.registry import get_format


def _inputs(n: int = 512, k: int = 32, noise: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, k, dtype=torch.float64)
    # the quantized chain: a linear distortion of the float input (what quantized layers before
    # this one leave) plus a little token noise
    mix = torch.eye(k, dtype=torch.float64) + noise / k**0.5 * torch.randn(k, k, generator=g, dtype=torch.float64)
    xq = x @ mix + 0.05 * torch.randn(n, k, generator=g, dtype=torch.float64) * x.abs().mean(0)
    w = torch.randn(16, k, generator=g, dtype=torch.float64)
    return x, xq, w


def test_float_target_is_the_least_squares_solution():
    x, xq, w = _inputs()
    got = float_target(w, xq.t() @ xq, xq.t() @ (x - xq), damp=1e-12)
    ref = torch.linalg.lstsq(xq, x @ w.t()).solution.t()
    assert torch.allclose(got, ref, rtol=1e-7, atol=1e-8)
    # the float-target error splits into the distance to W' through X~ plus a constant
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        q = w + 0.1 * torch.randn(w.shape, generator=g, dtype=torch.float64)
        lhs = (xq @ q.t() - x @ w.t()).pow(2).sum()
        rhs = (xq @ (q - got).t()).pow(2).sum() + (xq @ got.t() - x @ w.t()).pow(2).sum()
        assert torch.allclose(lhs, rhs, rtol=1e-9)


def test_equal_chains_leave_the_weight_unchanged():
    _, xq, w = _inputs()
    w32 = w.float()
    out = float_target(w32, (xq.t() @ xq).float(), torch.zeros(32, 32), damp=0.01)
    assert out.dtype == torch.float32 and torch.equal(out, w32)
    # no input energy at all: nothing to correct, and no NaN
    assert torch.equal(float_target(w32, torch.zeros(32, 32), torch.zeros(32, 32)), w32)


def test_quantizing_the_float_target_lowers_the_error_against_the_float_output():
    x, xq, w = _inputs(n=1024, k=64, noise=0.4)
    layer = LayerSpec("l", QuantSpec(bits=3, group_size=32, grid="piecewise"), in_features=64, out_features=16,
                      group_size=32)
    fmt = get_format("piecewise")
    h = (2.0 / xq.shape[0] * xq.t() @ xq).float()
    plain = gptq_quantize(w.float(), h, layer, fmt).weight.double()
    asym = gptq_quantize(float_target(w.float(), (xq.t() @ xq).float(), (xq.t() @ (x - xq)).float()), h, layer,
                         fmt).weight.double()

    def err(q):
        return float((xq @ q.t() - x @ w.t()).pow(2).sum() / (x @ w.t()).pow(2).sum())

    assert err(asym) < 0.5 * err(plain), (err(asym), err(plain))


def test_calibrate_with_asymmetric_gptq_tracks_the_float_model_better():
    pytest.importorskip("transformers")
    from pq_tiny_models import tiny_llama

    ids = torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(0))
    errs, reports = {}, {}
    for preset in ("gptq", "gptaq"):
        model = tiny_llama()
        cal = pq.CalibrationConfig.preset(preset, n_samples=16, seq_len=32, batch_size=8)
        reports[preset] = pq.calibrate(model, pq.PiecewiseQuantConfig(bits=2, group_size=32, calibration=cal), ids,
                                       progress=False)
        errs[preset] = [b.rel_error for b in reports[preset].blocks]
    # the first stage of block 0 sees equal chains; every later block starts from a drifted input
    assert errs["gptaq"][-1] < 0.5 * errs["gptq"][-1], errs
    assert {r.method for r in reports["gptaq"].layers.values()} == {"gptaq"}
    assert {r.method for r in reports["gptq"].layers.values()} == {"gptq"}


def test_the_option_is_a_gptq_setting():
    gptaq = pq.CalibrationConfig.preset("gptaq")
    assert gptaq == pq.CalibrationConfig(gptq=True, asymmetric=True)
    assert gptaq == pq.CalibrationConfig(modifiers=[GPTQ(asymmetric=True)])
    assert gptaq.recipe[0] == GPTQ(asymmetric=True)
    assert gptaq.to_dict()["asymmetric"] is True
    assert pq.CalibrationConfig.coerce(gptaq.to_dict()) == gptaq
    # configs that do not use it keep the keys they always had
    assert "asymmetric" not in pq.CalibrationConfig.preset("gptq").to_dict()
    saved = pq.PiecewiseQuantConfig(bits=3, calibration="gptaq").to_dict()
    assert pq.PiecewiseQuantConfig.from_dict(saved).calibration == gptaq
    with pytest.raises(ValueError, match="asymmetric=True is an option of GPTQ"):
        pq.CalibrationConfig(asymmetric=True)
    with pytest.raises(ValueError, match="asymmetric"):
        pq.CalibrationConfig(gptq=True, asymmetric="yes")
    with pytest.raises(ValueError, match="asymmetric"):
        GPTQ(asymmetric=1)


class _Routed(torch.nn.Module):
    """Tokens whose first feature after ``fc`` is positive also go through ``expert``: the
    quantized ``fc`` routes different tokens than the float one."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.fc = torch.nn.Linear(d, d)
        self.expert = torch.nn.Linear(d, d)

    def forward(self, x):
        h = self.fc(x)
        sel = h[..., 0] > 0
        out = h.clone()
        out[sel] = out[sel] + self.expert(h[sel])
        return x + out


class _RoutedNet(torch.nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.embed = torch.nn.Embedding(64, d)
        self.blocks = torch.nn.ModuleList(_Routed(d) for _ in range(2))
        self.head = torch.nn.Linear(d, 64)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def test_layers_the_chains_route_differently_fall_back_to_the_plain_target(caplog):
    import logging

    torch.manual_seed(0)
    model = _RoutedNet()
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    cal = pq.CalibrationConfig.preset("gptaq", n_samples=8, seq_len=16, batch_size=4)
    config = pq.PiecewiseQuantConfig(bits=2, group_size=32, modules_to_not_convert=["head"], calibration=cal)
    with caplog.at_level(logging.WARNING):
        report = pq.calibrate(model, config, ids, progress=False)
    assert "blocks.0.expert" in caplog.text and "called on different tokens" in caplog.text
    assert report.layers["blocks.0.fc"].method == "gptaq"
    assert report.layers["blocks.0.expert"].method == "gptq"
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()
