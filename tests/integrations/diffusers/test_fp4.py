"""FP4 weights (mxfp4 / nvfp4) in a diffusers DiT through the pipeline API: every Linear layer of
the denoiser becomes a quantized layer, the output stays close, and a saved pipeline reloads with
plain ``from_pretrained`` to identical images."""

from __future__ import annotations

import pytest
import torch

import piecewise_quant as pq

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("grid", ["mxfp4", "nvfp4"])
def test_dit_with_fp4_weights_round_trips(dfh, grid, tmp_path):
    pipe = dfh.dit_pipeline()
    x = dfh.denoiser_inputs(pipe.transformer)
    ref = dfh.denoise(pipe.transformer, x)
    report = pipe.enable_quant(pq.PiecewiseQuantConfig(grid=grid, modules_to_not_convert=[]), progress=False)
    layers = [m for m in pipe.transformer.modules() if isinstance(m, pq.QuantLinear)]
    assert len(layers) == 20 and all(m.spec.grid == grid for m in layers)
    c = report.components["transformer"]
    for m in layers:  # exact storage: E2M1 codes + one 8-bit scale per block (+ nvfp4's float32 per tensor)
        n = m.in_features * m.out_features
        assert m.bits_per_weight() == (4.25 if grid == "mxfp4" else 4.5 + 32 / n)
    sizes = [m.in_features * m.out_features for m in layers]
    assert c.bits_per_weight == pytest.approx(sum(m.bits_per_weight() * n for m, n in zip(layers, sizes)) / sum(sizes))
    # 4-bit floats with fine block scales on a random-weight DiT: the denoiser output moves by under 15%
    assert dfh.rel_err(dfh.denoise(pipe.transformer, x), ref) < 0.15
    out = dfh.dit_images(pipe)
    pipe.save_pretrained(tmp_path)
    reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.transformer.transformer_blocks[0].attn1.to_q, pq.QuantLinear)
    assert reloaded.transformer.transformer_blocks[0].attn1.to_q.spec.grid == grid
    assert torch.equal(dfh.dit_images(reloaded), out)
