"""A checkpoint saved by the main of 2026-12-03 (before the restructure) reloads bit-exactly.

The fixture (``tests/fixtures/legacy-2026-12-03``) mixes every built-in weight format (piecewise
3/4-bit, uniform 2/3/4/8-bit symmetric and asymmetric, per-group and per-channel, fp8) with
dynamic int8, fp8 and static per-tensor int8 activations, calibrated with GPTQ. Written by
``tests/fixtures/make_legacy_checkpoint.py``; the expected tensors were saved by the same old code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import piecewise_quant as pq  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "fixtures" / "legacy-2026-12-03"


@pytest.fixture(scope="module")
def reloaded():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(FIXTURE).eval()


@pytest.fixture(scope="module")
def expected():
    return load_file(FIXTURE / "expected.safetensors")


def test_every_quantized_layer_reloads_with_identical_weights(reloaded, expected):
    layers = {n: m for n, m in reloaded.named_modules() if isinstance(m, pq.QuantLinear)}
    want = {k[: -len(".dequantized")] for k in expected if k.endswith(".dequantized")}
    assert set(layers) == want and len(want) == 14
    for name, mod in layers.items():
        assert torch.equal(mod.dequantize(torch.float32), expected[f"{name}.dequantized"]), name


def test_stored_tensors_round_trip_exactly(reloaded, tmp_path):
    stored = load_file(FIXTURE / "model.safetensors")
    reloaded.save_pretrained(tmp_path)
    again = load_file(tmp_path / "model.safetensors")
    assert set(again) == set(stored)
    for key, tensor in stored.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key


def test_static_activation_scales_and_formats_survive(reloaded):
    mlp = reloaded.model.layers[0].mlp.gate_proj
    assert mlp.spec.act_mode == "static_per_tensor" and mlp.spec.act_bits == 8
    assert reloaded.model.layers[0].self_attn.v_proj.spec.grid == "fp8"
    assert reloaded.model.layers[1].self_attn.o_proj.spec.bits == 2


def test_logits_match_what_the_old_version_computed(reloaded, expected):
    with torch.no_grad():
        logits = reloaded(expected["probe_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
