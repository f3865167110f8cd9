import pytest
import torch

from piecewise_quant.kernels.reference import quantize_activation


def test_int8_dynamic_per_token_uses_each_tokens_absmax():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [10.0, 5.0, -2.5, 1.0]])
    y = quantize_activation(x, "int8", "dynamic_per_token")
    # the max of each token is exactly representable, others within half a step of that token
    assert y[0, 0] == 1.0 and y[1, 0] == 10.0
    steps = x.abs().amax(-1, keepdim=True) / 127
    assert bool(((y - x).abs() <= steps / 2 + 1e-7).all())


def test_topk_clips_exactly_k_outliers_per_token():
    x = torch.tensor([[100.0, -50.0, 2.0, 1.0, -1.0, 0.5]])
    y = quantize_activation(x, "int8", "dynamic_per_token", topk=2)
    # range = 3rd largest magnitude (2.0): the two outliers clip to +-2.0
    assert y[0, 0] == 2.0 and y[0, 1] == -2.0
    assert torch.allclose(y[0, 2:], x[0, 2:], atol=2.0 / 127 / 2 + 1e-7)
    y0 = quantize_activation(x, "int8", "dynamic_per_token", topk=0)
    assert y0[0, 0] == 100.0


def test_clip_ratio_scales_the_range():
    x = torch.tensor([[4.0, 1.0, -3.0]])
    y = quantize_activation(x, "int8", "dynamic_per_token", clip_ratio=0.5)
    assert y[0, 0] == 2.0 and y[0, 2] == -2.0


def test_fp8_dynamic_and_static():
    torch.manual_seed(0)
    x = torch.randn(4, 32) * 3
    y = quantize_activation(x, "fp8_e4m3", "dynamic_per_token")
    rel = (y - x).abs() / x.abs().clamp(min=1e-3)
    assert float(rel[x.abs() > x.abs().amax(-1, keepdim=True) / 64].max()) <= 2**-4 + 1e-6  # 3 mantissa bits
    scale = x.abs().max() / 448
    ys = quantize_activation(x, "fp8_e4m3", "static_per_tensor", act_scale=scale)
    assert torch.allclose(ys, x, rtol=2**-4, atol=float(scale) * 2**-6)


def test_static_int8_clamps_outside_the_calibrated_range():
    x = torch.tensor([[0.5, 3.0, -3.0]])
    y = quantize_activation(x, "int8", "static_per_tensor", act_scale=torch.tensor(1.0 / 127))
    assert y.tolist() == [[pytest.approx(64 / 127), 1.0, -1.0]]


def test_zero_tokens_stay_zero_and_dtype_is_kept():
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    for fmt in ("int8", "fp8_e4m3"):
        y = quantize_activation(x, fmt, "dynamic_per_token")
        assert y.dtype == torch.bfloat16 and bool((y == 0).all())


def test_unknown_modes_raise():
    with pytest.raises(ValueError, match="act_format"):
        quantize_activation(torch.ones(1, 2), "int2", "dynamic_per_token")
    with pytest.raises(ValueError, match="act_scale"):
        quantize_activation(torch.ones(1, 2), "int8", "static_per_tensor")


def test_int4_dynamic_per_token_has_seven_levels_per_side():
    x = torch.tensor([[7.0, 3.4, -3.6, 0.2, -7.0]])
    y = quantize_activation(x, "int4", "dynamic_per_token")
    assert y.tolist() == [[7.0, 3.0, -4.0, 0.0, -7.0]]
