"""MixDQ's BOS-aware quantization (``enable_quant(..., bos_aware=True)``): token 0 of a causal text
encoder's embeddings is the same for every prompt and carries outliers; the layers that read it keep
its row in float. Tiny PixArt models with a planted outlier in token 0; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import piecewise_quant as pq  # noqa: E402

TEXT_DIM = 32
N_TOKENS = 6
OUTLIER = 60.0


def bos_vector() -> torch.Tensor:
    """A BOS embedding with a planted outlier channel (CLIP's start token looks like this)."""
    v = torch.randn(TEXT_DIM, generator=torch.Generator().manual_seed(7))
    v[3] = OUTLIER
    v[17] = -OUTLIER / 2
    return v


def embed(prompts: list[str], bos: torch.Tensor | None) -> torch.Tensor:
    """Hashed prompt embeddings (see conftest) with token 0 replaced by ``bos`` (a causal encoder)."""
    import hashlib

    out = []
    for p in prompts:
        seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
        e = torch.randn(N_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(seed))
        if bos is not None:
            e[0] = bos
        out.append(e)
    return torch.stack(out)


def make_pipeline(dfh, bos: torch.Tensor | None, kind: str = "pixart"):
    from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    class BosTextPipeline(DiffusionPipeline):
        """PixArt (or SD3) text-to-image on hashed embeddings; the unconditional branch is the empty
        prompt (token 0 = BOS, the rest zero), as a causal encoder would give."""

        def __init__(self, transformer, scheduler):
            super().__init__()
            self.register_modules(transformer=transformer, scheduler=scheduler)

        @torch.no_grad()
        def __call__(self, prompt, num_inference_steps: int = 3, guidance_scale: float = 3.0, generator=None,
                     output_type: str = "latent"):
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            cond = embed(prompts, self.bos)
            uncond = torch.zeros_like(cond)
            if self.bos is not None:
                uncond[:, 0] = self.bos
            latents = torch.randn((len(prompts), 4, 8, 8), generator=generator)
            self.scheduler.set_timesteps(num_inference_steps)
            for t in self.scheduler.timesteps:
                x = torch.cat([latents, latents])
                extra = ({"pooled_projections": torch.ones(x.shape[0], dfh.POOLED_DIM)} if self.kind == "sd3" else
                         {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}})
                out = self.transformer(x, encoder_hidden_states=torch.cat([uncond, cond]), timestep=t.expand(x.shape[0]),
                                       return_dict=False, **extra)[0][:, :4]
                u, c = out.chunk(2)
                latents = self.scheduler.step(u + guidance_scale * (c - u), t, latents).prev_sample
            return (latents,)

    if kind == "sd3":
        pipe = BosTextPipeline(dfh.tiny_sd3(), FlowMatchEulerDiscreteScheduler())
    else:
        pipe = BosTextPipeline(dfh.tiny_pixart(), DDIMScheduler())
    pipe.bos, pipe.kind = bos, kind
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPTS = ["a red cube", "two cats", "a tree at night", "the sea"]
W8A8_STATIC = dict(bits=8, grid="uniform", group_size="channel", act_bits=8, act_mode="static_per_tensor",
                   modules_to_not_convert=[])


def denoiser_call(bos: torch.Tensor, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.full((2,), 500),
                encoder_hidden_states=embed(["a blue sphere", "three dogs"], bos),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def test_bos_layers_are_found_by_what_they_read(dfh):
    bos = bos_vector()
    pipe = make_pipeline(dfh, bos)
    report = pipe.enable_quant(pq.PiecewiseQuantConfig(**W8A8_STATIC), calibration_prompts=PROMPTS,
                               num_inference_steps=3, bos_aware=True, progress=False)
    rep = report.components["transformer"].bos
    # the layers reading the text token by token: the caption projection and every block's K/V (to_q and
    # everything behind a cross-attention see all tokens mixed and drop out)
    assert set(rep.layers) == {"caption_projection.linear_1", "caption_projection.linear_2",
                               "transformer_blocks.0.attn2.to_k", "transformer_blocks.0.attn2.to_v",
                               "transformer_blocks.1.attn2.to_k", "transformer_blocks.1.attn2.to_v"}
    assert rep.token0_absmax == pytest.approx(OUTLIER) and rep.other_tokens_absmax < 6
    assert "BOS-aware: 6 layers" in str(report)
    cfg = pipe.transformer.config.quantization_config.to_dict()["diffusion"]
    assert cfg["bos_aware"] and sorted(cfg["bos_layers"]) == sorted(rep.layers)
    k = pipe.transformer.transformer_blocks[0].attn2.to_k
    assert "bos_aware" in repr(k) and k.bos_output.dtype == torch.float32
    torch.testing.assert_close(k.bos_input, rep_input(pipe, bos), rtol=1e-5, atol=1e-5)


def test_sd3_keeps_the_bos_row_where_the_text_is_read_unmodulated(dfh):
    """SD3's context_embedder reads the text embeddings as they are; the dual-stream blocks' add_k/add_v
    read them after a timestep-modulated norm (row 0 moves across calls) or after joint attention
    (every token mixed in), so they are left out, with the reason."""
    pipe = make_pipeline(dfh, bos_vector(), kind="sd3")
    report = pipe.enable_quant(pq.PiecewiseQuantConfig(bits=8, group_size="channel", act_bits=8, modules_to_not_convert=[]),
                               calibration_prompts=PROMPTS[:2], num_inference_steps=2, bos_aware=True, progress=False)
    rep = report.components["transformer"].bos
    assert list(rep.layers) == ["context_embedder"]
    assert "transformer_blocks.0.attn.add_k_proj" in rep.skipped and "timestep" in rep.skipped[
        "transformer_blocks.0.attn.add_k_proj"]
    assert not any(n.startswith("transformer_blocks.1.") for n in rep.skipped)  # behind joint attention: not text-side


def rep_input(pipe, bos: torch.Tensor) -> torch.Tensor:
    """Block 0's K/V input for the BOS token, through the float caption projection."""
    proj = pipe.transformer._piecewise_quant_restore.float_layers
    with torch.no_grad():
        h = torch.nn.functional.gelu(proj["caption_projection.linear_1"](bos), approximate="tanh")
        return proj["caption_projection.linear_2"](h)


def cross_attention_outputs(model, inputs: dict) -> torch.Tensor:
    """Every block's cross-attention output for one denoiser call."""
    outs = []
    hooks = [b.attn2.register_forward_hook(lambda m, a, o: outs.append(o)) for b in model.transformer_blocks]
    try:
        with torch.no_grad():
            model(**inputs, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(outs)


# only the layers that read the text are quantized, so the cross-attention error is theirs
TEXT_LAYERS_ONLY = r"re:.*(attn1|to_q|to_out|ff|adaln|proj_out|pos_embed|norm).*"


@pytest.mark.parametrize("act_mode", ["static_per_tensor", "dynamic_per_token"])
def test_planted_bos_outlier_bos_aware_recovers_the_cross_attention(dfh, act_mode):
    bos = bos_vector()
    pipe = make_pipeline(dfh, bos)
    inputs = denoiser_call(bos)
    ref = cross_attention_outputs(pipe.transformer, inputs)
    errs = {}
    for aware in (False, True):
        cfg = pq.PiecewiseQuantConfig(**{**W8A8_STATIC, "act_mode": act_mode, "modules_to_not_convert": [TEXT_LAYERS_ONLY]})
        pipe.enable_quant(cfg, calibration_prompts=PROMPTS, num_inference_steps=3, bos_aware=aware, progress=False)
        errs[aware] = dfh.rel_err(cross_attention_outputs(pipe.transformer, inputs), ref)
        pipe.disable_quant()
    # static: one per-tensor scale stretched by the outlier leaves the real tokens a few levels;
    # per token: only token 0's own rounding error, which BOS-aware removes
    assert errs[True] < 0.25 * errs[False], errs  # measured: about 10x smaller in both modes


def test_save_reload_is_bit_exact_and_keeps_the_bos_rows(dfh, tmp_path):
    from diffusers import PixArtTransformer2DModel

    bos = bos_vector()
    pipe = make_pipeline(dfh, bos)
    pipe.enable_quant(pq.PiecewiseQuantConfig(bits=4, group_size=16, act_bits=8, modules_to_not_convert=[]),
                      calibration_prompts=PROMPTS[:2], num_inference_steps=2, bos_aware=True, progress=False)
    inputs = denoiser_call(bos)
    out = dfh.denoise(pipe.transformer, inputs)
    pipe.transformer.save_pretrained(tmp_path)
    loaded = PixArtTransformer2DModel.from_pretrained(tmp_path).eval()
    assert torch.equal(dfh.denoise(loaded, inputs), out)
    k, k2 = pipe.transformer.transformer_blocks[1].attn2.to_v, loaded.transformer_blocks[1].attn2.to_v
    assert torch.equal(k.bos_input, k2.bos_input) and torch.equal(k.bos_output, k2.bos_output)
    assert loaded.transformer_blocks[1].attn1.to_q.bos_input is None  # image-side layers have none
    # a checkpoint missing a BOS row is refused, naming the tensor
    from safetensors.torch import load_file, save_file

    f = next(tmp_path.glob("*.safetensors"))
    state = load_file(f)
    del state["transformer_blocks.1.attn2.to_v.bos_output"]
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(pq.CheckpointMismatchError, match="attn2.to_v.bos_output"):
        PixArtTransformer2DModel.from_pretrained(tmp_path)


def test_a_different_token0_falls_back_to_the_quantized_path(dfh):
    from piecewise_quant.qlinear import QuantLinear

    bos = bos_vector()
    pipe = make_pipeline(dfh, bos)
    pipe.enable_quant(pq.PiecewiseQuantConfig(**{**W8A8_STATIC, "act_mode": "dynamic_per_token"}),
                      calibration_prompts=PROMPTS[:2], num_inference_steps=2, bos_aware=True, progress=False)
    k = pipe.transformer.transformer_blocks[0].attn2.to_k
    x = torch.randn(3, N_TOKENS, k.in_features, generator=torch.Generator().manual_seed(0))
    x[0, 0] = k.bos_input
    x[1, 0] = k.bos_input * (1 + 1e-2)  # close, but another vector: never given the stored row
    x[2, 0] = k.bos_input + torch.randn(k.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = k(x)
        plain = QuantLinear.forward(k, x)
    assert torch.equal(y[0, 0], k.bos_output)
    assert torch.equal(y[0, 1:], plain[0, 1:])
    assert torch.equal(y[1:], plain[1:])
    assert not torch.equal(plain[0, 0], k.bos_output)
    # the planted outlier rows are what the quantized path gets wrong
    assert (plain[0, 0] - k.bos_output).abs().max() > (y[0, 0] - k.bos_output).abs().max()


def test_token0_that_differs_across_prompts_is_refused(dfh):
    pipe = make_pipeline(dfh, bos=None)  # token 0 depends on the prompt, as with T5
    with pytest.raises(ValueError, match="not causal"):
        pipe.enable_quant(pq.PiecewiseQuantConfig(bits=8, act_bits=8, group_size="channel",
                                                  modules_to_not_convert=[]),
                          calibration_prompts=PROMPTS[:2], num_inference_steps=2, bos_aware=True, progress=False)
    assert not any(type(m).__name__ == "DiffusionQuantLinear" for m in pipe.transformer.modules())  # rolled back


def test_bos_aware_needs_a_text_conditioned_pipeline_and_the_pipeline_api(dfh, tmp_path):
    from diffusers import PixArtTransformer2DModel

    from piecewise_quant.integrations.diffusers import DiffusionOptions, PiecewiseDiffusersConfig

    with pytest.raises(ValueError, match="not text-conditioned"):
        dfh.dit_pipeline().enable_quant(pq.PiecewiseQuantConfig(bits=8, group_size="channel"), calibration_prompts=[1, 2],
                                        bos_aware=True, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="bos_aware is False"):
        DiffusionOptions(bos_layers=("a.b",))
    dfh.tiny_pixart().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="enable_quant"):
        PixArtTransformer2DModel.from_pretrained(
            tmp_path, quantization_config=PiecewiseDiffusersConfig(bits=8, group_size="channel", diffusion={"bos_aware": True}))
