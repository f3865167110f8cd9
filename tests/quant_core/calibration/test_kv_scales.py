"""Static FP8 KV-cache scales: ``KVArgs(static_scales=True)``, the FP8 codes (both roundings), the
``StaticKVScales`` calibration step (scales = max over the calibration data / 448, exactly), the
checkpoint round trip, and transformers' use of the scales."""

from __future__ import annotations

import json

import pytest
import torch

import piecewise_quant as pq
from piecewise_quant.kv import quantize_kv
from piecewise_quant.kv_static import (
    FP8_E4M3_MAX,
    calibrate_kv_scales,
    fake_quantize_fp8_static,
    kv_scales,
    quantize_fp8_static,
    static_kv_fake_quant,
)

transformers = pytest.importorskip("transformers")

STATIC = pq.KVArgs(bits=8, format="fp8", static_scales=True, residual_length=0)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def ids(n=8, length=32, seed=0):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def config(**kw):
    cal = pq.CalibrationConfig.preset("aware", n_samples=8, seq_len=32)
    return pq.PiecewiseQuantConfig(group_size=32, kv_cache=STATIC, calibration=cal, **kw)


@torch.no_grad()
def cache_amax(model, batches) -> dict[int, torch.Tensor]:
    """max |K| and |V| per layer from transformers' own cache (post-RoPE keys), independently of
    the hooks under test."""
    out: dict[int, torch.Tensor] = {}
    for batch in batches:
        cache = model(**batch, use_cache=True).past_key_values
        for i, layer in enumerate(cache.layers):
            seen = torch.stack([layer.keys.abs().amax(), layer.values.abs().amax()]).float()
            out[i] = seen if i not in out else torch.maximum(out[i], seen)
    return out


# ---- the config field ---------------------------------------------------------------------------


def test_static_scales_field_is_validated_and_written_only_when_set():
    assert "static_scales" not in pq.KVArgs().to_dict()  # today's configs serialise (and hash) as before
    assert STATIC.to_dict()["static_scales"] is True
    assert pq.KVArgs.coerce(STATIC.to_dict()) == STATIC
    assert STATIC.describe() == "fp8 static per-tensor k_scale/v_scale"
    with pytest.raises(ValueError, match=r"static_scales=True .*needs format='fp8', residual_length=0.*got \{'format': 'int'"):
        pq.KVArgs(static_scales=True)
    with pytest.raises(ValueError, match=r"got \{'residual_length': 128\}"):
        pq.KVArgs(bits=8, format="fp8", static_scales=True)
    with pytest.raises(ValueError, match="static_scales must be True or False"):
        pq.KVArgs(bits=8, format="fp8", static_scales=1, residual_length=0)
    with pytest.raises(ValueError, match="no key rotation"):
        pq.PiecewiseQuantConfig(kv_cache=STATIC, rotation={"rotations": ["R1", "R3"]})
    cfg = pq.PiecewiseQuantConfig(kv_cache=STATIC)
    assert pq.PiecewiseQuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).kv_cache == STATIC
    with pytest.raises(ValueError, match="one calibrated scale per layer"):
        quantize_kv(torch.zeros(1, 1, 2, 8), STATIC, "token")


# ---- the codes --------------------------------------------------------------------------------


def test_fp8_codes_round_to_nearest_or_toward_zero_and_saturate():
    full = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    full = full[torch.isfinite(full)].unique()  # every finite E4M3 value, sorted
    pos = full[full >= 0]
    x = torch.cat([torch.linspace(-500, 500, 20001), torch.tensor([1e-4, -3e-3, 0.0, 1e6, -1e6])])
    scale = 0.75
    q = (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    near = quantize_fp8_static(x, scale, "nearest").float()
    down = quantize_fp8_static(x, scale, "toward_zero").float()
    # toward zero: the largest grid magnitude not beyond |q|, with q's sign
    idx = torch.searchsorted(pos, q.abs().contiguous(), right=True) - 1
    assert torch.equal(down, pos[idx] * torch.sign(q))
    # nearest: no grid value is closer
    assert torch.equal((near - q).abs(), (full[None, :] - q[:, None]).abs().amin(1))
    assert near.abs().max() == FP8_E4M3_MAX and down.abs().max() == FP8_E4M3_MAX  # saturated, never NaN
    assert torch.equal(fake_quantize_fp8_static(x, scale, "toward_zero"), down * scale)
    with pytest.raises(ValueError, match="rounding must be one of"):
        quantize_fp8_static(x, scale, "up")


# ---- calibration --------------------------------------------------------------------------------


def test_calibrated_scales_are_the_max_over_the_calibration_data_over_448_exactly():
    from piecewise_quant.calibration.data import prepare_batches

    model = tiny_llama()
    data = ids()
    conf = config(bits=4)
    pq.calibrate(model, conf, data, progress=False)
    cal = conf.calibration
    batches = prepare_batches(data, model=model, n_samples=cal.n_samples, seq_len=cal.seq_len,
                              batch_size=cal.batch_size, seed=cal.seed)
    amax = cache_amax(model, batches)  # the calibrated (quantized) model: what would enter vLLM's cache
    scales = kv_scales(model)
    assert len(scales) == 2
    for i in range(2):
        k, v = scales[f"model.layers.{i}.self_attn"]
        assert k.dtype == torch.float32 and k.shape == ()
        assert torch.equal(k, amax[i][0] / 448) and torch.equal(v, amax[i][1] / 448)


def test_scales_are_saved_under_vllms_names_and_reload_bit_exactly(tmp_path):
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    pq.calibrate(model, config(bits=8), ids(), progress=False)
    model.save_pretrained(tmp_path)
    saved = kv_scales(model)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for name, (k, v) in saved.items():
            assert torch.equal(f.get_tensor(f"{name}.k_scale"), k) and torch.equal(f.get_tensor(f"{name}.v_scale"), v)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["kv_cache"]["static_scales"] is True
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    for name, (k, v) in kv_scales(again).items():
        assert torch.equal(k, saved[name][0]) and torch.equal(v, saved[name][1])
    # plain forward/generate of the reloaded model applies the scales (rounded to nearest)
    x = ids(2, 16, seed=3)
    with torch.no_grad():
        with static_kv_fake_quant(model, "nearest"):
            want = model(x).logits
        assert torch.equal(again(x).logits, want)


def test_a_checkpoint_missing_a_scale_does_not_load(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    pq.calibrate(model, config(bits=8), ids(), progress=False)
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.self_attn.v_scale"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception, match=r"model.layers.1.self_attn.v_scale.* missing"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_fake_quant_mode_uses_the_models_scales_and_refuses_a_model_without_them():
    from piecewise_quant.integrations.transformers import kv_fake_quant

    model = tiny_llama()
    x = ids(2, 16, seed=1)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn' has no calibrated k_scale/v_scale"):
        with static_kv_fake_quant(model), torch.no_grad():
            model(x)
    found = calibrate_kv_scales(model, [ids(4, 32, seed=2)])
    assert len(found) == 2
    with torch.no_grad():
        plain = model(x).logits
        with kv_fake_quant(model, STATIC):
            via_kv_fake_quant = model(x).logits
        with static_kv_fake_quant(model, "nearest"):
            near = model(x).logits
        with static_kv_fake_quant(model, "toward_zero"):
            down = model(x).logits
    assert torch.equal(via_kv_fake_quant, near)
    assert not torch.equal(near, plain) and not torch.equal(near, down)
    # FP8 with calibrated scales stays close to float on this model
    assert (near - plain).abs().max() < 0.05 * plain.abs().max()


def test_plain_forward_of_a_deep_copy_uses_the_copys_own_scales():
    import copy

    from piecewise_quant.integrations.transformers import enable_kv_cache

    model = tiny_llama()
    calibrate_kv_scales(model, [ids(4, 32, seed=2)])
    enable_kv_cache(model, STATIC)
    twin = copy.deepcopy(model)
    for _, m in twin.named_modules():
        if hasattr(m, "k_scale"):  # not a power of two: FP8 is floating point, 2^n scales round alike
            m.k_scale.mul_(3)
            m.v_scale.mul_(3)
    x = ids(1, 16, seed=4)
    with torch.no_grad():
        with static_kv_fake_quant(twin, "nearest"):
            want = twin(x).logits
        enable_kv_cache(twin, STATIC)  # re-enabling replaces the hooks, never stacks them
        assert torch.equal(twin(x).logits, want)
        assert not torch.equal(model(x).logits, want)
