"""diffusers with low-rank (SVDQuant) layers: ``DiffusionQuantLinear`` adds the branch on the
unquantized input, also with group-wise activations (quantized before the op)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import piecewise_quant as pq  # noqa: E402


def test_group_wise_w4a4_with_a_low_rank_branch(dfh):
    from piecewise_quant import lowrank
    from piecewise_quant.kernels import reference

    pipe = dfh.dit_pipeline()
    x = dfh.denoiser_inputs(pipe.transformer)
    ref = dfh.denoise(pipe.transformer, x)
    errs = {}
    for r in (None, 4):
        cfg = pq.PiecewiseQuantConfig(bits=4, grid="uniform", group_size=16, act_bits=4, low_rank=r,
                                      modules_to_not_convert=[])
        pipe.enable_quant(cfg, act_group_size=8, progress=False)
        errs[r] = dfh.rel_err(dfh.denoise(pipe.transformer, x), ref)
        m = pipe.transformer.get_submodule("transformer_blocks.0.ff.net.2")
        if r is not None:
            assert m.lowrank_a.shape == (m.out_features, 4)
            inp = torch.randn(2, 16, m.in_features)
            inp[..., 3] *= 40
            groups = inp.reshape(2, 16, -1, 8)
            xq = reference.quantize_activation(groups, "int4", "dynamic_per_token").reshape(inp.shape)
            t = m.quantized_tensors()
            res = m.fmt.dequantize(lowrank.split_tensors(t), lowrank.dense_layer(m.layer_spec), torch.float32)
            ab = (t["lowrank_a"].double() @ t["lowrank_b"].double()).float()
            want = torch.nn.functional.linear(xq, res, m.bias) + torch.nn.functional.linear(inp, ab)
            with torch.no_grad():
                assert torch.allclose(m(inp), want, atol=1e-4, rtol=1e-5)
        pipe.disable_quant()
    assert errs[4] < errs[None], errs
