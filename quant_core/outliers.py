"""Dense-and-sparse weights: a few outliers per group kept exactly beside the dense codes.

With ``QuantSpec(outliers=...)`` every weight group keeps ``K`` weights (a fixed count, so every
host knows the stored shapes from the config alone) as float16 *corrections*: the stored weight is
``dense(W) + S`` where ``S`` holds, at each outlier, ``w - dense(w)``. The dense codes are fitted
with the outliers left out (their importance is zero and their value is replaced by the group
median), so they do not stretch the ranges (SpQR, SqueezeLLM, LLM-MQ; docs/outliers.md).

Two tensors are stored beside the format's own (names in :data:`TENSORS`):

* ``outlier_idx``: ``(out, n_groups * K)`` position of each outlier inside its group (uint8 for
  groups up to 256 weights, int16 up to 32768, else int32), so a slice of whole groups needs no
  re-indexing;
* ``outlier_vals``: ``(out, n_groups * K)`` float16 correction.

Every built-in format (and every plugin format with the calibration interface) gets this through
:class:`~piecewise_quant.formats.base.WeightFormat`, which routes ``layout``, ``fit``, ``encode``
and ``dequantize`` here when a layer has outliers; ``QuantLinear`` adds ``x S^T`` to the dense
result (:mod:`piecewise_quant.kernels.sparse_add`).
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
    "TENSORS", "per_group", "group_width", "index_dtype", "dense_layer", "outlier_layout", "select",
    "fit_without", "encode_with", "outlier_tensors", "gptq_select", "outlier_matrix", "add_to_weight",
    "global_columns", "split_tensors", "has_outliers", "check_positions",
]

IDX, VALS = "outlier_idx", "outlier_vals"
TENSORS = (IDX, VALS)


def has_outliers(layer: LayerSpec) -> bool:
    """Whether ``layer``'s spec keeps outliers (specs from before the field have none)."""
    return getattr(layer.spec, "outliers", None) is not None


def group_width(layer: LayerSpec) -> int:
    """Weights per outlier group: the quantization group (the whole row for per-channel)."""
    if layer.group_size == -1:
        raise ValueError(f"layer {layer.name!r}: outliers are counted per group; per-tensor scales have no groups")
    return layer.group_size


def per_group(layer: LayerSpec) -> int:
    """``K``: outliers kept in every group (a fraction is rounded up to a whole count)."""
    o = layer.spec.outliers
    width = group_width(layer)
    k = o if isinstance(o, int) else math.ceil(o * width)
    if k >= width:
        raise ValueError(
            f"layer {layer.name!r}: outliers={o!r} keeps {k} of every {width} weights; lower outliers "
            f"(it must leave dense weights in each group of {width})"
        )
    return k


def index_dtype(width: int) -> torch.dtype:
    """The narrowest integer dtype that holds a position inside a group of ``width``."""
    if width <= 256:
        return torch.uint8
    return torch.int16 if width <= 32768 else torch.int32


def dense_layer(layer: LayerSpec) -> LayerSpec:
    """``layer`` without outliers: what the format's own methods see."""
    return dataclasses.replace(layer, spec=dataclasses.replace(layer.spec, outliers=None))


def outlier_layout(layer: LayerSpec) -> dict[str, "TensorLayout"]:
    from .formats.base import TensorLayout

    n = layer.n_groups * per_group(layer)
    return {
        IDX: TensorLayout((layer.out_features, n), index_dtype(group_width(layer))),
        VALS: TensorLayout((layer.out_features, n), torch.float16),
    }


def split_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The format's own tensors (without the outlier ones)."""
    return {k: v for k, v in tensors.items() if k not in TENSORS}


def select(score: torch.Tensor, k: int) -> torch.Tensor:
    """Positions ``(n, k)`` (ascending) of the ``k`` largest scores in each row of ``score`` ``(n, g)``."""
    return score.topk(k, dim=1).indices.sort(dim=1).values


def _median_fill(groups: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    med = groups.median(dim=1, keepdim=True).values
    return groups.scatter(1, idx, med.expand(-1, idx.shape[1]))


def fit_without(fmt: "WeightFormat", groups: torch.Tensor, layer: LayerSpec, importance: torch.Tensor | None,
                idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The format's fit of ``groups`` ``(n, g)`` with the weights at ``idx`` ``(n, K)`` left out
    (zero importance, value replaced by the group median so they cannot widen a min/max range)."""
    imp = importance if importance is not None else torch.ones_like(groups)
    imp = imp.scatter(1, idx, torch.zeros_like(idx, dtype=imp.dtype))
    return fmt.fit(_median_fill(groups, idx), dense_layer(layer), importance=imp)


def _score(fmt: "WeightFormat", groups: torch.Tensor, layer: LayerSpec, params: dict[str, torch.Tensor] | None,
           importance: torch.Tensor | None) -> torch.Tensor:
    """Outlier saliency per weight of ``groups`` ``(n, g)``.

    ``"magnitude"``: the distance from the group median. ``"hessian"``: with the grid ``params``,
    the squared error on it; without (choosing what the fit leaves out), the squared distance from
    the median weighted by ``importance`` (the input energy, ``diag(H)``): the weights that would
    stretch a range and whose error the output feels most. GPTQ uses its own test (SpQR's
    ``(w - q(w))^2 / [H^-1]_qq``, :func:`gptq_select`)."""
    dist = groups - groups.median(dim=1, keepdim=True).values
    if layer.spec.outlier_method == "magnitude":
        return dist.abs()
    if params is not None:
        return (groups - fmt.fake_quantize(groups, params, dense_layer(layer))) ** 2
    return dist**2 * importance if importance is not None else dist**2


def gptq_select(fmt: "WeightFormat", groups: torch.Tensor, layer: LayerSpec, importance: torch.Tensor | None,
                hinv_diag: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SpQR's outlier test inside GPTQ for ``groups`` ``(n, g)``: the ``K`` weights per group with
    the largest output-error saliency ``(w - q(w))^2 / d^2`` (``d`` ``(n, g)``: the diagonal of the
    Cholesky factor of ``H^-1``) on a grid fitted without the ``K`` farthest from the median, so
    the grid shows what the tails cost. Returns the positions ``(n, K)`` and the group parameters
    fitted without them (refitted only for the groups whose choice changed). ``"magnitude"``
    layers keep the median-distance choice."""
    k = per_group(layer)
    first = select(_score(fmt, groups, layer, None, importance), k)
    params = fit_without(fmt, groups, layer, importance, first)
    if layer.spec.outlier_method == "magnitude":
        return first, params
    err = (groups - fmt.fake_quantize(groups, params, dense_layer(layer))) ** 2
    idx = select(err / hinv_diag.clamp(min=1e-12) ** 2, k)
    changed = (idx != first).any(dim=1).nonzero().squeeze(1)
    if changed.numel():
        imp = importance[changed] if importance is not None else None
        refit = fit_without(fmt, groups[changed], layer, imp, idx[changed])
        params = {name: v.index_copy(0, changed, refit[name].to(v.dtype)) for name, v in params.items()}
    return idx, params


def fit(fmt: "WeightFormat", groups: torch.Tensor, layer: LayerSpec,
        importance: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``fmt.fit`` for a layer with outliers: choose each group's ``K`` outliers, fit without them."""
    idx = select(_score(fmt, groups, layer, None, importance), per_group(layer))
    return fit_without(fmt, groups, layer, importance, idx)


def outlier_tensors(idx: torch.Tensor, corrections: torch.Tensor, layer: LayerSpec) -> dict[str, torch.Tensor]:
    """The stored outlier tensors from per-group positions and corrections, both ``(out * n_groups, K)``."""
    out = layer.out_features
    return {
        IDX: idx.to(index_dtype(group_width(layer))).reshape(out, -1).contiguous(),
        VALS: corrections.to(torch.float16).reshape(out, -1).contiguous(),
    }


def encode_with(fmt: "WeightFormat", weight: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec,
                idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The format's tensors of ``weight`` on ``params`` plus the corrections at ``idx``
    (``(out * n_groups, K)`` positions in each group) that make those weights exact (to float16)."""
    from .formats.groups import group_view

    dl = dense_layer(layer)
    tensors = fmt.encode(weight, params, dl)
    dense = fmt.dequantize(tensors, dl, torch.float32)
    w = group_view(weight.detach().to(torch.float32), dl)
    corr = w.gather(1, idx) - group_view(dense.to(w.device), dl).gather(1, idx)
    return {**tensors, **outlier_tensors(idx, corr, layer)}


def encode(fmt: "WeightFormat", weight: torch.Tensor, params: dict[str, torch.Tensor],
           layer: LayerSpec) -> dict[str, torch.Tensor]:
    """``fmt.encode`` for a layer with outliers: the ``K`` weights per group that ``params``
    represents worst (or the farthest from the median, ``"magnitude"``) become outliers."""
    from .formats.groups import group_view

    groups = group_view(weight.detach().to(torch.float32), dense_layer(layer))
    idx = select(_score(fmt, groups, layer, params, None), per_group(layer))
    return encode_with(fmt, weight, params, layer, idx)


def global_columns(idx: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    """Stored in-group positions ``(out, n_groups * K)`` as int64 input columns."""
    width = group_width(layer)
    k = idx.shape[1] // layer.n_groups
    base = torch.arange(layer.n_groups, device=idx.device, dtype=torch.int64).repeat_interleave(k) * width
    return idx.to(torch.int64) + base


def check_positions(idx: torch.Tensor, layer: LayerSpec) -> None:
    """Refuse stored positions outside their group (a corrupt checkpoint, or one written for
    another group size) before anything reads through them."""
    from .kernels.sparse_add import check_positions as check

    check(idx, group_width(layer), layer.name)


def add_to_weight(weight: torch.Tensor, tensors: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
    """``weight`` (the dense part, ``(out, in)``) plus the stored corrections."""
    check_positions(tensors[IDX], layer)
    cols = global_columns(tensors[IDX], layer).to(weight.device)
    return weight.scatter_add(1, cols, tensors[VALS].to(device=weight.device, dtype=weight.dtype))


def dequantize(fmt: "WeightFormat", tensors: dict[str, torch.Tensor], layer: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
    dense = fmt.dequantize(split_tensors(tensors), dense_layer(layer), torch.float32)
    return add_to_weight(dense, tensors, layer).to(dtype)


def outlier_matrix(buffers: Any, layer: LayerSpec, cached: Any = None) -> Any:
    """The layer's :class:`~piecewise_quant.kernels.sparse_add.OutlierMatrix`, rebuilt only when
    the stored tensors changed (new storage, an in-place write or a move to another device)."""
    from .kernels.sparse_add import OutlierMatrix

    idx, vals = buffers[IDX], buffers[VALS]
    key = (idx.data_ptr(), vals.data_ptr(), idx._version, vals._version, idx.device)
    if cached is not None and cached.key == key:
        return cached
    return OutlierMatrix(idx, vals, layer.in_features, per_group(layer), group_width(layer), key, layer.name)


def layout(fmt: "WeightFormat", layer: LayerSpec) -> dict[str, "TensorLayout"]:
    if not fmt.supports_calibration:
        raise ValueError(
            f"layer {layer.name!r}: grid {fmt.name!r} cannot keep outliers (it has no fit()/encode()); set outliers=None"
        )
    return {**fmt.layout(dense_layer(layer)), **outlier_layout(layer)}


def _handle(fmt: "WeightFormat", name: str, a: list, layer: LayerSpec) -> Any:
    if name == "layout":
        return layout(fmt, layer)
    if name == "fit":
        return fit(fmt, a[0], layer, a[2] if len(a) > 2 else None)
    if name == "encode":
        return encode(fmt, a[0], a[1], layer)
    return dequantize(fmt, a[0], layer, a[2])


def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (``layout``, ``fit``, ``encode`` or ``dequantize``) of a format class, routed
    through this module when the layer has outliers (:func:`piecewise_quant._routing.route`)."""
    return route(name, method, has_outliers, _handle)


WRAPPED = ("layout", "fit", "encode", "dequantize")
