"""FP4 (mxfp4 / nvfp4) through transformers: quantize on load, save_pretrained, plain
from_pretrained back bit-exact, and a corrupt FP4 tensor refused by name."""

from __future__ import annotations

import shutil

import pytest
import torch

import piecewise_quant as pq

transformers = pytest.importorskip("transformers")

Q = "model.layers.0.self_attn.q_proj"  # mxfp4
DOWN = "model.layers.0.mlp.down_proj"  # nvfp4 (override)


def test_fp4_quantize_on_load_save_and_reload_bit_exact(tiny_llama_path, tiny_inputs, tmp_path, tfh):
    from safetensors.torch import load_file, save_file

    from piecewise_quant.integrations.transformers import CheckpointMismatchError

    cfg = tfh.subset_config(grid="mxfp4", overrides={"*.mlp.*": {"grid": "nvfp4"}})
    model = tfh.load_quantized(tiny_llama_path, cfg)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, pq.QuantLinear)}
    assert len(layers) == 7
    assert layers[Q].spec.grid == "mxfp4" and layers[Q].scales.dtype == torch.uint8
    assert layers[DOWN].spec.grid == "nvfp4" and layers[DOWN].scales.dtype == torch.float8_e4m3fn
    assert layers[Q].bits_per_weight() == 4.25
    logits = tfh.logits_of(model, tiny_inputs)
    ref = tfh.logits_of(tfh.load_float(tiny_llama_path), tiny_inputs)
    # one decoder layer in 4-bit floats moves the logits by a few percent of their spread
    assert float((logits - ref).std() / ref.std()) < 0.1

    model.save_pretrained(tmp_path / "ck")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    got = {n: m for n, m in back.named_modules() if isinstance(m, pq.QuantLinear)}
    assert set(got) == set(layers)
    for name, q in got.items():
        for t, value in layers[name].quantized_tensors().items():
            mine = q.quantized_tensors()[t]
            assert mine.dtype == value.dtype and torch.equal(mine.view(torch.uint8), value.view(torch.uint8)), f"{name}.{t}"
    assert torch.equal(tfh.logits_of(back, tiny_inputs), logits)

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "ck", broken)
    sd = load_file(str(broken / "model.safetensors"))
    sd[f"{DOWN}.global_scale"] = torch.ones(2)  # wrong shape
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=rf"'{DOWN}\.global_scale' has shape \[2\]"):
        transformers.AutoModelForCausalLM.from_pretrained(broken)
