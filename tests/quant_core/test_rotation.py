"""Hadamard rotations (QuaRot / QuIP#): the matrices, the transforms, the fused and online model
rotations, their checkpoints and their failure modes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pq_tiny_models import logits as _logits
from pq_tiny_models import tiny_llama
from torch import nn

import piecewise_quant as pq
from piecewise_quant.args import KVArgs, OnlineRotation, RotationArgs
from piecewise_quant.kernels import hadamard as had

SIZES = [12, 20, 28, 36, 64, 256, 384, 768, 1536]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_matrices_are_hadamard_and_rotations_orthogonal(n):
    h = had.hadamard_matrix(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-9)
    r = had.rotation_matrix(n, 3, "R1")
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_transforms_match_the_dense_matrix(n):
    x = torch.randn(5, n, dtype=torch.float64)
    r = had.rotation_matrix(n, 1, "input")
    signs = had.random_signs(n, 1, "input")
    torch.testing.assert_close(had.rotate(x, signs), x @ r, rtol=0, atol=1e-12)
    torch.testing.assert_close(had.rotate(x, signs, inverse=True), x @ r.T, rtol=0, atol=1e-12)
    rot = had.Rotation(n, 1, "input")
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        got = rot(x.to(dtype)).double()
        assert float((got - x @ r).abs().max() / (x @ r).abs().max()) < tol
        back = rot((x @ r).to(dtype), inverse=True).double()
        assert float((back - x).abs().max() / x.abs().max()) < tol
    xg = x.float().requires_grad_()
    rot(xg).sum().backward()  # the autograd path (pure torch)
    torch.testing.assert_close(xg.grad.double(), r.sum(1).expand(5, n), rtol=1e-5, atol=1e-5)


def test_signs_are_reproducible_and_independent_per_salt():
    a, b = had.random_signs(64, 0, "R1"), had.random_signs(64, 0, "R1")
    assert torch.equal(a, b)
    assert not torch.equal(a, had.random_signs(64, 0, "R2"))
    assert not torch.equal(a, had.random_signs(64, 1, "R1"))


@pytest.mark.parametrize("n", [7, 11008, 96 * 3 + 1])
def test_unsupported_sizes_are_refused_not_padded(n):
    assert not had.supported_size(n)
    with pytest.raises(ValueError, match=f"size {n}"):
        had.Rotation(n, 0, "input")


def test_rotation_args_presets_validation_and_config_round_trip():
    assert RotationArgs.coerce("quarot").rotations == ("R1", "R2", "R4")
    assert RotationArgs.coerce("quip").rotations == ("input", "output")
    for bad, field in ((["R5"], "unknown entries"), ([], "non-empty"), (["R1", "R1"], "twice")):
        with pytest.raises(ValueError, match=field):
            RotationArgs(rotations=tuple(bad))
    with pytest.raises(ValueError, match="seed"):
        RotationArgs(seed=-1)
    with pytest.raises(ValueError, match="unknown rotation preset"):
        pq.PiecewiseQuantConfig(rotation="quarot2")
    with pytest.raises(ValueError, match="unknown rotation fields"):
        pq.PiecewiseQuantConfig(rotation={"rotatons": ["R1"]})
    cfg = pq.PiecewiseQuantConfig(bits=4, rotation="quarot")
    back = pq.PiecewiseQuantConfig.from_dict(json.loads(cfg.to_json_string()))
    assert back == cfg and back.rotation == RotationArgs.coerce("quarot")
    assert "rotation" not in pq.PiecewiseQuantConfig(bits=4).to_dict()
    assert cfg.online_rotation_for("model.layers.0.mlp.down_proj") == OnlineRotation(True, False, 0)
    assert cfg.online_rotation_for("model.layers.0.mlp.up_proj") is None


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("preset", ["quarot", "quip"])
@pytest.mark.parametrize("tied", [False, True])
def test_rotation_preserves_the_float_function(preset, tied):
    from piecewise_quant.quantization import plan_layers
    from piecewise_quant.rotation import rotated

    model = tiny_llama(tied)
    ref = _logits(model)
    cfg = pq.PiecewiseQuantConfig(bits=8, group_size=32, rotation=preset)
    with rotated(model, cfg.rotation, plan_layers(model, cfg)):
        assert _rel(_logits(model), ref) < 1e-5  # hooks carry the online rotations while layers are float
        if preset == "quarot":
            assert torch.equal(model.model.norm.weight, torch.ones(64))
            assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
            assert model.config.tie_word_embeddings is False


def test_a_failure_puts_the_model_back_exactly(monkeypatch):
    model = tiny_llama(tied=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return real(*a, **k)

    real = pq.QuantLinear.from_linear
    monkeypatch.setattr(pq.QuantLinear, "from_linear", boom)
    with pytest.raises(RuntimeError, match="boom"):
        pq.quantize(model, pq.PiecewiseQuantConfig(bits=4, group_size=32, rotation="quarot"), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_an_architecture_the_fusion_does_not_fit_is_refused_and_restored():
    model = tiny_llama()
    norm = model.model.layers[0].input_layernorm
    norm.forward = lambda x: (1 + norm.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    ref = _logits(model)
    with pytest.raises(ValueError, match="does not fit the fused rotations"):
        pq.quantize(model, pq.PiecewiseQuantConfig(bits=4, group_size=32, rotation="quarot"), progress=False)
    assert torch.equal(_logits(model), ref)


def test_r1_needs_a_llama_family_decoder_and_quip_works_anywhere():
    net = nn.Sequential(nn.Linear(64, 192), nn.ReLU(), nn.Linear(192, 64))
    with pytest.raises(ValueError, match="Llama-family"):
        cfg = pq.PiecewiseQuantConfig(bits=4, group_size=32, rotation="quarot", modules_to_not_convert=[])
        pq.quantize(copy.deepcopy(net), cfg, progress=False)
    x = torch.randn(4, 64)
    q = pq.quantize(copy.deepcopy(net), pq.PiecewiseQuantConfig(grid="uniform", bits=8, group_size="channel",
                                                               rotation="quip", modules_to_not_convert=[]), progress=False)
    assert _rel(q(x).double(), net(x).double()) < 1e-2
    bad = nn.Sequential(nn.Linear(64, 7))
    with pytest.raises(ValueError, match="output size 7"):
        pq.quantize(bad, pq.PiecewiseQuantConfig(bits=4, group_size=32, rotation="quip", modules_to_not_convert=[]),
                    progress=False)


def test_rotated_layers_dequantize_to_the_original_weight_basis():
    net = nn.Sequential(nn.Linear(64, 192), nn.ReLU(), nn.Linear(192, 64))
    q = pq.quantize(copy.deepcopy(net), pq.PiecewiseQuantConfig(grid="uniform", bits=8, group_size="channel",
                                                               rotation="quip", modules_to_not_convert=[]), progress=False)
    for orig, ql in zip((net[0], net[2]), (q[0], q[2])):
        lin = ql.to_linear(torch.float32)
        assert _rel(lin.weight.double(), orig.weight.double()) < 1e-2
        assert _rel(lin.bias.double(), orig.bias.double()) < 1e-2
        x = torch.randn(3, orig.in_features)
        torch.testing.assert_close(lin(x), ql(x), rtol=1e-4, atol=1e-4)


def test_rotation_makes_4bit_activations_of_an_outlier_model_usable():
    from piecewise_quant.testing import make_outlier_model

    model = tiny_llama()
    make_outlier_model(model, n_channels=2, factor=30.0)
    ref = _logits(model)
    base = dict(grid="uniform", bits=8, group_size="channel", act_bits=4)
    plain = pq.quantize(copy.deepcopy(model), pq.PiecewiseQuantConfig(**base), progress=False)
    rot = pq.quantize(copy.deepcopy(model), pq.PiecewiseQuantConfig(**base, rotation="quarot"), progress=False)
    e_plain, e_rot = _rel(_logits(plain), ref), _rel(_logits(rot), ref)
    assert e_rot < 0.5 * e_plain, (e_rot, e_plain)


@pytest.mark.parametrize("preset", ["quarot", "quip"])
def test_rotated_checkpoints_reload_exactly_and_quantize_on_load_alike(tmp_path, preset):
    from transformers import AutoModelForCausalLM

    float_dir = tmp_path / "float"
    tiny_llama(tied=True).save_pretrained(float_dir)
    cfg = pq.PiecewiseQuantConfig(grid="piecewise", bits=4, group_size=32, act_bits=8, rotation=preset)
    model = AutoModelForCausalLM.from_pretrained(float_dir)
    pq.quantize(model, cfg, progress=False)
    ref = _logits(model)
    on_load = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg)
    assert torch.equal(_logits(on_load), ref)
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization_config"]["rotation"]["rotations"] == list(RotationArgs.coerce(preset).rotations)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(_logits(reloaded), ref)


def test_calibration_with_gptq_composes_with_rotations():
    model = tiny_llama()
    ref = _logits(model)
    data = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(2))
    cal = pq.CalibrationConfig.preset("gptq", n_samples=8, seq_len=16, smoothquant=0.5)
    cfg = pq.PiecewiseQuantConfig(grid="uniform", bits=8, group_size="channel", rotation="quarot", calibration=cal)
    report = pq.calibrate(model, cfg, data, progress=False)
    assert _rel(_logits(model), ref) < 2e-2
    assert report.layers["model.layers.0.mlp.down_proj"].bits == 8
    assert model.model.layers[0].mlp.down_proj.layer_spec.rotation == OnlineRotation(True, False, 0)


def test_r3_needs_a_kv_cache_and_turns_on_key_rotation():
    with pytest.raises(ValueError, match="no kv_cache"):
        pq.PiecewiseQuantConfig(rotation={"rotations": ["R1", "R3"]})
    cfg = pq.PiecewiseQuantConfig(kv_bits=4, rotation={"rotations": ["R1", "R2", "R3", "R4"]})
    assert cfg.kv_cache.key_rotation is True
    assert pq.PiecewiseQuantConfig.from_dict(json.loads(cfg.to_json_string())) == cfg
    with pytest.raises(ValueError, match="key_rotation"):
        KVArgs(key_rotation="yes")


def _outlier_keys():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 48, 64, generator=g)
    k[..., 5] *= 40.0  # one outlier channel, as keys have
    return k


@pytest.mark.parametrize("key_axis", ["token", "channel"])
def test_r3_key_rotation_in_the_quantized_cache_returns_the_keys_and_helps_outliers(key_axis):
    from piecewise_quant.integrations.transformers.kv_cache import QuantizedKVLayer

    k = _outlier_keys()
    v = torch.randn_like(k)
    errs = {}
    for rot in (False, True):
        layer = QuantizedKVLayer(KVArgs(bits=4, key_axis=key_axis, group_size=16, residual_length=0, key_rotation=rot))
        keys, values = layer.update(k, v)
        assert keys.shape == k.shape
        assert _rel(keys.double(), k.double()) < 0.15  # rotated back: a wrong inverse gives about 1.4
        normal = torch.arange(64) != 5  # the ordinary channels, which a per-token outlier scale crushes
        errs[rot] = _rel(keys[..., normal].double(), k[..., normal].double())
    if key_axis == "token":
        assert errs[True] < 0.7 * errs[False], errs


def test_r3_in_fake_quantization_keeps_the_model_close_to_float():
    from piecewise_quant.integrations.transformers import kv_fake_quant

    model = tiny_llama()
    ref = _logits(model)
    with kv_fake_quant(model, KVArgs(bits=8, key_axis="token", group_size=16, residual_length=0, key_rotation=True)):
        assert _rel(_logits(model), ref) < 1e-2


@pytest.mark.parametrize("rows", [1, 4, 40])
def test_the_online_input_rotation_inside_the_cpu_kernel_equals_rotating_first(rows):
    from piecewise_quant.quantization import layer_spec_for

    torch.manual_seed(0)
    w = torch.randn(64, 768) / 28
    spec = pq.QuantSpec(grid="uniform", bits=4, group_size=128)
    fmt = pq.get_format("uniform")
    tensors = fmt.quantize(w, layer_spec_for("d", spec, 768, 64))
    layers = []
    for rot in (OnlineRotation(True, False, 0), None):
        q = pq.QuantLinear.empty(layer_spec_for("d", spec, 768, 64, rot), fmt, bias=False)
        q.load_quantized(tensors)
        layers.append(q)
    x = torch.randn(rows, 768)
    with torch.no_grad():
        fused = layers[0](x)
        separate = layers[1](had.get_rotation(768, 0, "input")(x))
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    reference = x @ (layers[0].dequantize(torch.float32)).T
    assert _rel(fused.double(), reference.double()) < 1e-4


@pytest.mark.parametrize("rows", [1, 4, 40])
@pytest.mark.parametrize("balance", [False, True])
def test_quantized_activations_are_rotated_and_quantized_inside_the_cpu_kernel(rows, balance, monkeypatch):
    """W4A8 (dynamic per-token int8 inputs) with R4 or ViDiT-Q's balance: the prepared CPU call
    rotates and quantizes the rows itself (up to 16 rows), with the result of rotating first and
    running the op; without a rotation the prepared call equals the op exactly."""
    from piecewise_quant.kernels import cpu_backend
    from piecewise_quant.kernels.ops import ActOperand, quantized_linear
    from piecewise_quant.quantization import layer_spec_for

    calls = []
    prepared_call = cpu_backend.Prepared.__call__

    def spy(self, x, bias, rotation=None, act=None):
        out = prepared_call(self, x, bias, rotation, act)
        calls.append((rotation is not None, act, out is not None))
        return out

    monkeypatch.setattr(cpu_backend.Prepared, "__call__", spy)

    torch.manual_seed(0)
    w = torch.randn(64, 768) / 28
    spec = pq.QuantSpec(grid="uniform", bits=4, group_size=128, act_bits=8, act_clip_ratio=0.9)
    fmt = pq.get_format("uniform")
    tensors = fmt.quantize(w, layer_spec_for("d", spec, 768, 64))
    layers = []
    for rot in (OnlineRotation(True, False, 0, balance=balance), None):
        q = pq.QuantLinear.empty(layer_spec_for("d", spec, 768, 64, rot), fmt, bias=False)
        q.load_quantized(tensors)
        layers.append(q)
    if balance:
        layers[0]._buffers["balance_scale"].copy_(torch.rand(768).add(0.5).half())
    x = torch.randn(rows, 768) * 3
    with torch.no_grad():
        fused = layers[0](x)
        xr = layers[0]._rot_in(x)
        separate = layers[1](xr)
        op = quantized_linear(xr, fmt.weight_operand(layers[1].quantized_tensors(), layers[1].layer_spec), None,
                              ActOperand(None, "int8", "dynamic_per_token", 0.9, 0))
    if rows <= cpu_backend.GEMV_MAX_ROWS and cpu_backend.status()["isa"] == "avx512-vnni":
        act = (127.0, pytest.approx(0.9), True)
        assert calls == [(True, act, True), (False, act, True)]  # both layers ran inside the prepared call
    assert torch.equal(separate, op)
    assert _rel(fused.double(), separate.double()) < 1e-3  # float32 rotations in another order: a code may flip
    reference = xr @ layers[1].dequantize(torch.float32).T
    assert _rel(fused.double(), reference.double()) < 3e-2  # int8 rows clipped at 0.9 of their maximum


def test_merging_an_adapter_into_a_rotated_layer_keeps_the_original_basis():
    pytest.importorskip("peft")
    from piecewise_quant.integrations.peft.layer import merged_base_layer

    net = nn.Sequential(nn.Linear(64, 192))
    q = pq.quantize(net, pq.PiecewiseQuantConfig(grid="uniform", bits=8, group_size="channel", rotation="quip",
                                                 modules_to_not_convert=[]), progress=False)[0]
    delta = torch.randn(192, 64) * 0.01
    merged = merged_base_layer(q, delta, None, "float")
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), q(x) + x @ delta.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="rotates its input/output online"):
        merged_base_layer(q, delta, None, "quantized")
