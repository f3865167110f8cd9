"""Per-layer activation clip search: each block layer with dynamic integer activations gets the
clip ratio whose output on its calibration rows is closest to its output on unquantized rows. The
choice is the true minimiser over the candidates, clipping is chosen where tails are heavy and not
where they are not, the ratios are saved as per-layer overrides that reload bit-exactly without
losing the overrides a layer already had, and misuse is refused with the fix."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pq_tiny_models import logits, tiny_llama

import piecewise_quant as pq
from piecewise_quant.calibration import GPTQ, ActClipSearch
from piecewise_quant.calibration.act_clip import ACT_CLIP_RATIOS, choose_ratio
from piecewise_quant.kernels import reference
from piecewise_quant.quantization import layer_spec_for

ASYM = "dynamic_per_token_asym"


def _layer(mode: str, clip: float = 0.9, k: int = 128, n: int = 32) -> pq.QuantLinear:
    spec = pq.QuantSpec(grid="uniform", bits=8, group_size=32, act_bits=4, act_mode=mode, act_clip_ratio=clip)
    lin = torch.nn.Linear(k, n, bias=False)
    torch.nn.init.normal_(lin.weight, generator=torch.Generator().manual_seed(0))
    return pq.QuantLinear.from_linear(lin, layer_spec_for("l", spec, k, n), pq.get_format("uniform"))


def _error_float64(layer: pq.QuantLinear, x: torch.Tensor, mode: str, clip: float) -> float:
    w = layer.dequantize(torch.float64)
    xq = reference.quantize_activation(x, "int4", mode, None, clip).double()
    return float((xq @ w.T - x.double() @ w.T).pow(2).sum())


@pytest.mark.parametrize("mode", ["dynamic_per_token", ASYM])
def test_the_chosen_ratio_minimises_the_output_error_over_the_candidates(mode):
    layer = _layer(mode)
    g = torch.Generator().manual_seed(1)
    heavy = torch.randn(256, 128, generator=g) / torch.rand(256, 128, generator=g).clamp_min(0.05).sqrt()
    r = choose_ratio(layer, heavy)
    errors = {c: _error_float64(layer, heavy, mode, c) for c in (0.9, *ACT_CLIP_RATIOS)}
    assert errors[r] <= min(errors.values()) * (1 + 1e-4)
    assert r < 1.0  # heavy tails: clipping pays
    assert layer.act_quantizer.args.clip_ratio == 0.9  # the probe leaves the layer as it was
    # rows whose values sit at their ends lose more to clipping than they gain from a finer step
    ends = torch.randn(256, 128, generator=g).sign() * (1 - 0.05 * torch.rand(256, 128, generator=g))
    assert choose_ratio(layer, ends) == 1.0


def _calibrate(config: pq.PiecewiseQuantConfig, model=None):
    ids = torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_llama() if model is None else model
    pq.calibrate(model, config, ids, progress=False)
    return model


def _w4a4(mode: str = ASYM, **changes) -> pq.PiecewiseQuantConfig:
    cal = pq.CalibrationConfig.preset("gptq", n_samples=16, seq_len=32, batch_size=4, act_clip_search=True)
    return pq.PiecewiseQuantConfig(bits=4, group_size=32, act_bits=4, act_mode=mode, act_clip_ratio=0.9,
                                   rotation={"rotations": ["balance"]}, calibration=cal, **changes)


def test_chosen_ratios_are_saved_as_overrides_and_reload_bit_exactly(tmp_path):
    model = _calibrate(_w4a4(overrides={"*.mlp.down_proj": {"bits": 8, "grid": "uniform"}}))
    config = model.piecewise_quant_config
    chosen = {name: changes for name, changes in config.overrides.items() if "act_clip_ratio" in changes}
    assert chosen, "the search kept 0.9 everywhere on a random model: the test shows nothing"
    for name, changes in chosen.items():
        layer = model.get_submodule(name)
        assert layer.act_quantizer.args.clip_ratio == changes["act_clip_ratio"] == layer.spec.act_clip_ratio
        assert changes["act_clip_ratio"] in ACT_CLIP_RATIOS
        assert changes["act_mode"] == ASYM if "act_mode" in changes else config.act_mode == ASYM
    for i in range(2):  # the user's override still holds for every down_proj, searched or not
        down = model.model.layers[i].mlp.down_proj
        assert (down.spec.bits, down.spec.grid) == (8, "uniform")
    before = logits(model)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name in chosen:
        assert again.get_submodule(name).act_quantizer.args.clip_ratio == chosen[name]["act_clip_ratio"]
    assert torch.equal(logits(again), before)


def test_the_chosen_ratios_hold_on_rows_the_search_never_saw():
    """Per searched layer, on input rows of tokens the calibration never saw, the output error with the
    chosen ratio is no larger (within 5%) than with the configured one."""
    searched = _calibrate(_w4a4("dynamic_per_token"))
    config = searched.piecewise_quant_config
    chosen = {n: c["act_clip_ratio"] for n, c in config.overrides.items() if "act_clip_ratio" in c}
    assert chosen
    rows: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_m, args):
            rows[name] = args[0].reshape(-1, args[0].shape[-1]).detach()
        return hook

    hooks = [searched.get_submodule(n).register_forward_pre_hook(keep(n)) for n in chosen]
    with torch.no_grad():
        searched(input_ids=torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(5)))
    for h in hooks:
        h.remove()
    for name, ratio in chosen.items():
        layer = searched.get_submodule(name)
        x = layer._rot_in(rows[name]) if layer._rot_in is not None else rows[name]
        assert _error_float64(layer, x, "dynamic_per_token", ratio) < 1.05 * _error_float64(
            layer, x, "dynamic_per_token", 0.9)


def test_a_bfloat16_model_is_searched_in_its_own_dtype():
    model = _calibrate(_w4a4(), tiny_llama().to(torch.bfloat16))
    chosen = {n: c["act_clip_ratio"] for n, c in model.piecewise_quant_config.overrides.items() if "act_clip_ratio" in c}
    assert chosen
    out = logits(model)
    assert out.isfinite().all()


def test_the_flat_keyword_and_the_modifier_build_one_stored_config():
    flat = pq.CalibrationConfig(gptq=True, act_clip_search=True)
    listed = pq.CalibrationConfig(modifiers=[GPTQ(), ActClipSearch()])
    assert flat == listed and flat.to_dict() == listed.to_dict()
    assert any(isinstance(m, ActClipSearch) for m in flat.recipe)
    assert "act_clip_search" not in pq.CalibrationConfig(gptq=True).to_dict()  # old configs keep their bytes
    assert pq.CalibrationConfig.coerce(flat.to_dict()) == flat


@pytest.mark.parametrize("make, match", [
    (lambda: pq.CalibrationConfig(act_clip_search="yes"), "act_clip_search must be True or False"),
])
def test_bad_settings_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_config_without_dynamic_integer_activations_is_refused_and_the_model_kept():
    model = tiny_llama()
    before = logits(model)
    cal = pq.CalibrationConfig(n_samples=4, seq_len=16, act_clip_search=True)
    for config in (pq.PiecewiseQuantConfig(bits=4, group_size=32, calibration=cal),
                   pq.PiecewiseQuantConfig(bits=8, group_size=32, act_bits=8, act_mode="static_per_tensor",
                                           calibration=cal)):
        with pytest.raises(ValueError, match="no calibrated layer has them"):
            _calibrate(config, model)
        assert torch.equal(logits(model), before)


def test_dataclass_replace_keeps_the_flag():
    cal = dataclasses.replace(pq.CalibrationConfig.preset("gptq"), act_clip_search=True)
    assert cal.act_clip_search and cal.to_dict()["act_clip_search"] is True
