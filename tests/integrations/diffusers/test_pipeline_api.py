"""``pipe.enable_quant`` / ``pipe.disable_quant`` on a tiny DiTPipeline: accuracy against the float
pipeline, exact restore, save -> plain reload with identical images, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import piecewise_quant as pq  # noqa: E402
from piecewise_quant.integrations.diffusers import (  # noqa: E402
    DiffusionQuantLinear,
    disable_quant,
    enable_quant,
)

W8 = pq.PiecewiseQuantConfig(bits=8, grid="uniform", group_size="channel", modules_to_not_convert=[])
W8A8_STATIC = pq.PiecewiseQuantConfig(
    bits=8, grid="uniform", group_size="channel", act_bits=8, act_mode="static_per_tensor", modules_to_not_convert=[]
)


def test_method_is_attached_and_quantizes_only_the_denoiser(dfh):
    pipe = dfh.dit_pipeline()
    assert callable(getattr(pipe, "enable_quant", None)) and callable(getattr(pipe, "disable_quant", None))
    vae_before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    x = dfh.denoiser_inputs(pipe.transformer)
    ref = dfh.denoise(pipe.transformer, x)
    report = pipe.enable_quant(W8, progress=False)
    layers = [m for m in pipe.transformer.modules() if isinstance(m, DiffusionQuantLinear)]
    assert len(layers) == 20 and report.components["transformer"].n_layers == 20
    assert not any(isinstance(m, pq.QuantLinear) for m in pipe.vae.modules())
    assert all(torch.equal(v, vae_before[k]) for k, v in pipe.vae.state_dict().items())
    # 8-bit per-channel weights: the denoiser output moves by well under 1%
    assert dfh.rel_err(dfh.denoise(pipe.transformer, x), ref) < 0.01
    c = report.components["transformer"]
    assert 8.0 < c.bits_per_weight < 9.0  # codes + fp16 scale and zero point per 32-wide row
    assert c.quantized_weight_bytes < c.float_weight_bytes / 3
    assert report.n_pipeline_calls == 0  # weight-only: no calibration run


def test_disable_restores_float_exactly(dfh):
    pipe = dfh.dit_pipeline()
    ref = dfh.dit_images(pipe)
    sd = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    cfg_before = dict(pipe.transformer.config)
    pipe.enable_quant(W8A8_STATIC, calibration_prompts=[3, 4], num_inference_steps=4, act_scales="per_timestep", progress=False)
    assert not torch.equal(dfh.dit_images(pipe), ref)
    pipe.disable_quant()
    assert torch.equal(dfh.dit_images(pipe), ref)
    assert set(pipe.transformer.state_dict()) == set(sd)
    assert all(torch.equal(v, sd[k]) for k, v in pipe.transformer.state_dict().items())
    assert dict(pipe.transformer.config) == cfg_before and "quantization_config" not in pipe.transformer.config
    assert getattr(pipe.transformer, "_diffusers_hook", None) is None or pipe.transformer._diffusers_hook.get_hook(
        "piecewise_quant_timestep"
    ) is None
    # and it can be quantized again
    pipe.enable_quant(W8, progress=False)


def test_disable_without_float_weights_says_it_cannot(dfh):
    pipe = dfh.dit_pipeline()
    enable_quant(pipe, W8, keep_float_weights=False, progress=False)
    with pytest.raises(ValueError, match="keep_float_weights=False"):
        disable_quant(pipe)
    assert any(isinstance(m, DiffusionQuantLinear) for m in pipe.transformer.modules())  # unchanged


def test_save_then_plain_reload_gives_identical_images(dfh, tmp_path):
    pipe = dfh.dit_pipeline()
    ref = dfh.dit_images(pipe)
    x = dfh.denoiser_inputs(pipe.transformer, timestep=500)
    ref_eps = dfh.denoise(pipe.transformer, x)
    pipe.enable_quant(W8A8_STATIC, calibration_prompts=[3, 4, 5], num_inference_steps=4, act_scales="per_timestep",
                      progress=False)
    out = dfh.dit_images(pipe)
    # static per-tensor int8 activations (per-timestep scales) and 8-bit weights on a random-weight
    # DiT: the denoiser output at a calibrated timestep moves by under 10%; images (4 DDIM steps
    # through the random VAE) by under 0.05 of their range on average
    assert dfh.rel_err(dfh.denoise(pipe.transformer, x), ref_eps) < 0.10
    assert float((out - ref).abs().mean()) < 0.05
    pipe.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "transformer" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "piecewise" and qc["diffusion"]["act_scales"] == "per_timestep"
    assert qc["diffusion"]["timesteps"] == [750.0, 500.0, 250.0, 0.0]
    assert "quantization_config" not in json.loads((tmp_path / "vae" / "config.json").read_text())
    reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.transformer.transformer_blocks[0].attn1.to_q, DiffusionQuantLinear)
    assert torch.equal(dfh.dit_images(reloaded), out)
    with pytest.raises(ValueError, match="loaded from a quantized checkpoint"):
        reloaded.disable_quant()


def test_enable_quant_bad_input(dfh):
    pipe = dfh.dit_pipeline()
    with pytest.raises(ValueError, match="calibration_prompts is empty"):
        pipe.enable_quant(W8A8_STATIC, calibration_prompts=[], progress=False)
    with pytest.raises(ValueError, match="would quantize nothing in component 'transformer'"):
        pipe.enable_quant(pq.PiecewiseQuantConfig(bits=8, group_size="channel", modules_to_not_convert=["*"]), progress=False)
    with pytest.raises(ValueError, match="has no component 'unet'"):
        pipe.enable_quant(W8, components=["unet"], progress=False)
    with pytest.raises(ValueError, match="group_size=64 does not divide"):
        pipe.enable_quant(pq.PiecewiseQuantConfig(bits=4, group_size=64, modules_to_not_convert=[]), progress=False)
    with pytest.raises(ValueError, match="has no label names; give class ids"):
        pipe.enable_quant(W8A8_STATIC, calibration_prompts=["a cat"], progress=False)
    with pytest.raises(TypeError, match="class-conditional"):
        pipe.enable_quant(W8A8_STATIC, calibration_prompts=[1.5], progress=False)
    with pytest.raises(ValueError, match="act_group_size=16 applies to layers with dynamic"):
        pipe.enable_quant(W8, act_group_size=16, progress=False)
    with pytest.raises(ValueError, match="act_scales='per_timestep' applies to layers with static"):
        pipe.enable_quant(W8, act_scales="per_timestep", progress=False)
    with pytest.raises(ValueError, match="act_scales must be one of"):
        pipe.enable_quant(W8A8_STATIC, act_scales="per_step", progress=False)
    with pytest.raises(TypeError, match="expects a diffusers DiffusionPipeline"):
        enable_quant(pipe.transformer, W8)
    # nothing above changed the pipeline
    assert not any(isinstance(m, pq.QuantLinear) for m in pipe.transformer.modules())
    pipe.enable_quant(W8, progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        pipe.enable_quant(W8, progress=False)


def test_pipeline_without_denoiser_is_refused(dfh):
    pipe = diffusers.DiTPipeline(transformer=dfh.tiny_dit(), vae=dfh.tiny_vae(), scheduler=diffusers.DDIMScheduler())
    pipe.register_modules(transformer=None)
    with pytest.raises(ValueError, match="has no denoiser to quantize"):
        pipe.enable_quant(W8, progress=False)
    with pytest.raises(ValueError, match="has no quantized component"):
        pipe.disable_quant()


def test_text_encoder_or_vae_only_when_asked(dfh):
    pipe = dfh.dit_pipeline()
    # the tiny VAE's attention projections are Linear layers (in_features 8)
    pipe.enable_quant(W8, components=["transformer", "vae"], progress=False)
    assert any(isinstance(m, DiffusionQuantLinear) for m in pipe.vae.modules())
    pipe.disable_quant(components="vae")
    assert not any(isinstance(m, pq.QuantLinear) for m in pipe.vae.modules())
    assert any(isinstance(m, DiffusionQuantLinear) for m in pipe.transformer.modules())
