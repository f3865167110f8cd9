"""The recipe ``calibrate()`` runs when none is named is the measured best (the ``"default"``
preset, GPTQ); an explicit ``"aware"`` and ``CalibrationConfig()`` keep their old meaning, so
configs and checkpoints that recorded them load and mean the same thing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import piecewise_quant as pq
from piecewise_quant.config import CALIBRATION_PRESETS, DEFAULT_CALIBRATION_PRESET

transformers = pytest.importorskip("transformers")

# the flat algorithm fields every saved config of the old default ("aware") holds
AWARE_FLAT = {"smoothquant": None, "let": False, "lwc": False, "gptq": False, "refine_breakpoints": False,
              "mixed_precision_budget": None, "algorithm": None}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _ids():
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def _tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_default_preset_is_gptq_and_named():
    assert DEFAULT_CALIBRATION_PRESET == "default"
    default = pq.CalibrationConfig.preset("default")
    assert default == pq.CalibrationConfig(gptq=True) == pq.CalibrationConfig.preset("gptq")
    assert default.act_order is True and default.lwc is False and default.smoothquant is None
    assert pq.PiecewiseQuantConfig(calibration="default").calibration == default


def test_explicit_aware_and_the_bare_config_are_unchanged():
    aware = pq.CalibrationConfig.preset("aware")
    assert CALIBRATION_PRESETS["aware"] == {}
    assert aware == pq.CalibrationConfig()
    assert {k: aware.to_dict()[k] for k in AWARE_FLAT} == AWARE_FLAT
    # a config.json that recorded the old default reads back as the same recipe
    saved = pq.PiecewiseQuantConfig(bits=4, calibration="aware").to_dict()
    assert pq.PiecewiseQuantConfig.from_dict(saved).calibration == aware


def test_calibrate_without_a_recipe_runs_the_default_preset():
    data = _ids()
    named_model = _tiny_llama()
    named = pq.calibrate(named_model, pq.PiecewiseQuantConfig(group_size=32, calibration=pq.CalibrationConfig.preset(
        "default", n_samples=8, seq_len=32)), data, progress=False)
    unnamed_model = _tiny_llama()
    config = pq.PiecewiseQuantConfig(group_size=32)
    assert config.calibration is None
    # the data fields are the defaults; only n_samples/seq_len matter for 2-D ids (each row a sample)
    unnamed = pq.calibrate(unnamed_model, config, data, progress=False)
    assert {r.method for r in unnamed.layers.values()} == {"gptq"} == {r.method for r in named.layers.values()}
    recorded = unnamed_model.piecewise_quant_config.calibration
    assert recorded == pq.CalibrationConfig.preset("default")
    a, b = _tensors(named_model), _tensors(unnamed_model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_explicit_aware_still_runs_only_the_activation_aware_fits():
    model = _tiny_llama()
    cal = pq.CalibrationConfig.preset("aware", n_samples=8, seq_len=32)
    report = pq.calibrate(model, pq.PiecewiseQuantConfig(group_size=32, calibration=cal), _ids(), progress=False)
    assert {r.method for r in report.layers.values()} == {"aware"}
    assert model.piecewise_quant_config.calibration == cal
    # and equals spelling every old default field out
    flat = pq.CalibrationConfig(**{**AWARE_FLAT, "n_samples": 8, "seq_len": 32})
    assert dataclasses.asdict(flat) == dataclasses.asdict(cal)
