"""FP4 (E2M1) numbers with block scales: the element codes and the two scale encodings.

* **E2M1** element codes (4 bits): bit 3 is the sign, bits 2-1 the exponent (bias 1), bit 0 the
  mantissa. The magnitudes of codes 0..7 are ``0, 0.5, 1, 1.5, 2, 3, 4, 6``; codes 8..15 are their
  negatives (code 8, "-0", decodes to 0 and is never produced). Rounding is to nearest, ties to
  the even code (OCP MX v1.0, section 5.3.3), and magnitudes above 6 saturate to 6.
* **MXFP4** (OCP Microscaling): blocks of 32, one E8M0 scale per block, stored as its biased
  exponent in a ``uint8`` (``127`` is ``2**0``; ``255``, NaN, is never produced and is refused).
* **NVFP4**: blocks of 16, one FP8 E4M3 scale per block, times one float32 per-tensor scale
  (``amax / (6 * 448)``, so block scales use E4M3's whole range).

Pure torch; the reference kernels, the weight formats and the activation quantizer share it.
"""

from __future__ import annotations

import torch

__all__ = [
    "E2M1_MAX", "E4M3_MAX", "MX_BLOCK", "NV_BLOCK", "e2m1_levels", "e2m1_encode", "e2m1_decode",
    "e8m0_to_float", "mx_spec_exponent", "mx_scale_exponents", "nv_global_scale", "mx_fake_quantize",
    "nv_block_scales", "nv_fake_quantize", "fp4_fake_quantize", "fp4_scales", "FP4_ACT_BLOCK",
]

E2M1_MAX = 6.0
E4M3_MAX = 448.0
MX_BLOCK = 32
NV_BLOCK = 16
#: activation format -> block size along the channel dimension
FP4_ACT_BLOCK = {"mxfp4": MX_BLOCK, "nvfp4": NV_BLOCK}
_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# rounding boundaries between consecutive magnitudes, and whether a tie goes up (to the even code)
_BOUNDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
# the smallest E8M0 value, 2**-127 (a float32 subnormal, exact); no tensor at import (hosts may
# import this module under a meta-device context)
_E8M0_ZERO = 2.0 ** -127


def e2m1_levels(device: torch.device | str | None = None) -> torch.Tensor:
    """The value of each of the 16 codes, float32 ``(16,)``."""
    mags = torch.tensor(_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags]) + 0.0  # + 0.0 turns the "-0" of code 8 into 0


def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """The E2M1 code (``uint8`` 0..15) nearest to each float ``y`` (already divided by its scale):
    ties to even, saturating at +-6. NaN encodes as 0 (callers refuse NaN inputs first)."""
    a = y.to(torch.float32).abs()
    code = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for bound, tie_up in _BOUNDS:
        code += (a >= bound if tie_up else a > bound).to(torch.uint8)
    neg = (y < 0) & (code > 0)
    return code | (neg.to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 ``codes`` (any integer dtype)."""
    return e2m1_levels(codes.device)[codes.long()]


def e8m0_to_float(biased: torch.Tensor) -> torch.Tensor:
    """float32 ``2 ** (biased - 127)`` of E8M0 scales stored as ``uint8``, built exactly from the bits."""
    b = biased.to(torch.int32)
    val = (b << 23).view(torch.float32)
    return torch.where(b == 0, torch.full_like(val, _E8M0_ZERO), val)


def mx_spec_exponent(amax: torch.Tensor) -> torch.Tensor:
    """The OCP MX shared exponent of blocks with largest magnitude ``amax``:
    ``floor(log2(amax)) - 2`` (2 is E2M1's largest exponent), as int32 (exact: from ``frexp``)."""
    _, e = torch.frexp(amax.to(torch.float32))
    return e.to(torch.int32) - 1 - 2


def mx_scale_exponents(blocks: torch.Tensor, rule: str = "spec", importance: torch.Tensor | None = None) -> torch.Tensor:
    """Biased E8M0 scale exponents (``uint8``) for ``blocks`` ``(n, b)`` (float32).

    ``rule``: ``"spec"`` (the OCP rule, :func:`mx_spec_exponent`: values between 6 and 8 times the
    scale saturate), ``"ceil"`` (the smallest exponent with no saturation, ``ceil(log2(amax / 6))``)
    or ``"mse"`` (per block, whichever of the two gives the smaller squared error, weighted by
    ``importance`` ``(n, b)`` when given). An all-zero block gets ``127`` (``2**0``)."""
    amax = blocks.abs().amax(dim=1)
    spec = mx_spec_exponent(amax)
    if rule == "spec":
        e = spec
    else:
        # ceil rule: spec + 1 exactly when amax / 2**spec > 6 (amax / 2**spec is in [4, 8))
        over = amax > torch.ldexp(torch.full_like(amax, E2M1_MAX), spec)
        ceil = spec + over.to(torch.int32)
        if rule == "ceil":
            e = ceil
        elif rule == "mse":
            errs = []
            for cand in (spec, spec + 1):
                s = torch.ldexp(torch.ones_like(amax), cand.clamp(-127, 127)).unsqueeze(1)
                sq = (e2m1_decode(e2m1_encode(blocks / s)) * s - blocks).pow(2)
                errs.append((sq if importance is None else sq * importance).sum(dim=1))
            e = torch.where(errs[1] < errs[0], spec + 1, spec)
        else:
            raise ValueError(f"MX scale rule must be 'spec', 'ceil' or 'mse'; got {rule!r}")
    biased = torch.where(amax > 0, e + 127, torch.full_like(e, 127)).clamp(0, 254)
    return biased.to(torch.uint8)


def nv_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's float32 per-tensor scale ``amax / (6 * 448)`` (``1`` for an all-zero tensor)."""
    g = amax.to(torch.float32) / (E2M1_MAX * E4M3_MAX)
    return torch.where(g > 0, g, torch.ones_like(g))


def nv_block_scales(blocks: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales (``float8_e4m3fn``, ``(n,)``) of ``blocks`` ``(n, b)``: the block's
    ``amax / 6`` over the global scale ``glob`` (broadcastable to ``(n,)``), rounded to nearest."""
    s = blocks.abs().amax(dim=1) / E2M1_MAX / glob
    return s.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)


def _blocks_of(x: torch.Tensor, block: int, what: str) -> torch.Tensor:
    c = x.shape[-1]
    if c % block:
        raise ValueError(
            f"{what} quantizes blocks of {block} along the last dimension, which has {c} elements (not a multiple "
            f"of {block}); keep this layer's activations in float or use act_format='int'"
        )
    return x.to(torch.float32).reshape(-1, block)


def mx_fake_quantize(x: torch.Tensor, block: int = MX_BLOCK) -> torch.Tensor:
    """Quantize-dequantize ``x`` as MXFP4 along its last dimension (OCP scale rule), float32."""
    blocks = _blocks_of(x, block, "MXFP4")
    s = e8m0_to_float(mx_scale_exponents(blocks, "spec")).unsqueeze(1)
    return (e2m1_decode(e2m1_encode(blocks / s)) * s).reshape(x.shape)


def nv_fake_quantize(x: torch.Tensor, block: int = NV_BLOCK) -> torch.Tensor:
    """Quantize-dequantize ``x`` as NVFP4 along its last dimension, float32: the per-tensor scale is
    taken per row of the last dimension (a token, for activations)."""
    blocks = _blocks_of(x, block, "NVFP4")
    rows = blocks.reshape(-1, x.shape[-1] // block, block)
    glob = nv_global_scale(rows.abs().amax(dim=(1, 2)))  # (tokens,)
    per_block = glob.repeat_interleave(rows.shape[1])
    s = (nv_block_scales(blocks, per_block).to(torch.float32) * per_block).unsqueeze(1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return (e2m1_decode(e2m1_encode(blocks / safe)) * s).reshape(x.shape)


def fp4_fake_quantize(x: torch.Tensor, act_format: str) -> torch.Tensor:
    """``mxfp4`` or ``nvfp4`` quantize-dequantize of ``x`` along its last dimension, in ``x``'s dtype."""
    fn = mx_fake_quantize if act_format == "mxfp4" else nv_fake_quantize
    return fn(x).to(x.dtype)


def fp4_scales(weight_format: str, scales: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    """The float32 scale of every block of a stored ``mxfp4`` / ``nvfp4`` weight, shape of ``scales``:
    ``2**(e - 127)``, or the E4M3 block scale times the per-tensor scale ``aux`` (rounded to
    float32 once, so every kernel multiplies codes by the same number)."""
    if weight_format == "mxfp4":
        if scales.dtype != torch.uint8:
            raise ValueError(f"mxfp4 scales must be uint8 E8M0 exponents, got {scales.dtype}")
        return e8m0_to_float(scales)
    if scales.dtype != torch.float8_e4m3fn:
        raise ValueError(f"nvfp4 scales must be float8_e4m3fn, got {scales.dtype}")
    if aux is None or aux.numel() != 1 or aux.dtype != torch.float32:
        raise ValueError("nvfp4 needs its float32 per-tensor scale (one element) as aux")
    return scales.to(torch.float32) * aux.reshape(())
