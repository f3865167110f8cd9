"""The activation quantizer inside QuantLinear and the typed ActArgs it runs on."""

from __future__ import annotations

import copy

import pytest
import torch

import piecewise_quant as pq
from piecewise_quant.activation import ActQuantizer
from piecewise_quant.args import ActArgs
from piecewise_quant.kernels import reference
from piecewise_quant.quantization import layer_spec_for
from piecewise_quant.registry import get_format


def _layer(act_bits=8, act_mode="dynamic_per_token", act_format="int", **kw):
    spec = pq.QuantSpec(grid="uniform", bits=8, group_size="channel", symmetric=True, act_bits=act_bits,
                        act_mode=act_mode, act_format=act_format, **kw)
    lin = torch.nn.Linear(64, 16)
    torch.manual_seed(0)
    torch.nn.init.normal_(lin.weight)
    layer = layer_spec_for("l", spec, 64, 16)
    return pq.QuantLinear.from_linear(lin, layer, get_format(spec.grid))


@pytest.mark.parametrize("bits,fmt,qmax,kernel", [(8, "int", 127.0, "int8"), (4, "int", 7.0, "int4"),
                                                  (8, "fp8", 448.0, "fp8_e4m3")])
def test_act_args_derive_kernel_names_and_qmax_from_the_spec(bits, fmt, qmax, kernel):
    args = pq.QuantSpec(act_bits=bits, act_format=fmt).act_args
    assert (args.kernel_format, args.qmax, args.strategy, args.dynamic) == (kernel, qmax, "token", True)
    static = pq.QuantSpec(act_bits=bits, act_format=fmt, act_mode="static_per_tensor").act_args
    assert (static.strategy, static.dynamic, static.kernel_mode) == ("tensor", False, "static_per_tensor")
    assert pq.QuantSpec().act_args is None


@pytest.mark.parametrize("changes,match", [
    (dict(format="int", bits=6), "cannot be 6 bits"),
    (dict(format="fp8", bits=4), "cannot be 4 bits"),
    (dict(format="int", bits=8, strategy="channel"), "strategy must be one of"),
    (dict(format="int", bits=8, strategy="group"), "group_size goes with strategy='group'"),
    (dict(format="int", bits=8, strategy="token", group_size=32), "group_size goes with"),
    (dict(format="int", bits=8, strategy="tensor", dynamic=True), "static-only"),
    (dict(format="int", bits=8, strategy="group", group_size=0), "positive integer"),
])
def test_bad_act_args_raise_naming_the_problem(changes, match):
    with pytest.raises(ValueError, match=match):
        ActArgs(**changes)


def test_dynamic_layer_matches_reference_quantize_then_matmul():
    q = _layer(act_clip_ratio=0.9, act_topk=1)
    x = torch.randn(5, 64)
    xq = reference.quantize_activation(x, "int8", "dynamic_per_token", None, 0.9, 1)
    torch.testing.assert_close(q(x), xq @ q.dequantize().t() + q.bias, rtol=1e-5, atol=1e-5)


def test_static_scale_comes_from_the_kplus1_th_largest_magnitude_times_clip():
    q = _layer(act_mode="static_per_tensor", act_topk=2, act_clip_ratio=0.5)
    with pytest.raises(RuntimeError, match="no calibrated scale"):
        q(torch.randn(2, 64))
    x = torch.zeros(3, 64)
    x[0, :4] = torch.tensor([10.0, -9.0, 8.0, 7.0])
    q.start_observing()
    y_float = q(x)  # observing: inputs pass in float
    q.finish_observing()
    assert float(q.act_scale) == pytest.approx(8.0 * 0.5 / 127.0)
    torch.testing.assert_close(y_float, x @ q.dequantize().t() + q.bias)


def test_stop_observing_leaves_the_scale_untouched_and_nan_is_refused():
    q = _layer(act_mode="static_per_tensor")
    q.start_observing()
    q(torch.randn(2, 64))
    q.stop_observing()
    assert float(q.act_scale) == 0.0 and not q.act_quantizer.observing
    q.start_observing()
    q(torch.full((1, 64), float("nan")))
    with pytest.raises(ValueError, match="NaN or Inf"):
        q.finish_observing()
    q.start_observing()
    with pytest.raises(RuntimeError, match="saw no calibration tokens"):
        q.finish_observing()


def test_quantizer_follows_the_layer_through_deepcopy_and_load_state_dict():
    q = _layer(act_mode="static_per_tensor")
    q.act_scale.fill_(0.05)
    c = copy.deepcopy(q)
    c.act_scale.fill_(0.1)
    assert float(q.act_scale) == pytest.approx(0.05)
    _, op = c.act_quantizer.prepare(torch.randn(1, 64))
    assert float(op.scale) == pytest.approx(0.1)
    q.load_state_dict(c.state_dict())
    _, op = q.act_quantizer.prepare(torch.randn(1, 64))
    assert float(op.scale) == pytest.approx(0.1)
    assert "act_scale" in q.state_dict() and not any("quantizer" in k for k in q.state_dict())


def test_group_strategy_quantizes_each_group_of_channels_on_its_own():
    args = ActArgs("int", 8, strategy="group", group_size=16)
    aq = ActQuantizer(args, "g", {})
    x = torch.randn(3, 64)
    x[:, 0] = 1000.0  # an outlier only coarsens its own group
    xq, op = aq.prepare(x)
    assert op.format == "none"
    per_group = reference.quantize_activation(x.reshape(3, 4, 16), "int8", "dynamic_per_token", None, 1.0, 0)
    torch.testing.assert_close(xq, per_group.reshape(3, 64))
    assert float((xq[:, 16:] - x[:, 16:]).abs().max()) < 0.05


def test_timestep_strategy_reads_the_scale_of_the_current_timestep():
    class Clock:
        value, index, n_prompts, branches = None, None, None, ()

    buffers = {"act_scale": torch.zeros(()), "act_scales_t": torch.zeros(2)}
    aq = ActQuantizer(ActArgs("int", 8, strategy="timestep", dynamic=False), "t", buffers)
    aq.clock = clock = Clock()
    aq.start()
    for t, mag in ((999.0, 4.0), (1.0, 2.0)):
        clock.value = t
        aq.prepare(torch.full((1, 8), mag))
    aq.finish((999.0, 1.0))
    assert buffers["act_scales_t"].tolist() == pytest.approx([4.0 / 127, 2.0 / 127])
    assert float(buffers["act_scale"]) == pytest.approx(4.0 / 127)
    with pytest.raises(RuntimeError, match="no current timestep"):
        aq.prepare(torch.ones(1, 8))
    clock.index = 1
    _, op = aq.prepare(torch.ones(1, 8))
    assert float(op.scale) == pytest.approx(2.0 / 127) and op.mode == "static_per_tensor"
