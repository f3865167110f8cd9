"""Low-rank branch (SVDQuant): a 16-bit rank-``r`` part of the weight kept beside the quantized residual.

With ``QuantSpec(low_rank=...)`` a layer stores ``W ~= A B + Q(W - A B)``: ``A`` (``out x r``) and
``B`` (``r x in``) are the top-``r`` singular triplets of the weight (``A = U_r sqrt(S_r)``,
``B = sqrt(S_r) V_r^T``, computed in float64), and only the residual ``R = W - A B`` is quantized by
the layer's format. The largest singular directions carry the weight's outliers, so the residual
has smaller ranges (SVDQuant, Li et al., ICLR 2025; nunchaku). At run time
``y = Q(x) Q(R)^T + (x B^T) A^T``: the branch reads the layer's *unquantized* input (after any
online input rotation, before activation quantization), see ``QuantLinear._add_low_rank``.

Two tensors are stored beside the format's own (names in :data:`TENSORS`), both float16 whatever
the model's dtype (so the stored shapes and dtypes follow from the config alone, as for outliers):

* ``lowrank_a``: ``(out, r)``;
* ``lowrank_b``: ``(r, in)``.

The rank of a layer (:func:`rank`) is ``low_rank`` itself when it is an integer, or, when it is a
float ``b``, the largest rank whose two factors cost at most ``b`` extra bits per weight:
``r = floor(b * out * in / (16 * (out + in)))`` (at least 1): every layer pays at most the same
extra bits per weight, and the rank needs no data (every host knows the stored shapes).
:func:`choose_ranks` instead picks each layer's rank from its weight's energy and writes the
ranks into the config as per-layer integer overrides.

Every format gets this through :class:`~piecewise_quant.formats.base.WeightFormat`, which routes
``layout``, ``quantize``, ``fit``, ``encode`` and ``dequantize`` here when a layer has a low-rank
branch (the format's own methods see the residual and the layer without it, :func:`dense_layer`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable

import torch

from ._routing import route
from .config import LayerSpec

if TYPE_CHECKING:
    from .formats.base import TensorLayout, WeightFormat

__all__ = [
    "TENSORS", "STORE_DTYPE", "EXACT_SVD_MAX", "has_low_rank", "rank", "check_rank", "top_singular", "dense_layer",
    "split_tensors", "factors", "residual", "product", "with_factors", "low_rank_layout", "add_to_weight", "branch",
    "factors_as", "choose_ranks",
]

A, B = "lowrank_a", "lowrank_b"
TENSORS = (A, B)
#: the factors' storage dtype: float16 for every model (bfloat16 models included) so the layout is
#: known from the config alone; float16 keeps 3 more mantissa bits than bfloat16, and the balanced
#: split ``sqrt(S)`` keeps the factors' magnitudes near the square root of the weight's norm
STORE_DTYPE = torch.float16
#: the bits of one stored factor entry
_ENTRY_BITS = 16


def has_low_rank(layer: LayerSpec) -> bool:
    """Whether ``layer``'s spec keeps a low-rank branch (specs from before the field have none)."""
    return getattr(layer.spec, "low_rank", None) is not None


def rank(layer: LayerSpec) -> int:
    """The layer's rank ``r``: ``low_rank`` (an int), or the rank a float budget of extra bits per
    weight buys (at least 1). :func:`check_rank` (run when a layer is planned) refuses a rank that
    is not smaller than ``min(out_features, in_features)``; a tensor-parallel slice of a planned
    layer keeps the whole layer's rank (its spec holds it as an int)."""
    lr = layer.spec.low_rank
    if isinstance(lr, int):
        return lr
    out, inn = layer.out_features, layer.in_features
    return max(1, math.floor(lr * out * inn / (_ENTRY_BITS * (out + inn))))


def check_rank(layer: LayerSpec) -> None:
    """Raise ``ValueError`` naming ``low_rank`` when the layer's rank is not smaller than
    ``min(out_features, in_features)`` (a full-rank branch would store the weight twice, in 16 bits)."""
    if not has_low_rank(layer):
        return
    lr, r = layer.spec.low_rank, rank(layer)
    out, inn = layer.out_features, layer.in_features
    what = f"low_rank={lr}" if isinstance(lr, int) else f"low_rank={lr!r} (a budget of {lr:g} extra bits per weight: rank {r})"
    if r >= min(out, inn):
        raise ValueError(
            f"layer {layer.name!r}: {what} must be smaller than min(out_features, in_features) = {min(out, inn)} "
            f"of its {out}x{inn} weight; lower low_rank, or give this layer another one (or None) through overrides"
        )


def dense_layer(layer: LayerSpec) -> LayerSpec:
    """``layer`` without the low-rank branch: what the format's own methods see (the residual)."""
    return dataclasses.replace(layer, spec=dataclasses.replace(layer.spec, low_rank=None))


def split_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The format's own tensors (without the two factors)."""
    return {k: v for k, v in tensors.items() if k not in TENSORS}


def low_rank_layout(layer: LayerSpec) -> dict[str, "TensorLayout"]:
    from .formats.base import TensorLayout

    r = rank(layer)
    return {A: TensorLayout((layer.out_features, r), STORE_DTYPE), B: TensorLayout((r, layer.in_features), STORE_DTYPE)}


#: matrices whose smaller side is at most this get a full SVD; larger ones the randomized one
EXACT_SVD_MAX = 1024
_OVERSAMPLE, _POWER_ITERATIONS = 16, 4


def top_singular(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``r`` singular triplets ``(U (m, r), S (r,), V^T (r, n))`` of the float64 ``w``.

    A full SVD for matrices whose smaller side is at most :data:`EXACT_SVD_MAX`; above, the
    randomized range finder of Halko, Martinsson and Tropp (2011): ``r + 16`` Gaussian probes
    from a generator seeded 0 (so the same weight always gives the same factors), 4 power
    iterations re-orthonormalised by QR, then an exact SVD of the ``(r + 16, n)`` projection. A
    full float64 SVD of a 4096 x 4096 weight takes 73 s on one thread; this takes a few seconds,
    and ``W - A B`` is quantized against whatever factors are stored, so only how much of the
    weight the branch captures depends on it (see docs/low-rank.md)."""
    m, n = w.shape
    k = min(r + _OVERSAMPLE, m, n)
    if min(m, n) <= EXACT_SVD_MAX or k >= min(m, n):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    g = torch.Generator(device=w.device).manual_seed(0)
    q = torch.linalg.qr(w @ torch.randn(n, k, generator=g, dtype=w.dtype, device=w.device)).Q
    for _ in range(_POWER_ITERATIONS):
        q = torch.linalg.qr(w.T @ q).Q
        q = torch.linalg.qr(w @ q).Q
    ub, s, vh = torch.linalg.svd(q.T @ w, full_matrices=False)
    return (q @ ub[:, :r]), s[:r], vh[:r]


def factors(weight: torch.Tensor, layer: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored factors ``A`` ``(out, r)`` and ``B`` ``(r, in)`` (float16) of ``weight``: its
    top-``r`` singular triplets from a float64 SVD (:func:`top_singular`), split ``A = U sqrt(S)``, ``B = sqrt(S) V^T``
    (equal norms, so neither factor over- or underflows float16 first). Deterministic: the same
    weight always gives the same factors (fit and encode both call it)."""
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise ValueError(
            f"layer {layer.name!r}: weight has shape {tuple(weight.shape)}, expected {(layer.out_features, layer.in_features)}"
        )
    w = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"layer {layer.name!r}: the weight contains NaN or Inf; quantizing it would corrupt the model")
    r = rank(layer)
    u, s, vh = top_singular(w, r)
    root = s.sqrt()
    a, b = u * root, root.unsqueeze(1) * vh
    big = max(float(a.abs().max()), float(b.abs().max())) if a.numel() else 0.0
    if big > torch.finfo(STORE_DTYPE).max:
        raise ValueError(
            f"layer {layer.name!r}: a low-rank factor entry of {big:.3g} overflows float16; this weight cannot keep "
            "a float16 low-rank branch, set low_rank=None for it through overrides"
        )
    return a.to(STORE_DTYPE).contiguous(), b.to(STORE_DTYPE).contiguous()


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A B`` of the stored (float16) factors, exactly as float64."""
    return a.to(torch.float64) @ b.to(torch.float64)


def residual(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``W - A B`` (float32) with the *stored* factors, so the quantized part plus the branch is the
    weight up to the residual's quantization error only."""
    return (weight.detach().to(torch.float64) - product(a, b).to(weight.device)).to(torch.float32)


def add_to_weight(weight: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``weight`` (the dequantized residual, ``(out, in)``) plus ``A B``, in ``weight``'s dtype."""
    ab = product(tensors[A], tensors[B]).to(weight.device)
    return (weight.to(torch.float64) + ab).to(weight.dtype)


def branch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(x B^T) A^T`` in ``x``'s dtype: the low-rank branch's share of ``y`` for inputs ``x`` ``(..., in)``."""
    return torch.nn.functional.linear(torch.nn.functional.linear(x, b.to(x.dtype)), a.to(x.dtype))


def factors_as(buffers: Any, dtype: torch.dtype, cached: tuple | None = None) -> tuple:
    """``(key, A, B)``: a layer's stored factors cast to the compute ``dtype``, recast only when the
    stored tensors changed (new storage, an in-place write, a move) or the dtype did, so the
    float16 -> float32 cast is not paid on every call."""
    a, b = buffers[A], buffers[B]
    key = (a.data_ptr(), b.data_ptr(), a._version, b._version, a.device, dtype)
    if cached is not None and cached[0] == key:
        return cached
    return key, a.to(dtype), b.to(dtype)


def choose_ranks(model: torch.nn.Module, config: Any, energy: float) -> Any:
    """A copy of ``config`` whose ``overrides`` give every planned low-rank layer of ``model`` the
    smallest rank whose singular values hold at least ``energy`` (a share in (0, 1)) of the
    weight's squared Frobenius norm, capped by the rank the config gives it (an int, or what its
    budget buys), at least 1.

    The chosen ranks are written as per-layer overrides (integers), so the saved config still
    gives every host the stored shapes. Computed on the float ``model``'s weights as they are now:
    a rotation is orthogonal and keeps the singular values; SmoothQuant's scales are not seen.
    Layers without ``low_rank`` in ``config`` are left as they are."""
    from .config import PiecewiseQuantConfig
    from .quantization import plan_layers

    if not isinstance(config, PiecewiseQuantConfig):
        raise TypeError(f"config must be a PiecewiseQuantConfig, got {type(config).__name__}")
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy < 1:
        raise ValueError(f"energy must be a share of the weight's energy in (0, 1), e.g. 0.2; got {energy!r}")
    default = config.default_spec
    overrides: dict[str, dict[str, Any]] = {}
    for name, layer in plan_layers(model, config).items():
        if not has_low_rank(layer):
            continue
        w = model.get_submodule(name).weight.detach().to(torch.float64)
        cap = rank(layer)  # only the top `cap` singular values matter; the total is ||W||_F^2
        s2 = top_singular(w, cap)[1].square()
        total = float(w.square().sum())
        r = int((s2.cumsum(0) < energy * total).sum()) + 1 if total > 0 else 1
        overrides[name] = {**layer.spec.changes_from(default), "low_rank": max(1, min(r, cap))}
    return config.with_overrides(overrides)


# ---- the routing of a format's methods (see formats/base.py) ---------------------------------------


def layout(fmt: "WeightFormat", layer: LayerSpec) -> dict[str, "TensorLayout"]:
    return {**fmt.layout(dense_layer(layer)), **low_rank_layout(layer)}


def quantize(fmt: "WeightFormat", weight: torch.Tensor, layer: LayerSpec) -> dict[str, torch.Tensor]:
    """``fmt.quantize`` of the residual ``W - A B``, plus the factors."""
    a, b = factors(weight, layer)
    return with_factors(fmt.quantize(residual(weight, a, b), dense_layer(layer)), a, b)


def fit(fmt: "WeightFormat", groups: torch.Tensor, layer: LayerSpec,
        importance: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``fmt.fit`` of the residual's groups. ``groups`` must be the whole weight's
    ``group_view`` (the factors come from the whole matrix); GPTQ fits the residual itself."""
    from .formats.groups import group_view

    n = layer.out_features * layer.in_features
    if groups.numel() != n:
        raise ValueError(
            f"layer {layer.name!r}: a low-rank layer's groups are fitted on its whole weight ({n} weights), "
            f"got {groups.numel()}; this calibration step does not support low_rank (use GPTQ or the default fit)"
        )
    weight = groups.reshape(layer.out_features, layer.in_features)
    a, b = factors(weight, layer)
    dl = dense_layer(layer)
    return fmt.fit(group_view(residual(weight, a, b), dl), dl, importance=importance)


def encode(fmt: "WeightFormat", weight: torch.Tensor, params: dict[str, torch.Tensor],
           layer: LayerSpec) -> dict[str, torch.Tensor]:
    """``fmt.encode`` of the residual on ``params`` (fitted by :func:`fit` on the same weight), plus the factors."""
    a, b = factors(weight, layer)
    return with_factors(fmt.encode(residual(weight, a, b), params, dense_layer(layer)), a, b)


def with_factors(tensors: dict[str, torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """The residual's stored ``tensors`` plus the factors (on the tensors' device)."""
    device = next(iter(tensors.values())).device
    return {**tensors, A: a.to(device), B: b.to(device)}


def dequantize(fmt: "WeightFormat", tensors: dict[str, torch.Tensor], layer: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return add_to_weight(fmt.dequantize(split_tensors(tensors), dense_layer(layer), work), tensors).to(dtype)


def _handle(fmt: "WeightFormat", name: str, a: list, layer: LayerSpec) -> Any:
    if name == "layout":
        return layout(fmt, layer)
    if name == "quantize":
        return quantize(fmt, a[0], layer)
    if name == "fit":
        return fit(fmt, a[0], layer, a[2] if len(a) > 2 else None)
    if name == "encode":
        return encode(fmt, a[0], a[1], layer)
    return dequantize(fmt, a[0], layer, a[2])


def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (one of :data:`WRAPPED`) of a format class, routed through this module when the
    layer has a low-rank branch (:func:`piecewise_quant._routing.route`)."""
    return route(name, method, has_low_rank, _handle)


WRAPPED = ("layout", "quantize", "fit", "encode", "dequantize")
