"""MixDQ's metric-decoupled mixed precision (``mixdq_plan``): groups, sensitivities, budgets met per
group, a plan that ``enable_quant`` applies, the pipeline left float, and bad input."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import piecewise_quant as pq  # noqa: E402
from piecewise_quant.integrations.diffusers import DiffusionQuantLinear, diffusion_recipe, mixdq_plan  # noqa: E402

RUN = dict(calibration_prompts=[3, 4], num_inference_steps=3, progress=False)


def _cfg(**kw):
    kw = {"act_bits": 8, **kw}
    return pq.PiecewiseQuantConfig(bits=4, grid="piecewise", group_size=16, modules_to_not_convert=[], **kw)


def test_plan_meets_both_budgets_per_group_and_enable_quant_applies_it(dfh):
    pipe = dfh.dit_pipeline()
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    plan = mixdq_plan(pipe, _cfg(), weight_budget=5.0, act_budget=6.0, **RUN)
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())  # left float
    assert not any(isinstance(m, pq.QuantLinear) for m in pipe.transformer.modules())
    assert plan.groups["transformer_blocks.0.ff.net.2"] == "content"
    assert plan.groups["transformer_blocks.0.attn1.to_q"] == "quality"
    for group in ("content", "quality"):
        names = [n for n, g in plan.groups.items() if g == group]
        n_w = sum(plan.n_weights[n] for n in names)
        avg = sum(plan.weight_bits[n] * plan.n_weights[n] for n in names) / n_w
        assert avg <= 5.0 + 1e-9, (group, avg)
        acts = [n for n in names if n in plan.act_bits]
        a = sum(plan.act_bits[n] * plan.in_features[n] for n in acts) / sum(plan.in_features[n] for n in acts)
        assert a <= 6.0 + 1e-9
    assert set(plan.weight_bits.values()) == {4, 8}  # the budget buys some 8-bit layers, not all
    for name, sens in plan.weight_sensitivity.items():
        assert sens[8] < sens[4], name  # more bits, less error, on both metrics
    assert "weight code bits" in plan.table()
    pipe.enable_quant(plan.config, **RUN)
    for name, bits in plan.weight_bits.items():
        layer = pipe.transformer.get_submodule(name)
        assert isinstance(layer, DiffusionQuantLinear) and layer.spec.bits == bits
        assert layer.spec.act_bits == plan.act_bits[name]


def test_recipe_layers_keep_their_grid_and_float_activations(dfh):
    pipe = dfh.dit_pipeline()
    recipe = diffusion_recipe(bits=4, group_size=16, act_bits=8)
    plan = mixdq_plan(pipe, recipe, weight_budget=6.0, budget_unit="bits_per_weight", **RUN)
    cond = "transformer_blocks.0.norm1.linear"
    spec = plan.config.spec_for(cond)
    assert spec.grid == "uniform" and spec.group_size == "channel" and spec.act_bits is None
    assert plan.average_bits_per_weight <= 6.0 + 1e-9
    assert plan.act_bits == {}  # no act_budget: the config's activation bits stay


def test_text_pipeline_cross_attention_is_content(dfh):
    model = dfh.tiny_pixart()
    pipe = dfh.text_pipeline(model)
    plan = mixdq_plan(pipe, _cfg(), weight_budget=6.0, calibration_prompts=["a cat"], num_inference_steps=2,
                      progress=False)
    assert plan.groups["transformer_blocks.0.attn2.to_k"] == "content"
    assert plan.groups["transformer_blocks.0.attn1.to_k"] == "quality"


def test_bad_input(dfh):
    pipe = dfh.dit_pipeline()
    with pytest.raises(ValueError, match="weight_budget"):
        mixdq_plan(pipe, _cfg(), weight_budget=3.0, **RUN)  # below the smallest candidate
    with pytest.raises(ValueError, match="weight_candidates"):
        mixdq_plan(pipe, _cfg(), weight_budget=5.0, weight_candidates=[5], **RUN)
    with pytest.raises(ValueError, match="budget_unit"):
        mixdq_plan(pipe, _cfg(), weight_budget=5.0, budget_unit="bytes", **RUN)
    with pytest.raises(ValueError, match="quantizes no activations"):
        mixdq_plan(pipe, _cfg(act_bits=None), weight_budget=5.0, act_budget=6.0, **RUN)
    with pytest.raises(ValueError, match="rotation"):
        mixdq_plan(pipe, _cfg(rotation={"rotations": ["balance"]}), weight_budget=5.0, **RUN)
    pipe.enable_quant(_cfg(), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        mixdq_plan(pipe, _cfg(), weight_budget=5.0, **RUN)
