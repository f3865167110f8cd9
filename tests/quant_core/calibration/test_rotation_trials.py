"""Rotation trials: ``CalibrationConfig(rotation_trials=K)`` calibrates copies with rotation seeds
``seed .. seed+K-1``, keeps the seed whose quantized model is closest to the float model on samples
of the data that calibration does not use (the calibration batches, with a warning, when there are
none), and calibrates the model itself with it. The kept seed is the true argmin of
the distances, the model equals a plain calibration with that seed bit for bit, the config and
checkpoint record that seed, the distance is the KL (or relative error) computed in float64, and
misuse is refused with the fix."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
from pq_tiny_models import logits, tiny_llama

import piecewise_quant as pq
from piecewise_quant.calibration.trials import distance_to_float

ASYM = "dynamic_per_token_asym"
ROWS = torch.randint(0, 96, (20, 32), generator=torch.Generator().manual_seed(0))
IDS, ASIDE = ROWS[:12], ROWS[12:]  # n_samples=12: calibration takes the first 12 rows of ROWS


def _config(trials: int, seed: int = 0, rotation: str = "quarot") -> pq.PiecewiseQuantConfig:
    cal = pq.CalibrationConfig.preset("gptq", n_samples=12, seq_len=32, batch_size=4, rotation_trials=trials)
    cfg = pq.PiecewiseQuantConfig(bits=4, group_size=32, act_bits=4, act_mode=ASYM, act_clip_ratio=0.9,
                                  rotation=rotation, calibration=cal)
    return dataclasses.replace(cfg, rotation=dataclasses.replace(cfg.rotation, seed=seed))


def _batches() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": b} for b in IDS.split(4)]


def test_the_kept_seed_is_the_closest_trial_and_the_model_is_that_calibration_bit_for_bit(tmp_path):
    model = tiny_llama()
    float_model = copy.deepcopy(model)
    report = pq.calibrate(model, _config(3, seed=5), ROWS, progress=False)
    seeds = [s for s, _ in report.rotation_trials]
    assert seeds == [5, 6, 7]
    distances = dict(report.rotation_trials)
    best = min(distances, key=distances.get)
    assert len(set(distances.values())) == 3  # the seeds do differ
    cfg = model.piecewise_quant_config
    assert cfg.rotation.seed == best and cfg.calibration.rotation_trials == 1
    assert f"kept seed {best}" in report.summary()
    # each trial's distance is that seed's calibration (on the first 12 rows) scored on the 8 rows after them
    aside = [{"input_ids": b} for b in ASIDE.split(4)]
    for seed in seeds:
        alone = copy.deepcopy(float_model)
        pq.calibrate(alone, _config(1, seed=seed), IDS, progress=False)
        assert distance_to_float(alone, float_model, aside) == pytest.approx(distances[seed], rel=1e-9)
        assert distance_to_float(alone, float_model, _batches()) != pytest.approx(distances[seed], rel=1e-6)
        if seed == best:
            assert torch.equal(logits(alone), logits(model))
    # the checkpoint names the kept seed and reloads exactly
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.piecewise_quant_config.rotation.seed == best
    assert torch.equal(logits(again), logits(model))
    assert "rotation_trials" not in again.piecewise_quant_config.calibration.to_dict()


def test_data_with_nothing_to_hold_aside_is_scored_on_the_calibration_batches_with_a_warning(caplog):
    model = tiny_llama()
    float_model = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING):
        report = pq.calibrate(model, _config(2), _batches(), progress=False)
    assert "scored on the calibration batches themselves" in caplog.text
    alone = copy.deepcopy(float_model)
    pq.calibrate(alone, _config(1, seed=0), _batches(), progress=False)
    assert distance_to_float(alone, float_model, _batches()) == pytest.approx(dict(report.rotation_trials)[0], rel=1e-9)


def test_distance_is_the_float64_kl_over_real_tokens():
    model = tiny_llama()
    other = tiny_llama(seed=1)
    assert distance_to_float(model, copy.deepcopy(model), _batches()) == 0.0
    mask = torch.ones(12, 32, dtype=torch.long)
    mask[:, 24:] = 0  # the last 8 positions are padding
    batches = [{"input_ids": b, "attention_mask": m} for b, m in zip(IDS.split(4), mask.split(4))]
    with torch.no_grad():
        lq = torch.log_softmax(other(input_ids=IDS, attention_mask=mask).logits.double(), -1)[:, :24]
        lf = torch.log_softmax(model(input_ids=IDS, attention_mask=mask).logits.double(), -1)[:, :24]
    expect = float((lf.exp() * (lf - lq)).sum(-1).mean())
    assert distance_to_float(other, model, batches) == pytest.approx(expect, rel=1e-4)
    changed = [{"input_ids": torch.where(m.bool(), b, torch.zeros_like(b)), "attention_mask": m} for b, m in
               zip(IDS.split(4), mask.split(4))]  # other tokens at the padded positions: nothing changes
    assert distance_to_float(other, model, changed) == pytest.approx(expect, rel=1e-4)


def test_models_without_logits_are_compared_by_relative_output_error():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    a = BertModel(cfg).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.encoder.layer[0].output.dense.weight.mul_(1.1)
        ya, yb = a(input_ids=IDS).last_hidden_state.double(), b(input_ids=IDS).last_hidden_state.double()
    expect = float((yb - ya).pow(2).sum() / ya.pow(2).sum())
    assert expect > 0
    assert distance_to_float(b, a, _batches()) == pytest.approx(expect, rel=1e-4)


@pytest.mark.parametrize("trials", [0, -1, True, 2.0, "3"])
def test_bad_trial_counts_are_refused(trials):
    with pytest.raises(ValueError, match="rotation_trials must be a positive integer"):
        pq.CalibrationConfig(rotation_trials=trials)


def test_trials_without_a_rotation_are_refused_and_leave_the_model_as_it_was():
    model = tiny_llama()
    before = logits(model)
    cfg = dataclasses.replace(_config(2), rotation=None)
    with pytest.raises(ValueError, match="has no rotation"):
        pq.calibrate(model, cfg, IDS, progress=False)
    assert torch.equal(logits(model), before)
    assert not any(isinstance(m, pq.QuantLinear) for m in model.modules())


def test_models_dispatched_by_accelerate_are_refused_before_any_copy():
    model = tiny_llama()
    model.model.layers[1]._hf_hook = object()  # what accelerate's dispatch leaves on a module
    with pytest.raises(ValueError, match="dispatched by accelerate.*'model.layers.1'"):
        pq.calibrate(model, _config(2), IDS, progress=False)
    assert not any(isinstance(m, pq.QuantLinear) for m in model.modules())


def test_a_failing_trial_leaves_the_model_as_it_was(monkeypatch):
    from piecewise_quant.calibration import trials

    calls = []

    def fail_second(model, float_model, batches):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("trial 2 failed")
        return 1.0

    monkeypatch.setattr(trials, "distance_to_float", fail_second)
    model = tiny_llama()
    before = logits(model)
    with pytest.raises(RuntimeError, match="trial 2 failed"):
        pq.calibrate(model, _config(3), IDS, progress=False)
    assert torch.equal(logits(model), before)
    assert not any(isinstance(m, pq.QuantLinear) for m in model.modules())
    assert getattr(model, "piecewise_quant_config", None) is None


def test_to_dict_writes_the_field_only_when_set():
    assert "rotation_trials" not in pq.CalibrationConfig().to_dict()
    d = pq.CalibrationConfig(rotation_trials=4).to_dict()
    assert d["rotation_trials"] == 4
    assert pq.CalibrationConfig(**d) == pq.CalibrationConfig(rotation_trials=4)


def test_from_pretrained_runs_the_trials_and_saves_the_kept_seed(tiny_llama_path, tmp_path):
    from transformers import AutoModelForCausalLM

    cal = pq.CalibrationConfig(n_samples=2, seq_len=32, rotation_trials=2)
    config = pq.PiecewiseQuantConfig(bits=4, group_size=128, act_bits=4, rotation="quarot", calibration=cal)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=config)
    report = model.piecewise_quant_calibration_report
    assert [s for s, _ in report.rotation_trials] == [0, 1]
    kept = min(report.rotation_trials, key=lambda t: (t[1], t[0]))[0]
    assert model.config.quantization_config.core.rotation.seed == kept
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.piecewise_quant_config.rotation.seed == kept
    x = torch.randint(0, 2000, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
