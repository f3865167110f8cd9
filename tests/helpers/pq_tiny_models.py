"""Tiny random models shared by several test modules (on ``sys.path`` through pytest's ``pythonpath``)."""

from __future__ import annotations

import torch

# token ids for the tiny Llama below (vocabulary 96)
TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def tiny_llama(tied: bool = False, seed: int = 0):
    """A random 2-block grouped-query Llama (hidden 64, 4 heads, 2 KV heads) with non-trivial norm
    weights, so folding them into the next layers is exercised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=tied,
                      initializer_range=0.1)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def logits(model) -> torch.Tensor:
    """The model's float64 logits on :data:`TOKENS`."""
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.double()
