"""GPTQ error compensation for any weight grid that implements the calibration interface.

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023) quantizes a Linear layer's weight one input column at a time and, after
each column, updates the columns not yet quantized so that the layer's *output* error on
calibration inputs stays small. With ``H = 2/n * sum_t x_t^T x_t`` (the Hessian of the layer's
squared output error), quantizing column ``q`` to ``quant(w_q)`` and compensating optimally with
the remaining columns costs ``(w_q - quant(w_q))^2 / [H^-1]_qq``; the updates come from the rows
of the upper Cholesky factor of ``H^-1`` and are applied lazily, ``block_size`` columns at a time.

Nothing here knows about a particular grid: the per-group parameters come from
:meth:`WeightFormat.fit`, every column is rounded with :meth:`WeightFormat.fake_quantize` and the
result is stored with :meth:`WeightFormat.encode`, so the uniform, piecewise and FP8 grids (and any
plugin grid implementing those three methods) all work.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import LayerSpec
from ..formats.base import WeightFormat
from ..formats.groups import group_view, importance_view

__all__ = ["GPTQResult", "HessianAccumulator", "hessian_from_inputs", "gptq_quantize"]

logger = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 4
DAMP_GROWTH = 10.0


@dataclass
class GPTQResult:
    """What :func:`gptq_quantize` produced for one layer.

    Attributes:
        tensors: the stored tensors (``fmt.encode`` output, matching ``fmt.layout(layer)``), ready
            for ``QuantLinear.load_quantized``.
        weight: the dequantized float32 ``(out, in)`` weight those tensors represent.
        params: the per-group parameters used (``(n_groups_total,)`` tensors in ``group_view`` order).
        damp: the relative dampening finally used (a multiple of ``mean(diag(H))``).
        error: the GPTQ objective of the result, ``sum_rows (W - Q) H (W - Q)^T / 2`` with the
            undamped ``H``; for ``H`` from :class:`HessianAccumulator` this is the mean over tokens
            of the squared output error ``||x W^T - x Q^T||^2``.
        n_dead: input columns whose Hessian diagonal was 0 (never active); their weights are 0.
    """

    tensors: dict[str, torch.Tensor]
    weight: torch.Tensor
    params: dict[str, torch.Tensor]
    damp: float
    error: float
    n_dead: int = 0


class HessianAccumulator:
    """Accumulates ``H = 2/n * sum_t x_t^T x_t`` over a layer's inputs ``x`` ``(..., in_features)``.

    The sum is kept in ``dtype`` (float64 by default, so millions of tokens add up without loss);
    :attr:`hessian` returns float32. Use :meth:`add` directly, or :meth:`hook` as a forward hook of
    the layer (``linear.register_forward_hook(acc.hook)``).
    """

    def __init__(
        self,
        in_features: int,
        name: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
        self.in_features = in_features
        self.name = name
        self.dtype = dtype
        self._sum: torch.Tensor | None = None
        self._device = torch.device(device) if device is not None else None
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the inputs ``x`` ``(..., in_features)`` (any leading dimensions are tokens)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"layer {self.name!r}: inputs must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"layer {self.name!r}: inputs have shape {tuple(x.shape)}, expected (..., {self.in_features})"
            )
        x = x.detach().reshape(-1, self.in_features)
        if x.shape[0] == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"layer {self.name!r}: the calibration inputs contain NaN or Inf; the Hessian would be "
                "corrupt (check the calibration data and the layers before this one)"
            )
        device = self._device or x.device
        dtype = self.dtype
        if dtype == torch.float64 and device.type == "mps":  # no float64 there
            dtype = torch.float32
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=dtype, device=device)
        xd = x.to(device=self._sum.device, dtype=self._sum.dtype)
        self._sum.addmm_(xd.t(), xd)
        self.n_tokens += int(x.shape[0])

    def hook(self, module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        """Forward-hook signature: accumulates the module's first input."""
        self.add(inputs[0])

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n * sum x^T x`` as a float32 ``(in_features, in_features)`` tensor."""
        if self._sum is None or self.n_tokens == 0:
            raise ValueError(f"layer {self.name!r}: no calibration inputs were accumulated; the Hessian is undefined")
        return (self._sum * (2.0 / self.n_tokens)).to(torch.float32)


def hessian_from_inputs(x: torch.Tensor, name: str = "") -> torch.Tensor:
    """``H = 2/n * sum_t x_t^T x_t`` (float32) of inputs ``x`` ``(..., in_features)``."""
    acc = HessianAccumulator(int(x.shape[-1]), name=name, device=x.device)
    acc.add(x)
    return acc.hessian


def _inverse_cholesky(h: torch.Tensor, damp: float, base: float, layer: LayerSpec) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp*base*I)^-1``; on failure retry with a 10x larger damp."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    rel = float(damp)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        hd = h + (rel * base) * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            diag = torch.diagonal(u)
            if int(info) == 0 and bool(torch.isfinite(u).all()) and bool((diag > 0).all()):
                return u, rel
        if attempt < MAX_DAMP_RETRIES:
            new = rel * DAMP_GROWTH if rel > 0 else 0.01
            logger.warning(
                "layer %r: the GPTQ Hessian is not positive definite with damp=%g; retrying with damp=%g",
                layer.name, rel, new,
            )
            rel = new
    raise ValueError(
        f"layer {layer.name!r}: the GPTQ Hessian is not positive definite even with damp={rel:g} "
        f"(relative to mean(diag(H))={base:.4g}); it is not a valid sum of x^T x. Check the calibration "
        "inputs, or pass a larger damp"
    )


def _check_params(params: dict[str, torch.Tensor], n: int, layer: LayerSpec, device: torch.device) -> dict[str, torch.Tensor]:
    if not isinstance(params, dict) or not params:
        raise ValueError(f"layer {layer.name!r}: params must be a non-empty dict of per-group tensors")
    out = {}
    for k, v in params.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (n,):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"layer {layer.name!r}: params[{k!r}] has shape {shape}, expected ({n},) (one per group)")
        out[k] = v.detach().to(device)
    return out


def _column_params(params: dict[str, torch.Tensor], layer: LayerSpec) -> list[dict[str, torch.Tensor]]:
    """For every group index along the input dimension, its parameters for each output row (``(out,)``)."""
    out_f = layer.out_features
    if layer.group_size == -1:
        return [{k: v.reshape(1).expand(out_f).contiguous() for k, v in params.items()}]
    ng = layer.n_groups
    return [{k: v.reshape(out_f, ng)[:, j].contiguous() for k, v in params.items()} for j in range(ng)]


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    layer: LayerSpec,
    fmt: WeightFormat,
    *,
    params: dict[str, torch.Tensor] | None = None,
    act_order: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    activation_aware: bool = True,
) -> GPTQResult:
    """Quantize ``weight`` ``(out, in)`` with GPTQ error compensation (Frantar et al., ICLR 2023).

    Args:
        weight: the float weight of the layer.
        hessian: ``(in, in)`` ``2/n * sum x^T x`` of the layer's calibration inputs
            (:class:`HessianAccumulator`).
        layer: the layer's :class:`LayerSpec` (grid, bits and group size).
        fmt: its :class:`WeightFormat`; it must implement ``fit``/``fake_quantize``/``encode``.
        params: fixed per-group parameters (e.g. from learned clipping), used as they are.
        act_order: quantize columns by decreasing ``diag(H)`` (group parameters then come from the
            original weight, and groups stay the contiguous groups of the original column order).
        damp: ``damp * mean(diag(H))`` is added to the diagonal; if the Hessian is still not
            positive definite the damp is raised 10x, up to 4 times (each logged as a warning).
        block_size: columns per lazy batch update.
        activation_aware: weight each weight's error by ``diag(H)`` of its column when fitting the
            group parameters.

    Without ``params`` and ``act_order``, groups are fitted lazily: when the sweep reaches a group's
    first column, from that group's error-updated weights (as GPTQ does). Per-channel and
    per-tensor parameters are always fitted up front from the original weight.

    Raises ``ValueError`` for a grid without the calibration interface, mismatched shapes,
    NaN/Inf in the weight or Hessian, or a Hessian that stays non positive definite.
    """
    if not isinstance(fmt, WeightFormat) or not fmt.supports_calibration:
        name = getattr(fmt, "name", type(fmt).__name__)
        raise ValueError(
            f"layer {layer.name!r}: grid {name!r} does not implement the calibration interface; GPTQ needs "
            "fit()/fake_quantize()/encode() to choose group parameters, round columns and store the result"
        )
    out_f, in_f = layer.out_features, layer.in_features
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (out_f, in_f):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"layer {layer.name!r}: weight has shape {shape}, expected {(out_f, in_f)}")
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (in_f, in_f):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"layer {layer.name!r}: Hessian has shape {shape}, expected {(in_f, in_f)} (in_features squared)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite non-negative number, got {damp!r}")
    device = weight.device
    W = weight.detach().to(torch.float32).clone()
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"layer {layer.name!r}: the weight contains NaN or Inf; quantizing it would corrupt the model")
    H = hessian.detach().to(device=device, dtype=torch.float32).clone()
    if not bool(torch.isfinite(H).all()):
        raise ValueError(
            f"layer {layer.name!r}: the Hessian contains NaN or Inf (check the calibration inputs and the layers before it)"
        )
    H0 = H.clone()  # undamped, for the reported objective

    grouped = layer.group_size not in (-1, in_f)
    gsize = layer.group_size if grouped else in_f
    n_groups_total = 1 if layer.group_size == -1 else out_f * layer.n_groups

    # dead inputs: never active, so their weights cannot matter; GPTQ zeroes them
    diag = torch.diagonal(H)
    dead = diag == 0
    n_dead = int(dead.sum())
    if n_dead:
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        logger.info("layer %r: %d of %d inputs are never active; their weights are set to 0", layer.name, n_dead, in_f)
    live = diag[~dead]
    base = float(live.mean()) if live.numel() else 1.0
    if not (base > 0 and math.isfinite(base)):
        raise ValueError(
            f"layer {layer.name!r}: the Hessian's mean diagonal is {base:.4g}, not positive; it is not a valid "
            "sum of x^T x (check the calibration inputs)"
        )
    col_imp: torch.Tensor | None = None
    if activation_aware:
        col_imp = torch.where(dead, torch.zeros_like(diag), diag).clamp(min=0) / base

    # group parameters known before the sweep
    lazy = params is None and not act_order and grouped
    if params is not None:
        params = _check_params(params, n_groups_total, layer, device)
    elif not lazy:
        imp = importance_view(col_imp, layer) if col_imp is not None else None
        params = fmt.fit(group_view(W, layer), layer, importance=imp)
        params = _check_params(params, n_groups_total, layer, device)
    # per group index along the input dimension: its parameters for every output row
    col_params: list[dict[str, torch.Tensor] | None] = (
        list(_column_params(params, layer)) if params is not None else [None] * layer.n_groups
    )
    fitted: dict[str, list[torch.Tensor]] = {}

    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        order = perm.tolist()
    else:
        perm = None
        order = list(range(in_f))
    group_of = [0 if layer.group_size == -1 else c // gsize for c in order]

    U, used_damp = _inverse_cholesky(H, damp, base, layer)
    del H

    Q = torch.zeros_like(W)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            j = group_of[col]
            if lazy and col % gsize == 0:
                # the group's current (error-updated) weights: in-block columns from W1, later ones
                # with this block's pending updates applied
                end = col + gsize
                inside = W1[:, i:min(end, i2) - i1]
                if end > i2:
                    later = W[:, i2:end] - Err1[:, :i] @ U[i1:col, i2:end]
                    cur = torch.cat([inside, later], dim=1)
                else:
                    cur = inside
                imp = col_imp[col:end].unsqueeze(0).expand(out_f, gsize) if col_imp is not None else None
                p = fmt.fit(cur.contiguous(), layer, importance=imp)
                for k, v in p.items():
                    if tuple(v.shape) != (out_f,):
                        raise ValueError(
                            f"layer {layer.name!r}: {fmt.name!r}.fit returned params[{k!r}] of shape "
                            f"{tuple(v.shape)} for {out_f} groups"
                        )
                    fitted.setdefault(k, [v.new_zeros(())] * layer.n_groups)[j] = v.to(device)
                col_params[j] = {k: v.to(device) for k, v in p.items()}
            w = W1[:, i]
            d = U1[i, i]
            pj = col_params[j]
            assert pj is not None
            q = fmt.fake_quantize(w.unsqueeze(1), pj, layer).reshape(out_f)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        if i2 < in_f:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)

    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
    if lazy:
        params = {k: torch.stack(v, dim=1).reshape(-1) for k, v in fitted.items()}  # (out, ng) row-major
    assert params is not None

    tensors = fmt.encode(Q, params, layer)
    deq = fmt.dequantize(tensors, layer, torch.float32).to(device)
    tol = 1e-6 * max(float(Q.abs().max()), 1e-30) if Q.numel() else 0.0
    diff = float((deq - Q).abs().max()) if Q.numel() else 0.0
    if not diff <= tol:
        raise RuntimeError(
            f"layer {layer.name!r}: grid {fmt.name!r}: encode() does not reproduce the values fake_quantize() "
            f"chose (max difference {diff:.3g}); the format's fake_quantize and encode disagree"
        )
    delta = weight.detach().to(device=device, dtype=torch.float32) - deq
    error = float(((delta @ H0) * delta).sum()) / 2.0
    return GPTQResult(tensors=tensors, weight=deq, params=params, damp=used_damp, error=error, n_dead=n_dead)
