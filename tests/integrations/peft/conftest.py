"""Fixtures for the PEFT integration tests: a tiny quantized Llama built from a config, and the
bundled model quantized once per module (uniform grid: the fastest to quantize)."""

from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_quantized_llama():
    """A factory: a fresh 2-layer Llama (hidden 64) with every projection a piecewise 4-bit QuantLinear."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    import piecewise_quant as pq

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=32, vocab_size=128, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    pq.quantize(model, pq.PiecewiseQuantConfig(bits=4, group_size=32), progress=False)

    def make():
        return copy.deepcopy(model)

    return make


@pytest.fixture(scope="module")
def bundled_quantized(tiny_llama_path, tmp_path_factory):
    """(path of a saved quantized checkpoint of the bundled model, tokenizer)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import piecewise_quant as pq

    out = tmp_path_factory.mktemp("quantized")
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_path, quantization_config=pq.PiecewiseQuantConfig(bits=4, group_size=64, grid="uniform")
    )
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    tok.save_pretrained(out)
    return out, tok
