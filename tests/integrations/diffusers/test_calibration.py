"""Diffusion-aware calibration: statistics over timesteps and both guidance branches, shared vs
per-timestep static scales, clipping, dynamic group-wise activations, calibration recipes run
through the pipeline, and SD3/Flux/PixArt denoisers calibrated through a text pipeline."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import piecewise_quant as pq  # noqa: E402
from piecewise_quant.integrations.diffusers import DiffusionQuantLinear, diffusion_recipe  # noqa: E402

LAYER = "transformer_blocks.1.attn1.to_q"
LABELS = [3, 4, 5]
STEPS = 4


def only(layer: str, **kwargs) -> pq.PiecewiseQuantConfig:
    """8-bit weights and int8 static activations on ``layer`` only: every layer before it stays in
    float, so its calibration inputs at the first step are exactly those of the float pipeline (later
    steps differ by the 8-bit weight error of this one layer on the latents: ~1e-4 relative)."""
    spec = dict(bits=8, grid="uniform", group_size="channel", act_bits=8, act_mode="static_per_tensor")
    spec.update(kwargs)
    # first match wins: the layer keeps the default scheme, every other layer is float (grid "none");
    # a negative-lookahead regex would say the same, but patterns are matched in linear time (no lookaround)
    return pq.PiecewiseQuantConfig(modules_to_not_convert=[], overrides=[[layer, {}], ["*", {"grid": "none"}]], **spec)


@torch.no_grad()
def float_inputs(pipe, layer: str) -> list[tuple[float, torch.Tensor]]:
    """(timestep, input of ``layer``) for every denoiser call of the calibration runs, recorded on
    the float pipeline with the same seeds and batches ``enable_quant`` uses."""
    seen: list[tuple[float, torch.Tensor]] = []
    current = {}
    h1 = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: current.__setitem__("t", float(k["timestep"].reshape(-1)[0])), with_kwargs=True
    )
    h2 = pipe.transformer.get_submodule(layer).register_forward_pre_hook(lambda m, a: seen.append((current["t"], a[0].clone())))
    try:
        pipe(class_labels=LABELS, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(0), output_type="pt")
    finally:
        h1.remove()
        h2.remove()
    return seen


def test_shared_and_per_timestep_scales_cover_every_timestep_and_both_branches(dfh):
    pipe = dfh.dit_pipeline()
    seen = float_inputs(pipe, LAYER)
    timesteps = [t for t, _ in seen]
    assert timesteps == [750.0, 500.0, 250.0, 0.0]  # one call per step, CFG batched
    report = pipe.enable_quant(only(LAYER), calibration_prompts=LABELS, num_inference_steps=STEPS,
                               act_scales="per_timestep", progress=False)
    m = pipe.transformer.get_submodule(LAYER)
    allmax = max(float(x.abs().max()) for _, x in seen)
    assert float(m.act_scale) == pytest.approx(allmax / 127, rel=1e-3)
    per_t = [float(x.abs().max()) / 127 for _, x in seen]
    assert float(m.act_scales_t[0]) == pytest.approx(per_t[0], rel=1e-6)
    assert m.act_scales_t.tolist() == pytest.approx(per_t, rel=1e-3)
    assert max(per_t) / min(per_t) > 1.05  # the range really moves with the timestep here
    stats = report.components["transformer"].activations[LAYER]
    n = len(LABELS)  # DiTPipeline batches [cond, uncond]
    cond = max(float(x[:n].abs().max()) for _, x in seen)
    uncond = max(float(x[n:].abs().max()) for _, x in seen)
    assert stats.absmax_per_branch == pytest.approx({"cond": cond, "uncond": uncond}, rel=1e-3)
    assert cond != pytest.approx(uncond, rel=1e-2)  # the branches really differ
    assert report.components["transformer"].timesteps == (750.0, 500.0, 250.0, 0.0)
    assert "cond/uncond input range ratio" in report.summary()
    # at inference the nearest calibrated timestep's scale is used
    used = []
    h = m.register_forward_pre_hook(lambda mod, a: used.append(mod.timestep_state.index))
    x = dfh.denoiser_inputs(pipe.transformer, timestep=260)
    dfh.denoise(pipe.transformer, x)
    dfh.denoise(pipe.transformer, dfh.denoiser_inputs(pipe.transformer, timestep=990))
    h.remove()
    assert used == [2, 0]
    with pytest.raises(RuntimeError, match="no current timestep"):
        m(torch.randn(2, 16, 32))


def test_shared_scale_clipping(dfh):
    pipe = dfh.dit_pipeline()
    seen = float_inputs(pipe, LAYER)
    mags = torch.cat([x.abs().reshape(-1) for _, x in seen])
    pipe.enable_quant(only(LAYER, act_clip_ratio=0.5), calibration_prompts=LABELS, num_inference_steps=STEPS, progress=False)
    m = pipe.transformer.get_submodule(LAYER)
    assert float(m.act_scale) == pytest.approx(0.5 * float(mags.max()) / 127, rel=1e-3)
    assert m.act_scales_t is None
    pipe.disable_quant()
    pipe.enable_quant(only(LAYER, act_topk=5), calibration_prompts=LABELS, num_inference_steps=STEPS, progress=False)
    m = pipe.transformer.get_submodule(LAYER)
    assert float(m.act_scale) == pytest.approx(float(mags.topk(6).values[-1]) / 127, rel=1e-3)
    assert float(mags.topk(6).values[-1]) < 0.99 * float(mags.max())  # top-k really clipped something


def test_per_timestep_scales_beat_shared_ones_on_a_moving_range(dfh):
    """The error of the denoiser output at the last (t=0) step, where the range is smallest."""
    errs = {}
    for mode in ("shared", "per_timestep"):
        pipe = dfh.dit_pipeline()
        x = dfh.denoiser_inputs(pipe.transformer, timestep=0)
        x["class_labels"] = torch.tensor([3, 4])
        ref = dfh.denoise(pipe.transformer, x)
        cfg = pq.PiecewiseQuantConfig(bits=8, grid="uniform", group_size="channel", act_bits=4,
                                      act_mode="static_per_tensor", modules_to_not_convert=[])
        pipe.enable_quant(cfg, calibration_prompts=LABELS, num_inference_steps=STEPS, act_scales=mode, progress=False)
        errs[mode] = dfh.rel_err(dfh.denoise(pipe.transformer, x), ref)
    assert errs["per_timestep"] < errs["shared"], errs


def test_dynamic_group_wise_activations(dfh):
    from piecewise_quant.kernels import reference

    pipe = dfh.dit_pipeline()
    x = dfh.denoiser_inputs(pipe.transformer)
    ref = dfh.denoise(pipe.transformer, x)
    cfg = pq.PiecewiseQuantConfig(bits=8, grid="uniform", group_size="channel", act_bits=4, modules_to_not_convert=[])
    pipe.enable_quant(cfg, act_group_size=8, progress=False)
    m = pipe.transformer.get_submodule("transformer_blocks.0.ff.net.2")
    assert m.act_group_size == 8 and m.act_scale is None
    # the layer equals: int4 per (token, 8 channels) quantize-dequantize, then the dequantized matmul
    inp = torch.randn(2, 16, m.in_features)
    inp[..., 3] *= 40  # one outlier channel: per-token scales would flatten every other channel
    groups = inp.reshape(2, 16, -1, 8)
    qmax = 7.0
    s = groups.abs().amax(-1, keepdim=True) / qmax
    xq = (torch.clamp(torch.round(groups / s), -qmax, qmax) * s).reshape(inp.shape)
    expected = torch.nn.functional.linear(xq, m.dequantize(torch.float32), m.bias)
    with torch.no_grad():
        assert torch.allclose(m(inp), expected, atol=1e-5, rtol=1e-5)
        per_token = torch.nn.functional.linear(
            reference.quantize_activation(inp, "int4", "dynamic_per_token"), m.dequantize(torch.float32), m.bias
        )
        exact = torch.nn.functional.linear(inp, m.dequantize(torch.float32), m.bias)
    assert dfh.rel_err(m(inp).detach(), exact) < 0.5 * dfh.rel_err(per_token, exact)
    # whole model, int4 activations: groups of 8 channels beat one scale per token
    grouped = dfh.rel_err(dfh.denoise(pipe.transformer, x), ref)
    pipe.disable_quant()
    pipe.enable_quant(cfg, progress=False)
    assert grouped < 0.15 and grouped < dfh.rel_err(dfh.denoise(pipe.transformer, x), ref)


def test_calibration_recipe_runs_through_the_pipeline(dfh):
    pipe = dfh.dit_pipeline()
    x = dfh.denoiser_inputs(pipe.transformer, timestep=500)
    ref = dfh.denoise(pipe.transformer, x)
    sd = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    cfg = diffusion_recipe(bits=4, group_size=16, act_bits=8, act_mode="static_per_tensor", calibration="gptq")
    report = pipe.enable_quant(cfg, calibration_prompts=LABELS, num_inference_steps=STEPS, progress=False)
    comp = report.components["transformer"]
    assert comp.engine is not None and [b.index for b in comp.engine.blocks] == [0, 1]
    assert {r.method for r in comp.engine.layers.values()} >= {"gptq"}
    assert all(isinstance(m, DiffusionQuantLinear) for m in pipe.transformer.modules() if isinstance(m, pq.QuantLinear))
    q = pipe.transformer.transformer_blocks[0].attn1.to_q
    assert q.spec.act_mode == "static_per_tensor" and float(q.act_scale) > 0
    assert pipe.transformer.config.quantization_config.core.calibration.gptq
    assert dfh.rel_err(dfh.denoise(pipe.transformer, x), ref) < 0.10
    pipe.disable_quant()  # GPTQ changed the float weights in place while working; all restored
    assert all(torch.equal(v, sd[k]) for k, v in pipe.transformer.state_dict().items())


def test_scale_tuning_runs_through_the_pipeline_and_disable_restores_the_float_weights(dfh):
    pipe = dfh.dit_pipeline()
    x = dfh.denoiser_inputs(pipe.transformer, timestep=500)
    ref = dfh.denoise(pipe.transformer, x)
    sd = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    cal = pq.CalibrationConfig.preset("gptq", tune_scales=True, tune_epochs=2)
    cfg = diffusion_recipe(bits=4, group_size=16, act_bits=8, act_mode="dynamic_per_token", calibration=cal)
    report = pipe.enable_quant(cfg, calibration_prompts=LABELS, num_inference_steps=STEPS, progress=False)
    methods = {r.method for r in report.components["transformer"].engine.layers.values()}
    assert "gptq+tune" in methods, methods
    assert pipe.transformer.config.quantization_config.core.calibration.tune_scales
    assert dfh.rel_err(dfh.denoise(pipe.transformer, x), ref) < 0.10
    pipe.disable_quant()  # tuning wrote the tuned weights into the float layers; all restored
    assert all(torch.equal(v, sd[k]) for k, v in pipe.transformer.state_dict().items())


def test_activation_clip_search_runs_through_the_pipeline_and_reloads(dfh, tmp_path):
    pipe = dfh.dit_pipeline()
    x = dfh.denoiser_inputs(pipe.transformer, timestep=500)
    cal = pq.CalibrationConfig.preset("gptq", act_clip_search=True)
    cfg = pq.PiecewiseQuantConfig(bits=4, group_size=16, act_bits=4, act_mode="dynamic_per_token_asym",
                                  modules_to_not_convert=[], calibration=cal)
    pipe.enable_quant(cfg, calibration_prompts=LABELS, num_inference_steps=STEPS, progress=False)
    core = pipe.transformer.config.quantization_config.core
    chosen = {n: c["act_clip_ratio"] for n, c in core.overrides.items() if "act_clip_ratio" in c}
    assert chosen
    for name, ratio in chosen.items():
        layer = pipe.transformer.get_submodule(name)
        assert isinstance(layer, DiffusionQuantLinear) and layer.act_quantizer.args.clip_ratio == ratio
        assert layer.act_quantizer.args.kernel_mode == "dynamic_per_token_asym"
    out = dfh.denoise(pipe.transformer, x)
    pipe.transformer.save_pretrained(tmp_path)
    reloaded = type(pipe.transformer).from_pretrained(tmp_path)
    assert torch.equal(dfh.denoise(reloaded, x), out)


@pytest.mark.parametrize("scope", ["block", "model"])
def test_mixed_precision_runs_through_the_pipeline_and_disable_restores(dfh, scope):
    pipe = dfh.dit_pipeline()
    x = dfh.denoiser_inputs(pipe.transformer, timestep=500)
    ref = dfh.denoise(pipe.transformer, x)
    sd = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    cal = pq.CalibrationConfig.preset("gptq", mixed_precision_budget=7.0, mixed_precision_bits=(4, 8),
                                      mixed_precision_scope=scope)
    cfg = pq.PiecewiseQuantConfig(bits=4, group_size=16, modules_to_not_convert=[], calibration=cal)
    report = pipe.enable_quant(cfg, calibration_prompts=LABELS, num_inference_steps=STEPS, progress=False)
    mp = report.components["transformer"].engine.mixed_precision
    assert mp["average_bits_per_weight"] <= 7.0 and set(mp["plan"].values()) >= {"uniform8"}
    assert pipe.transformer.config.quantization_config.core.calibration.mixed_precision_scope == scope
    assert dfh.rel_err(dfh.denoise(pipe.transformer, x), ref) < 0.10
    pipe.disable_quant()
    assert all(torch.equal(v, sd[k]) for k, v in pipe.transformer.state_dict().items())


def test_rotation_trials_are_refused_by_enable_quant_before_anything_changes(dfh):
    pipe = dfh.dit_pipeline()
    cal = pq.CalibrationConfig.preset("gptq", rotation_trials=2)
    cfg = pq.PiecewiseQuantConfig(bits=4, group_size=16, act_bits=4, rotation="viditq", modules_to_not_convert=[],
                                  calibration=cal)
    with pytest.raises(ValueError, match="rotation_trials=2: rotation trials are run by piecewise_quant.calibrate"):
        pipe.enable_quant(cfg, calibration_prompts=LABELS, num_inference_steps=STEPS, progress=False)
    assert not any(isinstance(m, pq.QuantLinear) for m in pipe.transformer.modules())


def test_calibration_recipe_bad_blocks(dfh):
    pipe = dfh.dit_pipeline()
    cfg = pq.PiecewiseQuantConfig(bits=8, group_size="channel", calibration=pq.CalibrationConfig(blocks="no.such.blocks"))
    with pytest.raises(ValueError, match="component 'transformer'.*no submodule"):
        pipe.enable_quant(cfg, calibration_prompts=[1], num_inference_steps=2, progress=False)
    assert not any(isinstance(m, pq.QuantLinear) for m in pipe.transformer.modules())
    # dual-stream blocks (SD3) return (encoder_hidden_states, hidden_states): refused with the reason
    sd3 = dfh.text_pipeline(dfh.tiny_sd3())
    with pytest.raises(ValueError, match="dual-stream"):
        sd3.enable_quant(pq.PiecewiseQuantConfig(bits=8, group_size="channel", calibration="gptq"),
                         calibration_prompts=["a cat"], num_inference_steps=2, progress=False)


@pytest.mark.parametrize("model_name", ["tiny_pixart", "tiny_sd3", "tiny_flux"])
def test_text_pipeline_per_timestep_calibration_and_reload(dfh, tmp_path, model_name):
    transformer = getattr(dfh, model_name)()
    pipe = dfh.text_pipeline(transformer)
    x = dfh.denoiser_inputs(transformer, timestep=500)
    ref = dfh.denoise(transformer, x)
    cfg = diffusion_recipe(bits=8, grid="uniform", group_size="channel", act_bits=8, act_mode="static_per_tensor")
    report = pipe.enable_quant(cfg, calibration_prompts=["a red fox", "a blue bird"], num_inference_steps=4,
                               act_scales="per_timestep", progress=False)
    comp = report.components["transformer"]
    assert len(comp.timesteps) == 4
    stats = next(iter(comp.activations.values()))
    assert set(stats.absmax_per_branch) == {"uncond", "cond"}
    # recipe: conditioning layers keep float activations, attention/MLP have per-timestep scales
    static = [m for m in transformer.modules() if isinstance(m, DiffusionQuantLinear) and m.act_scales_t is not None]
    assert static and all(m.act_scales_t.numel() == 4 and bool((m.act_scales_t > 0).all()) for m in static)
    assert dfh.rel_err(dfh.denoise(transformer, x), ref) < 0.10
    out = dfh.denoise(transformer, x)
    transformer.save_pretrained(tmp_path)
    reloaded = type(transformer).from_pretrained(tmp_path)
    assert torch.equal(dfh.denoise(reloaded, x), out)
    assert reloaded.config.quantization_config.diffusion.timesteps == comp.timesteps
