"""DiTFastAttn (``pipe.enable_fast_attention``) on tiny DiT / PixArt pipelines: the window kernel
against a masked dense reference, the greedy plan search, exact restore, save -> reload, the step
taken from the scheduler, CFG order detection, composition with ``enable_quant``, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

import piecewise_quant as pq  # noqa: E402
from piecewise_quant.integrations.diffusers import FastAttentionPlan, disable_fast_attention, enable_fast_attention  # noqa: E402
from piecewise_quant.integrations.diffusers.fast_attention import (  # noqa: E402
    FastAttnProcessor,
    clipped_relative_l1,
    detect_cfg,
)
from piecewise_quant.integrations.diffusers.window_attention import WindowSpec, window_attention, window_indices  # noqa: E402

STEPS = 5
# 16 tokens (8x8 latents, 2x2 patches): a 1-token window with 2-query blocks attends to 4 keys
SMALL_WINDOW = dict(window=1, window_block=2)
W8A8 = pq.PiecewiseQuantConfig(bits=8, grid="uniform", group_size="channel", act_bits=8, act_mode="static_per_tensor",
                               modules_to_not_convert=[])


def _masked_reference(q, k, v, spec, grid=None):
    n = q.shape[2]
    qi, ki = window_indices(n, spec, grid)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for b in range(qi.shape[0]):  # later blocks win for queries two blocks share, as in window_attention
        for t in qi[b].tolist():
            mask[t] = False
            mask[t, ki[b]] = True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize(
    "n,spec,grid",
    [(100, WindowSpec(8), None), (96, WindowSpec(10, block=7), None), (64, WindowSpec(2, "2d"), None),
     (48, WindowSpec(1, "2d", block=3), (6, 8))],
)
def test_window_attention_is_block_local_attention(n, spec, grid):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
    out = window_attention(q, k, v, spec, grid)
    torch.testing.assert_close(out, _masked_reference(q, k, v, spec, grid), atol=1e-5, rtol=1e-5)
    keys = window_indices(n, spec, grid)[1].shape[1]
    assert keys < n  # it really skips keys


def test_window_covering_everything_is_dense_attention():
    q, k, v = (torch.randn(1, 2, 32, 8) for _ in range(3))
    assert window_indices(32, WindowSpec(16)) is None
    torch.testing.assert_close(window_attention(q, k, v, WindowSpec(16)), F.scaled_dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="window shape"):
        WindowSpec(4, "3d")
    with pytest.raises(ValueError, match="not a square grid"):
        window_attention(*(torch.randn(1, 1, 30, 4) for _ in range(3)), WindowSpec(1, "2d"))


def test_clipped_relative_l1():
    a = torch.tensor([1.0, -1.0, 0.0, 2.0])
    assert clipped_relative_l1(a, a) == 0.0
    assert clipped_relative_l1(a, -a) == pytest.approx(0.75)  # 3 sign flips clipped at 1, one 0/0 -> 0


def test_search_threshold_zero_keeps_full_attention_and_is_exact(dfh):
    pipe = dfh.dit_pipeline()
    ref = dfh.dit_images(pipe, steps=STEPS)
    report = pipe.enable_fast_attention(threshold=0.0, calibration_prompts=[1, 2], num_inference_steps=STEPS, **SMALL_WINDOW)
    assert {m for row in report.plan.methods for m in row} == {"full"}
    assert report.attention_flops_saved == pytest.approx(0.0)
    assert torch.equal(dfh.dit_images(pipe, steps=STEPS), ref)


def test_search_compresses_within_budget_and_disable_restores_exactly(dfh):
    pipe = dfh.dit_pipeline()
    ref = dfh.dit_images(pipe, steps=STEPS)
    procs = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    report = pipe.enable_fast_attention(threshold=0.3, calibration_prompts=[1, 2], num_inference_steps=STEPS, **SMALL_WINDOW)
    methods = [m for row in report.plan.methods for m in row]
    assert report.plan.methods[0] == ["full", "full"]  # step 0 is always full
    assert any(m != "full" for m in methods)
    assert report.attention_flops_saved > 0.1
    assert "cond_first" in " ".join(report.cfg_detected)  # DiTPipeline puts the null class second
    text = str(report)
    assert "attention FLOPs saved" in text and "step |" in text and "took" in text
    out = dfh.dit_images(pipe, steps=STEPS)
    assert 0 < dfh.rel_err(out, ref) < 0.5
    state = pipe.transformer._piecewise_fast_attention.state
    assert state.step is None and all(c.output is None and c.residual is None for c in state.caches)  # freed
    assert 0 < state.last_call_flops.done < state.last_call_flops.dense
    pipe.disable_fast_attention()
    assert {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")} == procs
    assert "set_timesteps" not in pipe.scheduler.__dict__ and "step" not in pipe.scheduler.__dict__
    assert torch.equal(dfh.dit_images(pipe, steps=STEPS), ref)
    with pytest.raises(ValueError, match="not enabled"):
        pipe.disable_fast_attention()


def _manual_plan(layers, rows):
    return FastAttentionPlan(methods=rows, layers=layers, window=WindowSpec(1, block=2))


def test_every_method_runs_and_asc_uses_one_branch(dfh):
    pipe = dfh.dit_pipeline()
    ref = dfh.dit_images(pipe, steps=STEPS)
    layers = [n for n, _ in pipe.transformer.named_modules() if n.endswith("attn1")]
    rows = [["full", "full"], ["wars", "full+asc"], ["wars+asc", "ast"], ["ast", "wars"], ["full+asc", "wars+asc"]]
    report = pipe.enable_fast_attention(plan=_manual_plan(layers, rows))
    state = pipe.transformer._piecewise_fast_attention.state
    seen = {}
    pipe.transformer.transformer_blocks[1].attn1.register_forward_hook(lambda m, a, o: seen.setdefault(state.step, o.clone()))
    out = dfh.dit_images(pipe, steps=STEPS)
    assert torch.equal(seen[1][:2], seen[1][2:])  # full+asc: one branch computed, used for both halves
    assert not torch.equal(seen[0][:2], seen[0][2:])  # full: the two branches differ
    assert torch.equal(seen[2], seen[1])  # ast: the previous step's output
    assert torch.isfinite(out).all() and dfh.rel_err(out, ref) < 1.0
    assert state.last_call_flops.done < state.last_call_flops.dense
    assert report.method_counts["ast"] == 2
    pipe.disable_fast_attention()


def test_step_comes_from_the_scheduler_not_from_call_counts(dfh):
    """Two transformer calls per scheduler step (as Heun-type samplers make) stay on the same step."""
    pipe = dfh.dit_pipeline()
    layers = [n for n, _ in pipe.transformer.named_modules() if n.endswith("attn1")]
    pipe.enable_fast_attention(plan=_manual_plan(layers, [["full", "full"], ["ast", "ast"], ["ast", "full"]]))
    state = pipe.transformer._piecewise_fast_attention.state
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: seen.append(state.step))
    sched, model = pipe.scheduler, pipe.transformer
    sched.set_timesteps(3)
    x = torch.randn(2, 4, 8, 8)
    x = torch.cat([x[:1], x[:1]])
    for t in sched.timesteps:
        for _ in range(2):
            eps = model(x, timestep=t.expand(2), class_labels=torch.tensor([1, 1000])).sample
        x = torch.cat([sched.step(eps[:1, :4], t, x[:1]).prev_sample] * 2)
    assert seen == [0, 0, 1, 1, 2, 2]
    assert state.step is None and all(c.output is None for c in state.caches)
    # outside a pipeline call: plain full attention, whatever the plan says
    y = model(x, timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 1000])).sample
    pipe.disable_fast_attention()
    assert torch.equal(model(x, timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 1000])).sample, y)


def test_cfg_order_is_detected(dfh):
    dit = dfh.tiny_dit()
    x = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)
    assert detect_cfg(dit, (x,), {"class_labels": torch.tensor([3, 1000])}, "auto")[0] == "cond_first"
    assert detect_cfg(dit, (x,), {"class_labels": torch.tensor([1000, 3])}, "auto")[0] == "uncond_first"
    assert detect_cfg(dit, (torch.randn(2, 4, 8, 8),), {"class_labels": torch.tensor([3, 1000])}, "auto")[0] is None
    emb = torch.randn(2, 6, 32)
    zeros_second = torch.cat([emb[:1], torch.zeros(1, 6, 32)])
    assert detect_cfg(dit, (x,), {"encoder_hidden_states": zeros_second}, "auto")[0] == "cond_first"
    x4 = torch.randn(2, 4, 8, 8).repeat(2, 1, 1, 1)
    same_first = torch.cat([torch.ones(2, 6, 32), torch.randn(2, 6, 32)])
    assert detect_cfg(dit, (x4,), {"encoder_hidden_states": same_first}, "auto")[0] == "uncond_first"
    cfg, how = detect_cfg(dit, (x,), {"encoder_hidden_states": emb}, "auto")
    assert cfg == "uncond_first" and how.startswith("assumed")


def test_text_pipeline_pixart(dfh):
    pipe = dfh.text_pipeline(dfh.tiny_pixart())
    run = lambda: pipe(["a cat"], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))[0]  # noqa: E731
    ref = run()
    report = enable_fast_attention(pipe, threshold=0.3, calibration_prompts=["a cat", "a dog"], num_inference_steps=STEPS,
                                   **SMALL_WINDOW)
    assert any("uncond_first: zero embeddings in the first half" in k for k in report.cfg_detected)
    out = run()
    assert torch.isfinite(out).all() and dfh.rel_err(out, ref) < 0.5
    disable_fast_attention(pipe)
    assert torch.equal(run(), ref)


def test_save_reload_restores_plan_bit_identically(dfh, tmp_path):
    pipe = dfh.dit_pipeline()
    pipe.enable_fast_attention(threshold=0.3, calibration_prompts=[1], num_inference_steps=STEPS, **SMALL_WINDOW)
    out = dfh.dit_images(pipe, steps=STEPS)
    pipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "transformer" / "config.json").read_text())["_fast_attention_plan"]
    assert saved["num_inference_steps"] == STEPS and saved["num_layers"] == 2
    again = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert isinstance(again.transformer.transformer_blocks[0].attn1.processor, FastAttnProcessor)
    assert torch.equal(dfh.dit_images(again, steps=STEPS), out)
    with pytest.raises(ValueError, match=f"made for {STEPS} inference steps but this pipeline call runs 3"):
        dfh.dit_images(again, steps=3)
    again.disable_fast_attention()
    assert "_fast_attention_plan" not in again.transformer.config
    FastAttentionPlan.from_dict(saved).save(str(tmp_path / "plan.json"))
    fresh = dfh.dit_pipeline()
    fresh.enable_fast_attention(plan=str(tmp_path / "plan.json"))
    assert torch.equal(dfh.dit_images(fresh, steps=STEPS), out)


def test_bad_input_is_named(dfh):
    pipe = dfh.dit_pipeline()
    layers = [n for n, _ in pipe.transformer.named_modules() if n.endswith("attn1")]
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        pipe.enable_fast_attention(threshold=-0.1)
    with pytest.raises(ValueError, match="unknown fast-attention method 'sparse' at step 1, layer 0"):
        _manual_plan(layers, [["full", "full"], ["sparse", "full"]])
    with pytest.raises(ValueError, match="reuses the previous output .* at step 0"):
        _manual_plan(layers, [["ast", "full"]])
    with pytest.raises(ValueError, match="before any full step cached its residual"):
        _manual_plan(layers, [["wars", "full"]])
    with pytest.raises(ValueError, match="step 0 has 1 layer methods but the plan names 2 layers"):
        _manual_plan(layers, [["full"]])
    three = _manual_plan(layers + ["x.attn1"], [["full"] * 3])
    with pytest.raises(ValueError, match="plan is for 3 self-attention layers but 'transformer' .* has 2"):
        pipe.enable_fast_attention(plan=three)
    with pytest.raises(ValueError, match="unknown fast-attention method 'fast' in candidates"):
        pipe.enable_fast_attention(candidates=["fast"])
    with pytest.raises(ValueError, match="calibration_prompts is empty"):
        pipe.enable_fast_attention(calibration_prompts=[])
    assert not hasattr(pipe.transformer, "_piecewise_fast_attention")  # failed calls leave nothing behind
    pipe.enable_fast_attention(plan=_manual_plan(layers, [["full", "full"]]))
    with pytest.raises(ValueError, match="already enabled"):
        pipe.enable_fast_attention(plan=_manual_plan(layers, [["full", "full"]]))


def test_composes_with_enable_quant_in_either_order(dfh):
    ref = dfh.dit_images(dfh.dit_pipeline(), steps=STEPS)
    kw = dict(calibration_prompts=[1, 2], num_inference_steps=STEPS)
    # quantize, then search the plan on the quantized model
    pipe = dfh.dit_pipeline()
    pipe.enable_quant(W8A8, progress=False, **kw)
    quant_only = dfh.dit_images(pipe, steps=STEPS)
    pipe.enable_fast_attention(threshold=0.3, **kw, **SMALL_WINDOW)
    both = dfh.dit_images(pipe, steps=STEPS)
    pipe.disable_fast_attention()
    assert torch.equal(dfh.dit_images(pipe, steps=STEPS), quant_only)
    # fast attention first: activation scales are calibrated through the plan's steps
    pipe2 = dfh.dit_pipeline()
    pipe2.enable_fast_attention(threshold=0.3, **kw, **SMALL_WINDOW)
    fa_only = dfh.dit_images(pipe2, steps=STEPS)
    pipe2.enable_quant(W8A8, progress=False, **kw)
    both2 = dfh.dit_images(pipe2, steps=STEPS)
    for out in (both, both2):
        assert torch.isfinite(out).all() and dfh.rel_err(out, ref) < 0.5
    assert dfh.rel_err(both2, ref) <= dfh.rel_err(fa_only, ref) + dfh.rel_err(quant_only, ref) + 0.05
    pipe2.disable_quant()
    assert torch.equal(dfh.dit_images(pipe2, steps=STEPS), fa_only)
    pipe2.disable_fast_attention()
    assert torch.equal(dfh.dit_images(pipe2, steps=STEPS), ref)
