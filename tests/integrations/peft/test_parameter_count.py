"""print_trainable_parameters counts packed QuantLinear weights at their logical size."""

from __future__ import annotations

import pytest

peft = pytest.importorskip("peft")


def test_trainable_and_total_counts_are_logical(tiny_quantized_llama, capsys):
    from peft import LoraConfig, get_peft_model

    import piecewise_quant as pq

    model = tiny_quantized_llama()
    float_total = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in pq.quantized_layers(model).values()
    )
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = peft_model.get_nb_trainable_parameters()
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert trainable == lora
    assert total == float_total + lora  # the same count the float model + adapters would give
    peft_model.print_trainable_parameters()
    assert f"all params: {total:,d}" in capsys.readouterr().out
