"""ViDiT-Q's channel balance through ``pipe.enable_quant``: scales measured over every timestep of
pipeline runs, the data-free and the GPTQ paths, exact restore, save -> plain reload, dual-stream
SD3 and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import piecewise_quant as pq  # noqa: E402
from piecewise_quant.integrations.diffusers import DiffusionQuantLinear, diffusion_recipe  # noqa: E402

CAL = dict(calibration_prompts=[3, 4, 5], num_inference_steps=4, progress=False)


@torch.no_grad()
def _plant_outliers(model, factor: float = 30.0) -> None:
    """Two channels of every attention's value path scaled up, the output projection's columns
    scaled down: the same function, with outlier channels entering ``to_out.0``."""
    for block in model.transformer_blocks:
        for attn in (block.attn1,):
            heads_dim = attn.to_v.out_features
            idx = torch.tensor([1, heads_dim - 3])
            attn.to_v.weight[idx] *= factor
            if attn.to_v.bias is not None:
                attn.to_v.bias[idx] *= factor
            attn.to_out[0].weight[:, idx] /= factor


def _w8a4(**kw):
    """8-bit weights; 4-bit activations on the layers with the outlier channels."""
    return pq.PiecewiseQuantConfig(bits=8, grid="uniform", group_size="channel", modules_to_not_convert=[],
                                   overrides={"*attn1.to_out.0": {"act_bits": 4}}, **kw)


@pytest.mark.parametrize("calibration", [None, "gptq"])
def test_balance_rescues_4bit_activations_with_outlier_channels(dfh, calibration):
    pipe = dfh.dit_pipeline()
    _plant_outliers(pipe.transformer)
    x = dfh.denoiser_inputs(pipe.transformer, timestep=500)
    ref = dfh.denoise(pipe.transformer, x)
    pipe.enable_quant(_w8a4(calibration=calibration), **CAL)
    e_plain = dfh.rel_err(dfh.denoise(pipe.transformer, x), ref)
    pipe.disable_quant()
    pipe.enable_quant(_w8a4(calibration=calibration, rotation={"rotations": ["balance"]}), **CAL)
    layer = pipe.transformer.transformer_blocks[0].attn1.to_out[0]
    assert isinstance(layer, DiffusionQuantLinear) and layer.has_balance
    e_bal = dfh.rel_err(dfh.denoise(pipe.transformer, x), ref)
    assert e_bal < 0.5 * e_plain, (e_bal, e_plain)


def test_balanced_pipeline_restores_exactly_and_reloads_identically(dfh, tmp_path):
    pipe = dfh.dit_pipeline()
    ref = dfh.dit_images(pipe)
    sd = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    cfg = diffusion_recipe(bits=4, group_size=16, act_bits=8, balance=True)
    assert cfg.rotation.rotations == ("balance",)
    report = pipe.enable_quant(cfg, **CAL)
    out = dfh.dit_images(pipe)
    assert float((out - ref).abs().mean()) < 0.05
    # conditioning layers keep float activations, so they are not balanced
    assert not pipe.transformer.transformer_blocks[0].norm1.linear.has_balance
    assert pipe.transformer.transformer_blocks[0].ff.net[2].has_balance
    assert report.components["transformer"].n_layers > 0
    pipe.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "transformer" / "config.json").read_text())["quantization_config"]
    assert qc["rotation"]["rotations"] == ["balance"] and qc["rotation"]["balance_alpha"] == "auto"
    reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(dfh.dit_images(reloaded), out)
    pipe.disable_quant()
    assert torch.equal(dfh.dit_images(pipe), ref)
    assert all(torch.equal(v, sd[k]) for k, v in pipe.transformer.state_dict().items())


def test_balance_works_on_dual_stream_sd3_without_a_recipe(dfh):
    model = dfh.tiny_sd3()
    pipe = dfh.text_pipeline(model)
    x = dfh.denoiser_inputs(model)
    ref = dfh.denoise(model, x)
    cfg = pq.PiecewiseQuantConfig(bits=8, grid="uniform", group_size="channel", act_bits=8, modules_to_not_convert=[],
                                  rotation={"rotations": ["balance"]})
    pipe.enable_quant(cfg, calibration_prompts=["a cat", "a dog"], num_inference_steps=3, progress=False)
    assert any(getattr(m, "has_balance", False) for m in model.modules())
    assert dfh.rel_err(dfh.denoise(model, x), ref) < 0.05


def test_balance_refusals(dfh, tmp_path):
    with pytest.raises(ValueError, match="act_bits"):
        diffusion_recipe(bits=4, balance=True)
    with pytest.raises(ValueError, match="not supported for diffusers"):
        dfh.dit_pipeline().enable_quant(pq.PiecewiseQuantConfig(bits=4, rotation="quarot"), progress=False)
    pipe = dfh.dit_pipeline()
    pipe.transformer.save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match="enable_quant"):
        diffusers.DiTTransformer2DModel.from_pretrained(
            tmp_path / "float", quantization_config=_w8a4(act_bits=8, rotation={"rotations": ["balance"]}))


def test_balance_with_a_low_rank_branch_reloads_identically(dfh, tmp_path):
    pipe = dfh.dit_pipeline()
    x = dfh.denoiser_inputs(pipe.transformer, timestep=500)
    ref = dfh.denoise(pipe.transformer, x)
    cfg = diffusion_recipe(bits=4, group_size=16, act_bits=8, balance=True, low_rank=2, calibration="gptq")
    pipe.enable_quant(cfg, **CAL)
    layer = pipe.transformer.transformer_blocks[0].ff.net[2]
    assert layer.has_balance and "lowrank_a" in layer._buffers
    out = dfh.denoise(pipe.transformer, x)
    assert dfh.rel_err(out, ref) < 0.1
    pipe.save_pretrained(tmp_path)
    reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert torch.equal(dfh.denoise(reloaded.transformer, x), out)
