"""Scale tuning: with GPTQ's codes fixed, each block's stored scales are learned against the float
block. The weight is affine in the stored scales exactly as the format dequantizes it, tuning lowers
the block error, a tuning that does not help is undone, and the option is a config setting that
configs store and check."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import piecewise_quant as pq
from piecewise_quant.calibration import TuneScales
from piecewise_quant.calibration.tune_scales import scale_map
from piecewise_quant.config import LayerSpec, QuantSpec
from piecewise_quant.registry import get_format


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=3, group_size=32, grid="piecewise"),
    QuantSpec(bits=4, group_size=32, grid="uniform", symmetric=True),
    QuantSpec(bits=2, group_size=16, grid="uniform", symmetric=False),
    QuantSpec(bits=4, group_size=32, grid="piecewise", scale_dtype="bfloat16"),
    QuantSpec(bits=8, group_size=64, grid="fp8"),
    QuantSpec(bits=4, group_size=16, grid="nvfp4"),
    QuantSpec(bits=3, group_size=32, grid="piecewise", outliers=2),  # the kept outliers are the affine map's offset
], ids=lambda s: f"{s.grid}{s.bits}-g{s.group_size}-o{s.outliers}")
def test_the_weight_is_affine_in_the_stored_scales_as_the_format_dequantizes_it(spec):
    layer = LayerSpec("l", spec, in_features=64, out_features=8, group_size=spec.group_size)
    fmt = get_format(spec.grid)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    tensors = fmt.quantize(w, layer)
    m = scale_map(SimpleNamespace(fmt=fmt, layer=layer), tensors)
    assert m is not None
    s0 = tensors["scales"]
    # any other scales, stored in the layer's scale dtype, dequantize to the affine map's weight
    g = torch.Generator().manual_seed(1)
    s = (s0.float() * (1 + 0.2 * torch.rand(s0.shape, generator=g))).to(s0.dtype)
    ref = fmt.dequantize({**tensors, "scales": s}, layer, torch.float32)
    assert torch.allclose(m.weight(s.float()), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


def test_integer_exponent_scales_are_left_alone():
    spec = QuantSpec(bits=4, group_size=32, grid="mxfp4")
    layer = LayerSpec("l", spec, in_features=64, out_features=8, group_size=32)
    fmt = get_format("mxfp4")
    tensors = fmt.quantize(torch.randn(8, 64), layer)
    assert not tensors["scales"].is_floating_point()
    assert scale_map(SimpleNamespace(fmt=fmt, layer=layer), tensors) is None


def _calibrate(tune: bool, **changes):
    from pq_tiny_models import tiny_llama

    ids = torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()
    cal = pq.CalibrationConfig.preset("gptq", n_samples=16, seq_len=32, batch_size=4, tune_scales=tune, **changes)
    report = pq.calibrate(model, pq.PiecewiseQuantConfig(bits=3, group_size=32, calibration=cal), ids, progress=False)
    return model, report


def test_tuning_lowers_the_block_error_and_keeps_the_codes(tmp_path):
    transformers = pytest.importorskip("transformers")
    base, plain = _calibrate(False)
    model, tuned = _calibrate(True, tune_epochs=8, tune_lr=3e-3)
    before = [b.rel_error for b in plain.blocks]
    after = [b.rel_error for b in tuned.blocks]
    assert after[-1] < 0.9 * before[-1], (before, after)
    assert {r.method for r in tuned.layers.values() if r.method != "data-free"} == {"gptq+tune"}
    # block 0 sees the same inputs in both runs: GPTQ chose the same codes there, tuning changed
    # only the scales (and the stored scales stay in their dtype)
    q0 = dict(base.named_modules())["model.layers.0.self_attn.q_proj"]
    q1 = dict(model.named_modules())["model.layers.0.self_attn.q_proj"]
    assert torch.equal(q0.qweight, q1.qweight) and torch.equal(q0.breakpoint_ids, q1.breakpoint_ids)
    assert q1.scales.dtype == torch.float16 and not torch.equal(q0.scales, q1.scales)
    # the tuned model runs as any calibrated one: the kernel path reads the tuned scales
    x = torch.randn(3, q1.in_features)
    assert torch.allclose(q1(x), x @ q1.dequantize(torch.float32).t(), rtol=1e-4, atol=1e-4)
    # the tuned scales are stored as any scales are: the checkpoint reloads to the same model
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(dict(again.named_modules())["model.layers.0.self_attn.q_proj"].scales, q1.scales)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_a_tuning_that_does_not_lower_the_loss_is_undone():
    pytest.importorskip("transformers")
    base, _ = _calibrate(False)
    model, report = _calibrate(True, tune_epochs=1, tune_lr=10.0)  # steps far past the optimum
    for (name, a), (_, b) in zip(base.named_modules(), model.named_modules()):
        if hasattr(a, "scales") and name.startswith("model.layers.0."):
            assert torch.equal(a.scales, b.scales), name


def test_the_option_is_a_config_setting():
    cfg = pq.CalibrationConfig(gptq=True, tune_scales=True, tune_epochs=3, tune_lr=2e-3)
    assert cfg == pq.CalibrationConfig(modifiers=[pq.calibration.GPTQ(), TuneScales(epochs=3, lr=2e-3)])
    assert TuneScales(3, 2e-3) in cfg.recipe
    assert [type(m).__name__ for m in cfg.recipe][:2] == ["GPTQ", "TuneScales"]  # static act scales last
    d = cfg.to_dict()
    assert (d["tune_scales"], d["tune_epochs"], d["tune_lr"]) == (True, 3, 2e-3)
    assert pq.CalibrationConfig.coerce(d) == cfg
    # configs that do not use it keep the keys they always had
    assert not {"tune_scales", "tune_epochs", "tune_lr"} & set(pq.CalibrationConfig.preset("gptq").to_dict())
    with pytest.raises(ValueError, match="tune_epochs"):
        pq.CalibrationConfig(tune_scales=True, tune_epochs=-1)
    with pytest.raises(ValueError, match="tune_lr"):
        pq.CalibrationConfig(tune_scales=True, tune_lr=0.0)
    with pytest.raises(ValueError, match="tune_scales"):
        pq.CalibrationConfig(tune_scales="yes")
    with pytest.raises(ValueError, match="tune_scales=False"):
        pq.CalibrationConfig(algorithm="my_algo", tune_scales=True)
    with pytest.raises(ValueError, match="TuneScales.lr"):
        TuneScales(lr=float("nan"))


def test_low_rank_layers_are_refused():
    pytest.importorskip("transformers")
    from pq_tiny_models import tiny_llama

    model = tiny_llama()
    config = pq.PiecewiseQuantConfig(bits=4, group_size=32, low_rank=4,
                                     calibration=pq.CalibrationConfig(gptq=True, tune_scales=True, n_samples=4,
                                                                       seq_len=16))
    ids = torch.randint(0, 96, (4, 16))
    with pytest.raises(ValueError, match="tune_scales"):
        pq.calibrate(model, config, ids, progress=False)
