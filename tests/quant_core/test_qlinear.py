import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import piecewise_quant as pq
from piecewise_quant.kernels import reference as ref

CONFIGS = [
    pq.PiecewiseQuantConfig(bits=4, group_size=32),
    pq.PiecewiseQuantConfig(bits=3, group_size=32),
    pq.PiecewiseQuantConfig(bits=2, group_size="channel"),
    pq.PiecewiseQuantConfig(grid="uniform", bits=4, group_size=32),
    pq.PiecewiseQuantConfig(grid="uniform", bits=3, group_size="tensor", symmetric=True),
    pq.PiecewiseQuantConfig(grid="uniform", bits=8, group_size="channel"),
    pq.PiecewiseQuantConfig(grid="fp8"),
    pq.PiecewiseQuantConfig(bits=4, group_size=32, act_bits=8),
    pq.PiecewiseQuantConfig(grid="uniform", bits=8, group_size="channel", act_bits=8, act_format="fp8", act_topk=2),
]


def _model(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 96, bias=bias), nn.GELU(), nn.Linear(96, 64, bias=bias))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.grid}{c.bits}-g{c.group_size}-a{c.act_bits}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_equals_linear_with_dequantized_weight(config, dtype):
    model = pq.quantize(_model().to(dtype), config, progress=False)
    q = model[0]
    assert isinstance(q, pq.QuantLinear)
    x = torch.randn(3, 5, 128, dtype=dtype)
    with torch.no_grad():
        y = q(x)
        xa = x
        if config.act_bits is not None:
            xa = ref.quantize_activation(
                x, "int8" if config.act_format == "int" else "fp8_e4m3", config.act_mode, None,
                config.act_clip_ratio, config.act_topk,
            )
        expected = F.linear(xa, q.dequantize(dtype), q.bias)
    assert y.dtype == dtype and y.shape == (3, 5, 96)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_dequantized_weight_is_close_to_float_weight():
    float_model = _model()
    for config, bound in ((pq.PiecewiseQuantConfig(bits=8, group_size=32), 1e-4),
                          (pq.PiecewiseQuantConfig(bits=4, group_size=32), 1.5e-2)):
        m = pq.quantize(copy.deepcopy(float_model), config, progress=False)
        w = float_model[0].weight.detach()
        rel = (m[0].dequantize() - w).pow(2).mean() / w.pow(2).mean()
        assert rel < bound, (config.bits, float(rel))


def test_extra_repr_shows_format_bits_and_group():
    m = pq.quantize(_model(), pq.PiecewiseQuantConfig(bits=3, group_size=32), progress=False)
    text = repr(m[0])
    assert "format=piecewise" in text and "bits=3" in text and "group_size=32" in text and "bpw=" in text
    u = pq.quantize(_model(), pq.PiecewiseQuantConfig(grid="uniform", group_size="channel"), progress=False)
    assert "group_size=channel (128)" in repr(u[0]) and "symmetric=False" in repr(u[0])


def test_bias_free_layers_and_buffers():
    m = pq.quantize(_model(bias=False), pq.PiecewiseQuantConfig(group_size=32), progress=False)
    q = m[0]
    assert q.bias is None
    assert set(dict(q.named_buffers())) == {"qweight", "scales", "breakpoint_ids"}
    assert list(q.parameters()) == []


def test_state_dict_round_trip_is_exact(tmp_path):
    config = pq.PiecewiseQuantConfig(bits=3, group_size=32, overrides={"2": {"grid": "uniform", "bits": 8}})
    m = pq.quantize(_model(), config, progress=False)
    pq.save_quantized(m, tmp_path)
    fresh = pq.load_quantized(_model(), tmp_path)
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert torch.equal(m(x), fresh(x))
    assert fresh.piecewise_quant_config == config
    assert fresh[2].spec.grid == "uniform"


def test_loading_a_mismatched_checkpoint_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    m = pq.quantize(_model(), pq.PiecewiseQuantConfig(group_size=32), progress=False)
    pq.save_quantized(m, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    bad = dict(state)
    del bad["0.scales"]
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensor.*'0.scales'"):
        pq.load_quantized(_model(), tmp_path)
    bad = dict(state)
    bad["0.scales"] = bad["0.scales"].to(torch.float32)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="'0.scales'.*float32.*float16"):
        pq.load_quantized(_model(), tmp_path)
    bad = dict(state)
    bad["0.qweight"] = bad["0.qweight"][:, :-1].contiguous()
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="'0.qweight' has shape"):
        pq.load_quantized(_model(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        pq.load_quantized(_model(), tmp_path)


def test_static_activation_scales_come_from_calibration():
    config = pq.PiecewiseQuantConfig(group_size=32, act_bits=8, act_mode="static_per_tensor")
    m = pq.quantize(_model(), config, progress=False)
    x = torch.randn(8, 128)
    with pytest.raises(RuntimeError, match="calibrate_activation_scales"):
        m(x)
    assert pq.calibrate_activation_scales(m, [x[:4], x[4:]]) == 2
    assert torch.isclose(m[0].act_scale, x.abs().max() / 127)
    with torch.no_grad():
        y = m(x)
        expected = F.linear(ref.quantize_activation(x, "int8", "static_per_tensor", m[0].act_scale), m[0].dequantize(), m[0].bias)
        torch.testing.assert_close(m[0](x), expected)
    assert torch.isfinite(y).all()


def test_calibration_with_nan_is_refused():
    config = pq.PiecewiseQuantConfig(group_size=32, act_bits=8, act_mode="static_per_tensor")
    m = pq.quantize(_model(), config, progress=False)
    x = torch.randn(2, 128)
    x[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pq.calibrate_activation_scales(m, [x])
    with pytest.raises(ValueError, match="no calibration batches"):
        pq.calibrate_activation_scales(m, [])


def test_model_size_report_counts_every_stored_bit():
    m = pq.quantize(_model(), pq.PiecewiseQuantConfig(bits=4, group_size=32), progress=False)
    r = pq.model_size_report(m)
    assert r.quantized_weights == 128 * 96 + 96 * 64
    assert r.bits_per_weight == pytest.approx(4 + 20 / 32)
    assert r.float_bytes == (96 + 64) * 4  # the biases


@pytest.mark.parametrize("grid", ["piecewise", "fp8"])
def test_casting_the_model_keeps_stored_tensors_exact(grid):
    m = pq.quantize(_model(), pq.PiecewiseQuantConfig(grid=grid, group_size="channel" if grid == "fp8" else 32), progress=False)
    before = {k: v.clone() for k, v in m[0].quantized_tensors().items()}
    m.to(torch.bfloat16)
    after = m[0].quantized_tensors()
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name].view(torch.uint8), t.view(torch.uint8)), name
    assert m[0].compute_dtype == torch.bfloat16 and m[0].bias.dtype == torch.bfloat16
    y = m(torch.randn(2, 128, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    m.float()
    assert m[0].compute_dtype == torch.float32 and m[0].scales.dtype == before["scales"].dtype
