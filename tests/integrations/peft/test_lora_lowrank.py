"""LoRA on a low-rank (SVDQuant) ``QuantLinear``: the forward adds the branch, a re-quantized merge
takes the merged weight's factors again."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_lora_forward_and_merge_keep_the_low_rank_branch():
    import piecewise_quant as pq
    from piecewise_quant.integrations.peft import merge_and_unload

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, head_dim=32, vocab_size=128, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    pq.quantize(model, pq.PiecewiseQuantConfig(grid="uniform", bits=4, group_size=32, low_rank=4), progress=False)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"]))
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    base = layer.get_base_layer()
    assert base.lowrank_a.shape == (64, 4)
    w = base.dequantize(torch.float64)  # the residual's codes plus A B
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    x = torch.randn(3, 128)
    with torch.no_grad():
        ref = x.double() @ w.T + (x.double() @ a.T @ b.T) * 2.0
        torch.testing.assert_close(layer(x).double(), ref, atol=2e-5, rtol=1e-5)
    # training through the frozen base: gradients reach LoRA's B through the branch too
    layer(x.requires_grad_(True)).sum().backward()
    assert layer.lora_B["default"].weight.grad is not None and x.grad is not None
    with torch.no_grad():
        merged_w = base.dequantize(torch.float32) + layer.get_delta_weight("default")
        merged = merge_and_unload(pm, merge_to="quantized")
        q = merged.model.layers[0].mlp.down_proj
        expected = base.fmt.quantize(merged_w, base.layer_spec)
        for name, t in expected.items():
            assert torch.equal(q.quantized_tensors()[name], t), name
