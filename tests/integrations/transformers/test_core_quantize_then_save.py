"""A transformers model quantized with the core ``piecewise_quant.quantize`` saves with its own
``save_pretrained`` into a checkpoint that reloads quantized (never silently re-initialised)."""

from __future__ import annotations

import json

import torch

import piecewise_quant as pq


def test_core_quantized_model_round_trips_through_save_pretrained(tiny_llama_path, tiny_inputs, tmp_path, tfh):
    model = tfh.load_float(tiny_llama_path)
    config = tfh.subset_config(bits=3)
    pq.quantize(model, config, progress=False)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"] == config.to_dict()
    reloaded = tfh.load_float(tmp_path)
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, pq.QuantLinear)
    with torch.no_grad():
        assert torch.equal(model(tiny_inputs).logits, reloaded(tiny_inputs).logits)
