"""QuantizedKVCache (transformers v5 Cache API), kv_fake_quant and the plain-generate() hook, on tiny
random Llama/Mistral models built from configs."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402

import piecewise_quant as pq  # noqa: E402
from piecewise_quant.args import KVArgs  # noqa: E402
from piecewise_quant.integrations.transformers import (  # noqa: E402
    QuantizedKVCache,
    QuantizedKVLayer,
    cache_bytes,
    disable_kv_cache,
    enable_kv_cache,
    kv_fake_quant,
)

# per-token keys, no residual window: the cache stores exactly what the fake-quant mode computes
EXACT = KVArgs(bits=4, key_axis="token", group_size=16, residual_length=0)
KIVI = KVArgs(bits=2, key_axis="channel", group_size=8, residual_length=8, sink_tokens=2)
GEN = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)


def _config(cls=LlamaConfig, **extra):
    return cls(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).eval()


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (2, 20))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0  # left padding
    return dict(input_ids=ids, attention_mask=mask)


def _gen(model, batch, **kw):
    return model.generate(**batch, **GEN, **kw)


def test_nothing_quantized_equals_dynamic_cache(tiny, batch):
    big = KVArgs(bits=2, residual_length=1000)
    out = _gen(tiny, batch, past_key_values=QuantizedKVCache(big, tiny.config), output_scores=True, return_dict_in_generate=True)
    ref = _gen(tiny, batch, past_key_values=DynamicCache(config=tiny.config), output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))


def test_quantized_logits_close_and_cache_matches_fake_quant_exactly(tiny, batch):
    ids = batch["input_ids"]
    ref = tiny(ids).logits
    kv8 = KVArgs(bits=8, key_axis="token", group_size=16, residual_length=0)
    got = tiny(ids, past_key_values=QuantizedKVCache(kv8, tiny.config)).logits
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
    with kv_fake_quant(tiny, kv8):
        fake = tiny(ids).logits
    assert torch.equal(fake, got)


@pytest.mark.parametrize(
    "beams, kv",
    [
        (1, EXACT),
        (3, EXACT),
        (1, KVArgs(bits=3, key_axis="token", group_size=16, residual_length=0, symmetric=True)),
        (1, KVArgs(format="fp8", bits=8, key_axis="token", group_size=32, residual_length=0)),
        (3, KVArgs(bits=4, key_axis="token", group_size=16, residual_length=0, grid="piecewise")),
    ],
    ids=["int4", "int4-beams", "int3-sym", "fp8", "piecewise4-beams"],
)
def test_generate_batch_and_beam_search_match_fake_quant(tiny, batch, beams, kv):
    real = _gen(tiny, batch, num_beams=beams, past_key_values=QuantizedKVCache(kv, tiny.config))
    with kv_fake_quant(tiny, kv):
        fake = _gen(tiny, batch, num_beams=beams)
    assert torch.equal(real, fake)


def test_piecewise_kivi_cache_at_3_bits_decodes_on_the_dense_path(tiny, batch, monkeypatch):
    """3-bit piecewise codes are not read by the fused kernel: decoding dequantizes them (the
    kernel is never called), and the stored keys and values stay within the grid's error of the
    float ones."""
    from piecewise_quant.integrations.transformers import kv_cache as kvc

    kv = KVArgs(bits=3, key_axis="channel", group_size=8, residual_length=4, sink_tokens=1, grid="piecewise")
    calls = []
    real = kvc.decode_attention
    monkeypatch.setattr(kvc, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = QuantizedKVCache(kv, tiny.config)
    out = _gen(tiny, batch, past_key_values=cache)
    assert not calls and out.shape == (2, 32) and cache.layers[0].qkeys.breakpoint is not None
    quant, ref = QuantizedKVCache(kv, tiny.config), DynamicCache(config=tiny.config)
    with torch.no_grad():
        tiny(out, past_key_values=quant)
        tiny(out, past_key_values=ref)
    for layer, float_layer in zip(quant.layers, ref.layers):
        for which, x in (("key", float_layer.keys), ("value", float_layer.values)):
            y = layer.parts(which).dense(torch.float32)
            assert y.shape == x.shape
            assert float((y - x).square().sum() / x.square().sum()) < 0.05  # 3 bits: a few percent


def test_kivi_cache_generates_with_beams_and_counts_tokens(tiny, batch):
    cache = QuantizedKVCache(KIVI, tiny.config)
    out = _gen(tiny, batch, num_beams=3, num_return_sequences=2, past_key_values=cache)
    assert out.shape == (4, 32)
    assert cache.get_seq_length() == 31 and cache.get_mask_sizes(1, 0) == (32, 0)
    layer = cache.layers[0]
    assert layer.qkeys is not None and layer.qkeys.tokens % KIVI.group_size == 0
    assert layer.sink_keys.shape[-2] == 2 and KIVI.residual_length <= layer.keys.shape[-2] < 16
    assert layer.values.shape[-2] == KIVI.residual_length


def _states(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 1, n, 16, generator=g), torch.randn(3, 1, n, 16, generator=g)


def test_streaming_equals_one_shot_and_history_is_never_requantized():
    k, v = _states(61)
    one = QuantizedKVLayer(KIVI)
    k1, v1 = one.update(k, v)
    step = QuantizedKVLayer(KIVI)
    step.update(k[:, :, :5], v[:, :, :5])
    seen = []
    for t in range(5, 61):
        kt, vt = step.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        quantized = 2 + (step.qkeys.tokens if step.qkeys is not None else 0)
        seen.append(kt[:, :, :quantized])
    assert torch.equal(kt, k1) and torch.equal(vt, v1)
    assert seen[-1].shape[-2] == 2 + 48
    for earlier in seen:  # a token once quantized reads back the same forever: nothing re-quantized
        assert torch.equal(earlier, kt[:, :, : earlier.shape[-2]])
    assert torch.equal(k1[:, :, :2], k[:, :, :2])  # sinks
    assert torch.equal(k1[:, :, -8:], k[:, :, -8:]) and torch.equal(v1[:, :, -8:], v[:, :, -8:])  # residual window


def test_reorder_and_select_follow_the_batch():
    k, v = _states(40)
    layer = QuantizedKVLayer(KIVI)
    full_k, full_v = layer.update(k, v)
    idx = torch.tensor([2, 0, 0])
    layer.reorder_cache(idx)
    k2, v2 = layer.update(k[:, :, :0], v[:, :, :0])
    assert torch.equal(k2, full_k[idx]) and torch.equal(v2, full_v[idx])
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.update(k[:1, :, :0], v[:1, :, :0])[0], full_k[[0]])


def test_memory_is_really_smaller(tiny):
    ids = torch.randint(3, 96, (1, 256))
    ref, q = DynamicCache(config=tiny.config), QuantizedKVCache(KVArgs(bits=4, group_size=32, residual_length=16), tiny.config)
    tiny(ids, past_key_values=ref)
    tiny(ids, past_key_values=q)
    ratio = cache_bytes(q) / cache_bytes(ref)
    # float32 states, 5 bits a quantized value (codes, float16 scale and zero per 32): keys in whole
    # blocks of 32 (224 quantized, 32 in full precision), values per token (240 quantized, 16 not)
    keys, values = 224 * 5 + 32 * 32, 240 * 5 + 16 * 32
    assert ratio == pytest.approx((keys + values) / (2 * 256 * 32), rel=1e-6)
    assert q.nbytes() == cache_bytes(q)


def test_sliding_window_layers_stay_transformers_own():
    torch.manual_seed(0)
    model = MistralForCausalLM(_config(MistralConfig, sliding_window=8, head_dim=32)).eval()
    cache = QuantizedKVCache(EXACT, model.config)
    assert not any(isinstance(layer, QuantizedKVLayer) for layer in cache.layers)
    model.generate(torch.randint(3, 96, (1, 12)), past_key_values=cache, **GEN)
    assert cache.get_seq_length() == 23


def test_user_dicts_are_not_mutated(tiny, batch):
    d = {"bits": 4, "key_axis": "token", "group_size": 16, "residual_length": 0}
    before = copy.deepcopy(d)
    QuantizedKVCache(d, tiny.config)
    model = copy.deepcopy(tiny)
    enable_kv_cache(model, d)
    _gen(model, batch)
    _gen(model, batch)
    assert d == before


def test_enable_kv_cache_and_user_cache_wins(tiny, batch):
    model = copy.deepcopy(tiny)
    enable_kv_cache(model, EXACT)
    out = model.generate(**batch, **GEN, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, QuantizedKVCache)
    with kv_fake_quant(tiny, EXACT):
        assert torch.equal(out.sequences, _gen(tiny, batch))
    mine = DynamicCache(config=model.config)
    assert model.generate(**batch, **GEN, past_key_values=mine, return_dict_in_generate=True).past_key_values is mine
    twin = copy.deepcopy(model)
    assert twin._prepare_cache_for_generation.__self__ is twin
    disable_kv_cache(model)
    assert type(model.generate(**batch, **GEN, return_dict_in_generate=True).past_key_values) is DynamicCache


def test_checkpoint_declaring_kv_scheme_uses_it_in_plain_generate(tiny, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny.save_pretrained(tmp_path / "float")
    cfg = pq.PiecewiseQuantConfig(bits=8, grid="uniform", group_size=32, kv_cache=EXACT)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg)
    first = model.generate(**batch, **GEN, return_dict_in_generate=True)
    assert isinstance(first.past_key_values, QuantizedKVCache) and first.past_key_values.kv == EXACT
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.kv_cache == EXACT
    second = again.generate(**batch, **GEN, return_dict_in_generate=True)
    assert isinstance(second.past_key_values, QuantizedKVCache)
    assert torch.equal(first.sequences, second.sequences)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "float",
                                                 quantization_config=pq.PiecewiseQuantConfig(bits=8, group_size=32))
    assert type(plain.generate(**batch, **GEN, return_dict_in_generate=True).past_key_values) is DynamicCache


# ---- decoding from the codes (the fused decode attention) ------------------------------------------


def _scored(model, batch, cache):
    return model.generate(**batch, **GEN, past_key_values=cache, output_scores=True, return_dict_in_generate=True)


def _scores_close(xs, ys, rel=1e-4):
    for x, y in zip(xs, ys):
        finite = torch.isfinite(y)
        assert torch.equal(finite, torch.isfinite(x))  # the same suppressed tokens (min_new_tokens)
        assert (x[finite] - y[finite]).abs().max() <= rel * y[finite].abs().max()


@pytest.mark.parametrize("kv", [KIVI, EXACT, KVArgs(bits=8, group_size=8, residual_length=4, symmetric=True, key_rotation=True),
                                KVArgs(bits=4, group_size=8, residual_length=4, sink_tokens=1, grid="piecewise")],
                         ids=["kivi2-sinks", "int4-token", "int8-sym-R3", "kivi4-piecewise"])
def test_decode_reads_the_codes_and_matches_the_dense_path(tiny, batch, kv, monkeypatch):
    """GQA, left padding: the decode steps run the kernel (counted) and give the dense path's tokens
    and scores (the dense path dequantizes the history and runs SDPA)."""
    from piecewise_quant.integrations.transformers import kv_cache as kvc

    calls = []
    real = kvc.decode_attention
    monkeypatch.setattr(kvc, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = _scored(tiny, batch, QuantizedKVCache(kv, tiny.config))
    assert len(calls) >= 2 * (GEN["max_new_tokens"] - 4)  # both layers, once the history holds codes
    monkeypatch.setenv("PIECEWISE_QUANT_KV_FUSED", "0")
    n = len(calls)
    dense = _scored(tiny, batch, QuantizedKVCache(kv, tiny.config))
    assert len(calls) == n
    assert torch.equal(fused.sequences, dense.sequences)
    _scores_close(fused.scores, dense.scores)


def test_lazy_kv_is_dequantized_for_any_other_consumer(tiny, batch, monkeypatch):
    """Eager attention (no fused path) gets LazyKV tensors and computes exactly what it computes
    from the dense ones: LazyKV dequantizes on first use."""
    from piecewise_quant.integrations.transformers import LazyKV

    eager = copy.deepcopy(tiny)
    eager.set_attn_implementation("eager")
    a = _scored(eager, batch, QuantizedKVCache(KIVI, tiny.config))
    monkeypatch.setenv("PIECEWISE_QUANT_KV_FUSED", "0")
    b = _scored(eager, batch, QuantizedKVCache(KIVI, tiny.config))
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))
    monkeypatch.delenv("PIECEWISE_QUANT_KV_FUSED")
    k, v = _states(40)
    layer = QuantizedKVLayer(KIVI)
    dense_k, _ = layer.update(k, v)
    lazy_k, lazy_v = layer.update(k[:, :, :1], v[:, :, :1])
    assert isinstance(lazy_k, LazyKV) and lazy_k.shape == (3, 1, 41, 16)
    again = QuantizedKVLayer(KIVI)
    again.update(k, v)
    with torch.enable_grad():
        dense = again.update(k[:, :, :1].requires_grad_(), v[:, :, :1])[0]  # autograd: never lazy
    assert not isinstance(dense, LazyKV)
    assert torch.equal(lazy_k * 1, dense.detach()) and torch.equal(lazy_k[:, :, :40], dense_k)
    assert torch.equal(torch.cat([lazy_v, lazy_v]), torch.cat([lazy_v.dense()] * 2))


def test_sdpa_wrapper_leaves_other_calls_unchanged(tiny, batch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    QuantizedKVCache(KIVI, tiny.config).update(*_states(1), 0)  # one update installs the wrapper
    wrapped = AttentionInterface._global_mapping["sdpa"]
    assert wrapped is not sdpa_attention_forward and wrapped.__wrapped__ is sdpa_attention_forward
    attn = tiny.model.layers[0].self_attn
    q, k, v = torch.randn(2, 2, 5, 32), torch.randn(2, 1, 5, 32), torch.randn(2, 1, 5, 32)
    got, _ = wrapped(attn, q, k, v, None, scaling=0.2)
    ref, _ = sdpa_attention_forward(attn, q, k, v, None, scaling=0.2)
    assert torch.equal(got, ref)
