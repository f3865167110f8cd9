"""Tiny diffusion models and pipelines for the diffusers integration tests (built from configs,
random weights, CPU; nothing is downloaded).

* ``DiTPipeline`` with a tiny ``DiTTransformer2DModel`` and a tiny ``AutoencoderKL``;
* ``TinyTextPipeline``: a minimal text-to-image pipeline (classifier-free guidance batched as
  ``[uncond, cond]`` like diffusers' text pipelines) around a PixArt, SD3 or Flux transformer.
  Prompts become embeddings by hashing, so no text encoder or tokenizer files are needed.
"""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)

from piecewise_quant.integrations.diffusers import register_with_diffusers  # noqa: E402

register_with_diffusers()

TEXT_DIM = 32
POOLED_DIM = 32
N_TEXT_TOKENS = 6


def tiny_dit(seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    ).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"], latent_channels=4, norm_num_groups=8, sample_size=8,
    ).eval()


def dit_pipeline(seed: int = 0) -> DiTPipeline:
    pipe = DiTPipeline(transformer=tiny_dit(seed), vae=tiny_vae(seed), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart(seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=32, caption_channels=TEXT_DIM, norm_type="ada_norm_single",
        use_additional_conditions=False,
    ).eval()


def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=32, pooled_projection_dim=POOLED_DIM, out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, axes_dims_rope=[4, 6, 6],
    ).eval()


def denoiser_inputs(model, batch: int = 2, timestep: float = 500.0, seed: int = 1) -> dict:
    """Keyword inputs for one forward call of a tiny denoiser."""
    g = torch.Generator().manual_seed(seed)
    kind = type(model).__name__
    if kind.startswith("Flux"):
        return dict(
            hidden_states=torch.randn(batch, 16, 16, generator=g), timestep=torch.full((batch,), timestep / 1000),
            encoder_hidden_states=torch.randn(batch, N_TEXT_TOKENS, TEXT_DIM, generator=g),
            pooled_projections=torch.randn(batch, POOLED_DIM, generator=g),
            txt_ids=torch.zeros(N_TEXT_TOKENS, 3), img_ids=torch.zeros(16, 3),
        )
    x = torch.randn(batch, 4, 8, 8, generator=g)
    if kind.startswith("DiT"):
        return dict(hidden_states=x, timestep=torch.full((batch,), int(timestep)), class_labels=torch.arange(batch) + 1)
    if kind.startswith("PixArt"):
        return dict(
            hidden_states=x, timestep=torch.full((batch,), int(timestep)),
            encoder_hidden_states=torch.randn(batch, N_TEXT_TOKENS, TEXT_DIM, generator=g),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    return dict(
        hidden_states=x, timestep=torch.full((batch,), float(timestep)),
        encoder_hidden_states=torch.randn(batch, N_TEXT_TOKENS, TEXT_DIM, generator=g),
        pooled_projections=torch.randn(batch, POOLED_DIM, generator=g),
    )


@torch.no_grad()
def denoise(model, inputs: dict) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def _embed(prompt: str, shape: tuple[int, ...]) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class TinyTextPipeline(DiffusionPipeline):
    """Text-to-image in latent space with a PixArt, SD3 or Flux transformer (see the module docstring)."""

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int = 4, guidance_scale: float = 3.0, generator=None,
                 output_type: str = "latent"):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = len(prompts)
        model = self.transformer
        kind = type(model).__name__
        cond = torch.stack([_embed(p, (N_TEXT_TOKENS, TEXT_DIM)) for p in prompts])
        pooled = torch.stack([_embed(p + "/pooled", (POOLED_DIM,)) for p in prompts])
        shape = (n, 16, 16) if kind.startswith("Flux") else (n, 4, 8, 8)
        latents = torch.randn(shape, generator=generator)
        cfg = guidance_scale > 1
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            x = torch.cat([latents, latents]) if cfg else latents
            emb = torch.cat([torch.zeros_like(cond), cond]) if cfg else cond
            pool = torch.cat([torch.zeros_like(pooled), pooled]) if cfg else pooled
            b = x.shape[0]
            if kind.startswith("Flux"):
                out = model(hidden_states=x, timestep=t.expand(b) / 1000, encoder_hidden_states=emb, pooled_projections=pool,
                            txt_ids=torch.zeros(N_TEXT_TOKENS, 3), img_ids=torch.zeros(16, 3), return_dict=False)[0]
            elif kind.startswith("PixArt"):
                out = model(x, encoder_hidden_states=emb, timestep=t.expand(b),
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
                out = out[:, : x.shape[1]]
            else:
                out = model(hidden_states=x, timestep=t.expand(b), encoder_hidden_states=emb, pooled_projections=pool,
                            return_dict=False)[0]
            if cfg:
                uncond, c = out.chunk(2)
                out = uncond + guidance_scale * (c - uncond)
            latents = self.scheduler.step(out, t, latents).prev_sample
        return (latents,)


def text_pipeline(transformer) -> TinyTextPipeline:
    kind = type(transformer).__name__
    scheduler = DDIMScheduler() if kind.startswith("PixArt") else FlowMatchEulerDiscreteScheduler()
    pipe = TinyTextPipeline(transformer, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_images(pipe, labels=(1, 2), steps: int = 4, seed: int = 0) -> torch.Tensor:
    return pipe(class_labels=list(labels), num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="pt").images


@pytest.fixture(scope="session")
def dfh():
    """This module (helpers), for test files: with ``--import-mode=importlib`` they cannot import a
    sibling module by name."""
    return sys.modules[__name__]
