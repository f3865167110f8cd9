"""ViDiT-Q's channel balance (``rotation=["balance"]``): a per-channel smoothing scale measured on
calibration data, then an online Hadamard rotation, on every layer that quantizes activations."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import piecewise_quant as pq
from piecewise_quant.args import OnlineRotation, RotationArgs
from piecewise_quant.kernels import hadamard as had

BALANCE = {"rotations": ["balance"], "balance_alpha": 0.5}


def test_scaled_rotation_is_the_scale_then_the_rotation():
    n = 96
    s = torch.rand(n, dtype=torch.float64) * 4 + 0.1
    x = torch.randn(5, n, dtype=torch.float64)
    ref = (x / s) @ had.rotation_matrix(n, 3, "input")
    rot = had.ScaledRotation(n, 3, "input", s.float())
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):  # float64: torch path; float32: C transform
        got = rot(x.to(dtype)).double()
        assert float((got - ref).abs().max() / ref.abs().max()) < tol
        back = rot(ref.to(dtype), inverse=True).double()  # (y R^T) / s
        torch.testing.assert_close(back, x / s / s, rtol=tol, atol=tol)
    torch.testing.assert_close(rot.matrix(), torch.diag(1 / s) @ had.rotation_matrix(n, 3, "input"), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="finite and positive"):
        had.ScaledRotation(n, 3, "input", torch.zeros(n))(x.float())


def test_balance_arguments_are_validated_and_round_trip():
    cfg = pq.PiecewiseQuantConfig(bits=4, group_size=32, act_bits=8, rotation=BALANCE)
    assert cfg.rotation.rotations == ("balance",) and cfg.rotation.balance_alpha == 0.5
    back = pq.PiecewiseQuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    auto = pq.PiecewiseQuantConfig(bits=4, act_bits=8, rotation={"rotations": ["balance"]})
    assert auto.rotation.balance_alpha == "auto" and auto.to_dict()["rotation"]["balance_alpha"] == "auto"
    assert pq.PiecewiseQuantConfig.from_dict(json.loads(json.dumps(auto.to_dict()))) == auto
    assert "balance_alpha" not in RotationArgs.coerce("quip").to_dict()  # other configs keep their bytes
    preset = pq.PiecewiseQuantConfig(bits=4, act_bits=4, rotation="viditq").rotation
    assert preset.rotations == ("balance",) and preset.balance_alpha == "auto"
    # only layers that quantize activations are balanced
    assert cfg.online_rotation_for("x") == OnlineRotation(True, False, 0, balance=True)
    mixed = pq.PiecewiseQuantConfig(bits=4, group_size=32, act_bits=8, rotation=BALANCE, overrides={"y": {"act_bits": None}})
    assert mixed.online_rotation_for("y") is None
    for bad in (1.5, "best", True):
        with pytest.raises(ValueError, match="balance_alpha"):
            RotationArgs(("balance",), balance_alpha=bad)
    with pytest.raises(ValueError, match="overlap"):
        RotationArgs(("balance", "input"))
    with pytest.raises(ValueError, match="input=True"):
        OnlineRotation(False, False, 0, balance=True)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64, initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
DATA = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(2))


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits.double()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _outlier_model():
    from piecewise_quant.testing import make_outlier_model

    model = tiny_llama()
    make_outlier_model(model, n_channels=2, factor=30.0)
    return model


def test_balance_keeps_the_float_function_and_stores_its_scale():
    from piecewise_quant.quantization import plan_layers
    from piecewise_quant.rotation import rotated

    model = _outlier_model()
    ref = _logits(model)
    cfg = pq.PiecewiseQuantConfig(bits=8, group_size=32, act_bits=8, rotation=BALANCE)
    data = [{"input_ids": DATA[:4]}, {"input_ids": DATA[4:]}]
    with rotated(model, cfg.rotation, plan_layers(model, cfg), data=data):
        assert _rel(_logits(model), ref) < 1e-5  # the hooks carry (x / s) R while the layers are float
        lin = model.model.layers[0].mlp.down_proj
        s = lin._pq_balance_scale
        assert s.shape == (192,) and bool((s > 0).all()) and float(s.max() / s.min()) > 1.5
    assert "_pq_balance_scale" not in model.model.layers[0].mlp.down_proj.__dict__  # removed with the hooks


def test_balance_needs_calibration_data():
    with pytest.raises(ValueError, match="calibration data"):
        pq.quantize(tiny_llama(), pq.PiecewiseQuantConfig(bits=4, group_size=32, act_bits=8, rotation=BALANCE),
                    progress=False)


def test_balanced_w4a4_beats_plain_and_reloads_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _outlier_model()
    ref = _logits(model)
    w0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    base = dict(grid="uniform", bits=8, group_size="channel", act_bits=4, calibration="aware")
    plain = copy.deepcopy(model)
    pq.calibrate(plain, pq.PiecewiseQuantConfig(**base), DATA, progress=False)
    fixed = copy.deepcopy(model)
    pq.calibrate(fixed, pq.PiecewiseQuantConfig(**base, rotation=BALANCE), DATA, progress=False)
    pq.calibrate(model, pq.PiecewiseQuantConfig(**base, rotation={"rotations": ["balance"]}), DATA, progress=False)
    e_plain, e_fixed, e_auto = _rel(_logits(plain), ref), _rel(_logits(fixed), ref), _rel(_logits(model), ref)
    assert e_fixed < 0.5 * e_plain, (e_fixed, e_plain)
    assert e_auto < 1.1 * e_fixed, (e_auto, e_fixed)  # alpha chosen per layer on the calibration rows
    layer = model.model.layers[0].mlp.down_proj
    assert layer.has_balance and layer.layer_spec.rotation.balance
    # dequantize() folds the rotation and the scale back: it stands in for the original (8-bit) weight
    assert _rel(layer.dequantize(torch.float32).double(), w0.double()) < 2e-2
    assert any(k.endswith("down_proj.balance_scale") for k in model.state_dict())
    # bits per weight counts the float32 scale
    assert layer.bits_per_weight() == pytest.approx(layer.fmt.bits_per_weight(layer.layer_spec) + 16 / layer.out_features)
    out = _logits(model)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(_logits(reloaded), out)
    assert torch.equal(reloaded.model.layers[0].mlp.down_proj.balance_scale, layer.balance_scale)


def test_a_checkpoint_without_its_balance_scale_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    pq.calibrate(model, pq.PiecewiseQuantConfig(bits=4, group_size=32, act_bits=8, rotation=BALANCE,
                                                calibration="aware"), DATA, progress=False)
    model.save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    del tensors["model.layers.0.mlp.down_proj.balance_scale"]
    save_file(tensors, path, metadata=meta)
    with pytest.raises(pq.CheckpointMismatchError, match="balance_scale"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_balance_composes_with_gptq():
    model = _outlier_model()
    ref = _logits(model)
    cal = pq.CalibrationConfig.preset("gptq", n_samples=8, seq_len=16)
    cfg = pq.PiecewiseQuantConfig(grid="uniform", bits=8, group_size="channel", act_bits=8, rotation=BALANCE,
                                  calibration=cal)
    pq.calibrate(model, cfg, DATA, progress=False)
    assert _rel(_logits(model), ref) < 5e-2  # W8A8 on a model with 30x outlier channels
    assert model.model.layers[1].self_attn.o_proj.has_balance
