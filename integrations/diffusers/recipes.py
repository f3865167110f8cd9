"""Per-layer recipes for diffusion transformers.

The layers of a DiT do different jobs and tolerate quantization differently. The timestep and
condition embeddings (``timestep_embedder``, ``text_embedder``, ``caption_projection``,
``context_embedder``...) and the adaLN modulation layers (``norm1.linear``, ``norm_out.linear``,
``adaln_single.linear``, DiT's ``proj_out_1``) turn a handful of conditioning numbers into the
shift/scale/gate of every block: their outputs multiply whole activations, they hold few weights,
and their inputs (sinusoidal features, SiLU of the embedding) are smooth. They get an 8-bit
uniform grid and float activations. The attention and MLP projections hold almost every weight and
have bell-shaped weight distributions, where the piecewise grid's dense centre pays off: they get
the config's low-bit piecewise grid. The final projection that turns the last hidden states into the
predicted noise (DiT's ``proj_out_2``; ``proj_out`` of PixArt, SD3, Flux and Sana) holds a few
hundred to a few thousand weights, and its output is the denoiser's output itself: 4-bit
activations there cost the digits DiT about 3 points of accuracy at W4A4 (docs/diffusers.md), so it
gets the conditioning layers' scheme too (``output_layer=False`` quantizes it like the rest).

:func:`diffusion_recipe` builds that config; every choice stays a plain pattern override, so it is
saved with the checkpoint and can be edited (``config.with_overrides({...})``).
"""

from __future__ import annotations

from typing import Any

from piecewise_quant.config import PiecewiseQuantConfig

__all__ = ["CONDITIONING_PATTERNS", "OUTPUT_PATTERNS", "conditioning_scheme", "diffusion_recipe"]

# Layer-name patterns (fnmatch; matched against the full module name) of the conditioning layers of
# diffusers' DiT, PixArt, SD3, Flux, Sana and Hunyuan-style transformers.
CONDITIONING_PATTERNS: tuple[str, ...] = (
    "*timestep_embedder.*",
    "*text_embedder.*",
    "*guidance_embedder.*",
    "*time_embed*",
    "*caption_projection*",
    "context_embedder",
    "*.emb.*",
    "*norm*.linear",
    "adaln_single.linear",
    "proj_out_1",
)

# The final projection to the predicted noise. Regular expressions matched against the whole name,
# so only the top-level layer matches (a plain "proj_out" would also match a UNet's inner
# "...attentions.0.proj_out").
OUTPUT_PATTERNS: tuple[str, ...] = ("re:proj_out(_2)?",)


def conditioning_scheme(bits: int = 8, grid: str = "uniform", act_bits: int | None = None) -> dict[str, Any]:
    """The ``overrides`` entry :func:`diffusion_recipe` gives its conditioning and output layers
    (``{pattern: conditioning_scheme()}`` puts another layer on it): ``bits``-bit ``grid`` weights,
    per channel when uniform, ``act_bits`` activations (``None``: float). From 8 bits up it also
    sets ``low_rank=None``: an SVDQuant branch absorbs what 4-bit codes cannot hold, 8-bit layers
    need none, and a 1-output projection (a 1-channel model's ``proj_out``) has no room for one."""
    scheme: dict[str, Any] = {"grid": grid, "bits": bits, "act_bits": act_bits}
    if bits >= 8:
        scheme["low_rank"] = None
    if grid == "uniform":
        scheme["group_size"] = "channel"
    return scheme


def diffusion_recipe(
    bits: int = 4,
    grid: str = "piecewise",
    group_size: int | str | None = 64,
    act_bits: int | None = None,
    act_mode: str = "dynamic_per_token",
    conditioning_bits: int = 8,
    conditioning_grid: str = "uniform",
    conditioning_act_bits: int | None = None,
    balance: bool = False,
    balance_alpha: float | str = "auto",
    output_layer: bool = True,
    **kwargs: Any,
) -> PiecewiseQuantConfig:
    """A :class:`~piecewise_quant.PiecewiseQuantConfig` for a DiT: ``grid``/``bits`` (default 4-bit
    piecewise) for attention and MLP projections, ``conditioning_grid``/``conditioning_bits``
    (default 8-bit uniform, float activations) for the embedding and adaLN modulation layers and,
    with ``output_layer=True`` (the default), for the final projection to the predicted noise
    (:data:`OUTPUT_PATTERNS`; a few hundred weights whose 4-bit activations are the costliest of
    the model at W4A4). ``output_layer=False`` quantizes that layer like the attention/MLP projections.

    ``act_bits``/``act_mode`` set activation quantization of the attention/MLP projections; other
    keyword arguments go to ``PiecewiseQuantConfig`` (e.g. ``calibration``, ``act_clip_ratio``,
    ``low_rank``, ``modules_to_not_convert``, more ``overrides``, which take precedence over the
    recipe's). A ``low_rank`` branch goes to the low-bit layers only: the conditioning and output
    layers get none while ``conditioning_bits >= 8``.

    ``balance=True``: ViDiT-Q's static-dynamic channel balance on every layer that quantizes its
    activations: a per-channel smoothing scale from the activation maxima over every calibrated
    timestep and guidance branch (exponent ``balance_alpha``; ``"auto"`` picks it per layer from
    0, 0.25, 0.5, 0.75 by the quantized layer's output error on calibration inputs), then a random Hadamard rotation,
    both applied online (``rotation=RotationArgs(["balance"])``); pair it with dynamic
    activations (``act_mode="dynamic_per_token"``, optionally ``act_group_size``). It composes
    with ``calibration="gptq"`` (GPTQ runs on the balanced weights)."""
    overrides = dict(kwargs.pop("overrides", {}) or {})
    for pattern in CONDITIONING_PATTERNS + (OUTPUT_PATTERNS if output_layer else ()):
        overrides.setdefault(pattern, conditioning_scheme(conditioning_bits, conditioning_grid, conditioning_act_bits))
    kwargs.setdefault("modules_to_not_convert", [])
    if balance:
        if act_bits is None and conditioning_act_bits is None:
            raise ValueError("balance=True balances the inputs of layers that quantize activations, and this recipe "
                             "quantizes none: set act_bits (e.g. act_bits=8 or 4)")
        if kwargs.get("rotation") is not None:
            raise ValueError("pass either balance=True or rotation=..., not both (balance sets the rotation)")
        kwargs["rotation"] = {"rotations": ["balance"], "balance_alpha": balance_alpha}
    return PiecewiseQuantConfig(
        bits=bits, grid=grid, group_size=group_size, act_bits=act_bits, act_mode=act_mode, overrides=overrides, **kwargs
    )
