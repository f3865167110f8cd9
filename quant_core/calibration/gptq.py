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

For a layer with dense-and-sparse outliers (``QuantSpec.outliers``) each group's outliers are
chosen by SpQR's saliency ``(w - q(w))^2 / U_qq^2`` before the group is quantized (up front with
``act_order``, else when the sweep reaches the group), the group is fitted without them, and they
are kept exact (to their float16 correction), so they spread no error (:mod:`piecewise_quant.outliers`).

For a layer with a low-rank branch (``QuantSpec.low_rank``) GPTQ quantizes the residual
``W - A B``; the branch is exact, so the error feedback spreads only the residual's rounding
(:mod:`piecewise_quant.lowrank`).

As a calibration modifier (:class:`GPTQ`) it quantizes each block's calibrated layers after their
group parameters are chosen; parameters fixed before (learned by LWC) are kept.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import lowrank, outliers
from ..config import LayerSpec
from ..formats.base import WeightFormat
from ..formats.groups import group_view, importance_view
from ..token_mask import real_tokens
from .modifier import Modifier, check_bool, check_positive
from .smoothing import trace_tensors
from .state import LayerStats, layer_input

if TYPE_CHECKING:
    from ..config import CalibrationConfig
    from .state import BlockState, LayerRecord

__all__ = ["GPTQ", "GPTQResult", "HessianAccumulator", "hessian_from_inputs", "gptq_quantize", "float_target"]

logger = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 4
DAMP_GROWTH = 10.0


@dataclass(frozen=True)
class GPTQ(Modifier):
    """GPTQ error compensation of every calibrated layer (flat form: ``CalibrationConfig(gptq=True,
    act_order=..., true_sequential=..., damp=..., asymmetric=...)``).

    Attributes:
        act_order: process columns by decreasing Hessian diagonal.
        true_sequential: quantize the block's layers in call order (q/k/v, o, gate/up, down), each
            on the inputs the already-quantized layers produce.
        damp: relative dampening of the Hessian (raised tenfold on a failed Cholesky).
        asymmetric: GPTAQ's asymmetric calibration (Li et al., "GPTAQ: Efficient Finetuning-Free
            Quantization for Asymmetric Calibration", ICML 2025): each layer matches the *float*
            layer's output on the *float* model's inputs, ``min ||x~ Q^T - x W^T||`` with ``x~`` the
            input on the quantized chain and ``x`` on the float chain, instead of GPTQ's
            ``||x~ Q^T - x~ W^T||``; so it also corrects the error the layers before it left in
            its input. Costs a float copy of the block and a second block pass per stage.
    """

    act_order: bool = True
    true_sequential: bool = True
    damp: float = 0.01
    asymmetric: bool = False

    order = 60
    needs_hessian = True

    def __post_init__(self) -> None:
        check_bool("GPTQ", "act_order", self.act_order)
        check_bool("GPTQ", "true_sequential", self.true_sequential)
        check_positive("GPTQ", "damp", self.damp)
        check_bool("GPTQ", "asymmetric", self.asymmetric)

    def process_block(self, block: BlockState) -> None:
        calibrated = [r.rel for r in block.calibrated]
        if not calibrated:
            return
        ref = None
        if self.asymmetric:
            if block.fp is None:
                raise RuntimeError("GPTQ(asymmetric=True) needs the block's float-chain inputs (BlockState.fp)")
            ref = copy.deepcopy(block.block)  # the block before any of its layers is quantized
        stages = _stages(block.block, block.call_first, calibrated) if self.true_sequential else [sorted(calibrated)]
        for k, stage in enumerate(stages):
            records = [block.records[rel] for rel in stage]
            cross: dict[str, torch.Tensor] = {}
            if ref is not None:
                cross = _collect_cross(block, ref, records)
            elif k > 0:  # inputs as the already-quantized layers of this block produce them
                block.collect_stats(records, hessian=True)
            for rec in records:
                self._quantize(block, rec, cross.get(rec.rel))

    def _quantize(self, block: BlockState, rec: LayerRecord, cross: torch.Tensor | None = None) -> None:
        linear = block.linear(rec)
        weight = linear.weight.detach()
        if cross is not None:
            weight = float_target(weight, rec.stats.xtx, cross, self.damp)
        res = gptq_quantize(
            weight, rec.stats.hessian(), rec.layer, rec.fmt, params=rec.params if rec.params_fixed else None,
            act_order=self.act_order, damp=self.damp, activation_aware=block.run.cal.activation_aware,
        )
        linear.weight.data.copy_(res.weight.to(linear.weight.dtype))
        rec.tensors, rec.tensors_by = res.tensors, "gptaq" if cross is not None else "gptq"
        rec.note = f"damp {res.damp:g}" if res.damp != self.damp else ""

    def flat(self) -> dict[str, Any]:
        return {"gptq": True, "act_order": self.act_order, "true_sequential": self.true_sequential, "damp": self.damp,
                "asymmetric": self.asymmetric}

    @classmethod
    def from_flat(cls, cal: CalibrationConfig) -> GPTQ | None:
        return cls(cal.act_order, cal.true_sequential, cal.damp, cal.asymmetric) if cal.gptq else None


@torch.no_grad()
def _collect_cross(block: BlockState, ref: nn.Module, records: list[LayerRecord]) -> dict[str, torch.Tensor]:
    """Collect the statistics of ``records`` on the quantized chain again (Hessian included, into
    ``rec.stats``) and return, per layer, ``C = sum_t x~_t^T (x_t - x~_t)`` (float32): ``x~`` is
    the layer's input in the block on the quantized chain, ``x`` its input in ``ref`` (the float
    block) on the float chain, token by token of the same batch. A layer whose calls do not pair
    up (e.g. an MoE expert that the two chains route different tokens to) is left out, with a
    warning: GPTQ then fits it to its own output, as without ``asymmetric``."""
    stats = {r.rel: LayerStats() for r in records}
    cross: dict[str, torch.Tensor] = {}
    unpaired: set[str] = set()
    ref_inputs: dict[str, list[torch.Tensor]] = {}
    # q/k/v read one tensor: one product per batch (the input is kept, so its address is not reused)
    shared: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def ref_hook(rel: str):
        def fn(_m: nn.Module, args: tuple) -> None:
            ref_inputs.setdefault(rel, []).append(real_tokens(args[0].detach()).float())
        return fn

    def q_hook(rel: str, name: str):
        def fn(_m: nn.Module, args: tuple) -> None:
            x = layer_input(args[0], name)
            stats[rel].add(x, True)
            pending = ref_inputs.get(rel)
            if rel in unpaired or not pending or pending[0].shape != x.shape:
                unpaired.add(rel)
                return
            xf = pending.pop(0)
            key = (args[0].data_ptr(), tuple(args[0].shape), xf.data_ptr())
            if key not in shared:
                shared[key] = (args[0], x.t() @ (xf - x))
            c = shared[key][1]
            cross[rel] = c.clone() if rel not in cross else cross[rel].add_(c)
        return fn

    handles = [ref.get_submodule(r.rel).register_forward_pre_hook(ref_hook(r.rel)) for r in records]
    handles += [block.block.get_submodule(r.rel).register_forward_pre_hook(q_hook(r.rel, r.name)) for r in records]
    try:
        for i in range(len(block.q)):
            ref_inputs.clear()
            shared.clear()
            block.run.inputs.call(ref, i, block.fp[i])
            block.run.inputs.call(block.block, i, block.q[i])
            unpaired.update(rel for rel, left in ref_inputs.items() if left)  # called more often in the float block
    finally:
        for h in handles:
            h.remove()
    for r in records:
        r.stats = stats[r.rel]
        if r.rel in unpaired:
            cross.pop(r.rel, None)
            logger.warning(
                "asymmetric GPTQ: layer %r is called on different tokens in the float and the quantized model (its "
                "block's routing depends on the weights); it is fitted to its own output, as plain GPTQ does", r.name)
    return cross


def float_target(weight: torch.Tensor, xtx: torch.Tensor, cross: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The weight whose output on the quantized-chain inputs ``x~`` best matches ``weight``'s
    output on the float-chain inputs ``x``: the least-squares solution of ``min ||X~ W'^T - X W^T||``,
    ``W' = W (I + C^T G^-1)`` with ``G = X~^T X~ + damp * mean(diag) * I`` (``xtx = X~^T X~``,
    ``cross = C = X~^T (X - X~)``). Quantizing ``W'`` with GPTQ's Hessian of ``x~`` then minimises
    the error against the float output, since ``||X~ Q^T - X W^T||^2 = ||X~ (Q - W')^T||^2 + const``
    (exactly without dampening). Computed in float64, returned in ``weight``'s dtype."""
    G = xtx.double().clone()
    diag = torch.diagonal(G)
    base = float(diag.mean())
    if not math.isfinite(base) or base <= 0:
        return weight  # no signal (every input zero): nothing to correct
    diag += damp * base
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:  # numerically singular even with dampening: keep GPTQ's own target
        logger.warning("asymmetric GPTQ: the input Gram matrix is not positive definite; using the plain GPTQ target")
        return weight
    W = weight.double()
    Z = torch.cholesky_solve(cross.double() @ W.t(), L)  # (in, out) = G^-1 C W^T
    return (W + Z.t()).to(weight.dtype)


@torch.no_grad()
def _stages(block: nn.Module, call, rels: list[str]) -> list[list[str]]:
    """Layers in the order the block calls them, those sharing one input tensor in one stage
    (q/k/v, then o, then gate/up, then down): GPTQ's "true sequential" order."""
    order, _ = trace_tensors(block, call, {rel: block.get_submodule(rel) for rel in rels})
    stages: list[list[str]] = []
    last_ptr = None
    for rel, ptr in order.items():
        if stages and ptr == last_ptr:
            stages[-1].append(rel)
        else:
            stages.append([rel])
        last_ptr = ptr
    seen = {r for st in stages for r in st}
    missing = [r for r in rels if r not in seen]
    if missing:
        stages.append(missing)
    return stages


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
        x = real_tokens(x.detach())  # rows; padding of a padded calibration batch dropped
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
    if lowrank.has_low_rank(layer):
        return _gptq_low_rank(weight, hessian, layer, fmt, params=params, act_order=act_order, damp=damp,
                              block_size=block_size, activation_aware=activation_aware)
    _check_arguments(weight, hessian, layer, fmt, block_size, damp)
    W, H = _float_copies(weight, hessian, layer)
    H0 = H.clone()  # undamped, for the reported objective
    n_dead, base, col_imp = _drop_dead_inputs(W, H, layer, activation_aware)
    grouped = layer.group_size not in (-1, layer.in_features)
    lazy = params is None and not act_order and grouped
    fixed = params is not None
    if not (outliers.has_outliers(layer) and not fixed):  # else fitted with the outliers below
        params = _initial_params(W, layer, fmt, params, lazy, col_imp)
    W, H, perm = _act_order(W, H) if act_order else (W, H, None)
    order = perm.tolist() if perm is not None else list(range(layer.in_features))
    U, used_damp = _inverse_cholesky(H, damp, base, layer)
    del H
    mask = None
    if outliers.has_outliers(layer):
        mask = torch.zeros_like(W, dtype=torch.bool)
        if not lazy:  # chosen up front on the original weight, as the group parameters are
            params = _upfront_outliers(W, U, perm, layer, fmt, params, fixed, col_imp, mask)
    sweep = _Sweep(W, U, layer, fmt, params, order, lazy, col_imp, mask)
    Q = sweep.run(block_size)
    if perm is not None:
        inv = torch.argsort(perm)
        Q, mask = Q[:, inv], (mask[:, inv] if mask is not None else None)
    if lazy:
        params = {k: torch.stack(v, dim=1).reshape(-1) for k, v in sweep.fitted.items()}  # (out, ng) row-major
    assert params is not None
    return _result(weight, Q, params, layer, fmt, H0, used_damp, n_dead, mask)


def _gptq_low_rank(weight: torch.Tensor, hessian: torch.Tensor, layer: LayerSpec, fmt: WeightFormat,
                   **kwargs: Any) -> GPTQResult:
    """GPTQ for a layer with a low-rank branch: the branch ``A B`` (float16 factors of the weight's
    SVD) is exact, so GPTQ quantizes the residual ``W - A B`` and its error feedback sees only the
    residual's rounding; the result's weight is ``Q + A B``."""
    a, b = lowrank.factors(weight, layer)
    res = gptq_quantize(lowrank.residual(weight, a, b), hessian, lowrank.dense_layer(layer), fmt, **kwargs)
    ab = lowrank.product(a, b).to(device=res.weight.device, dtype=torch.float32)
    return dataclasses.replace(res, tensors=lowrank.with_factors(res.tensors, a, b), weight=res.weight + ab)


def _upfront_outliers(W: torch.Tensor, U: torch.Tensor, perm: torch.Tensor | None, layer: LayerSpec,
                      fmt: WeightFormat, params: dict[str, torch.Tensor] | None, fixed: bool,
                      col_imp: torch.Tensor | None, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Choose every group's outliers by SpQR's saliency on the (permuted) weight ``W``, mark them
    in ``mask`` (same column order) and refit the groups without them (fixed parameters stay)."""
    inv = torch.argsort(perm) if perm is not None else None
    Wo = W[:, inv] if inv is not None else W
    d = torch.diagonal(U)
    d = d[inv] if inv is not None else d
    dl = outliers.dense_layer(layer)
    groups = group_view(Wo, dl)
    imp = importance_view(col_imp, layer) if col_imp is not None else None
    hd = importance_view(d, layer)
    if fixed:
        score = (groups - fmt.fake_quantize(groups, params, dl)) ** 2 / hd.clamp(min=1e-12) ** 2
        idx = outliers.select(score, outliers.per_group(layer))
    else:
        idx, params = outliers.gptq_select(fmt, groups, layer, imp, hd)
    m = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True).reshape(W.shape)
    mask.copy_(m[:, perm] if perm is not None else m)
    return _check_params(params, groups.shape[0], layer, W.device)


def _act_order(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Columns by decreasing Hessian diagonal: the permuted weight and Hessian, and the permutation."""
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    return W[:, perm], H[perm][:, perm], perm


def _check_arguments(weight: torch.Tensor, hessian: torch.Tensor, layer: LayerSpec, fmt: WeightFormat,
                     block_size: int, damp: float) -> None:
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


def _float_copies(weight: torch.Tensor, hessian: torch.Tensor, layer: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 working copies of the weight and the Hessian (on the weight's device), checked finite."""
    W = weight.detach().to(torch.float32).clone()
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"layer {layer.name!r}: the weight contains NaN or Inf; quantizing it would corrupt the model")
    H = hessian.detach().to(device=weight.device, dtype=torch.float32).clone()
    if not bool(torch.isfinite(H).all()):
        raise ValueError(
            f"layer {layer.name!r}: the Hessian contains NaN or Inf (check the calibration inputs and the layers before it)"
        )
    return W, H


def _drop_dead_inputs(W: torch.Tensor, H: torch.Tensor, layer: LayerSpec,
                      activation_aware: bool) -> tuple[int, float, torch.Tensor | None]:
    """Zero the weights of never-active inputs (in place; their Hessian diagonal becomes 1). Returns
    how many there were, ``mean(diag(H))`` over the live ones (the damp's unit) and, when
    ``activation_aware``, each column's importance ``diag(H) / base``."""
    diag = torch.diagonal(H)
    dead = diag == 0
    n_dead = int(dead.sum())
    if n_dead:
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        logger.info("layer %r: %d of %d inputs are never active; their weights are set to 0",
                    layer.name, n_dead, layer.in_features)
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
    return n_dead, base, col_imp


def _initial_params(W: torch.Tensor, layer: LayerSpec, fmt: WeightFormat, params: dict[str, torch.Tensor] | None,
                    lazy: bool, col_imp: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
    """The group parameters known before the sweep: the given ones, or a fit of the original
    weight (``None`` when groups are fitted lazily during the sweep)."""
    n_groups_total = 1 if layer.group_size == -1 else layer.out_features * layer.n_groups
    if params is not None:
        return _check_params(params, n_groups_total, layer, W.device)
    if lazy:
        return None
    imp = importance_view(col_imp, layer) if col_imp is not None else None
    params = fmt.fit(group_view(W, layer), layer, importance=imp)
    return _check_params(params, n_groups_total, layer, W.device)


class _Sweep:
    """GPTQ's column sweep over the (permuted) weight ``W`` with the upper Cholesky factor ``U``
    of ``H^-1``: each column is rounded with its group's parameters and its error spread over the
    columns not yet quantized, ``block_size`` columns at a time."""

    def __init__(self, W: torch.Tensor, U: torch.Tensor, layer: LayerSpec, fmt: WeightFormat,
                 params: dict[str, torch.Tensor] | None, order: list[int], lazy: bool, col_imp: torch.Tensor | None,
                 mask: torch.Tensor | None = None):
        self.W, self.U, self.layer, self.fmt, self.lazy, self.col_imp = W, U, layer, fmt, lazy, col_imp
        self.mask = mask  # outliers (dense-and-sparse layers): kept exact, so they spread no error
        self.gsize = layer.group_size if layer.group_size not in (-1, layer.in_features) else layer.in_features
        self.group_of = [0 if layer.group_size == -1 else c // self.gsize for c in order]
        # per group index along the input dimension: its parameters for every output row
        self.col_params: list[dict[str, torch.Tensor] | None] = (
            list(_column_params(params, layer)) if params is not None else [None] * layer.n_groups
        )
        self.fitted: dict[str, list[torch.Tensor]] = {}
        self.dense = outliers.dense_layer(layer) if mask is not None else layer

    def run(self, block_size: int) -> torch.Tensor:
        W, U, in_f = self.W, self.U, self.layer.in_features
        Q = torch.zeros_like(W)
        for i1 in range(0, in_f, block_size):
            i2 = min(i1 + block_size, in_f)
            Q[:, i1:i2], Err1 = self._columns(i1, i2)
            if i2 < in_f:
                W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
        return Q

    def _columns(self, i1: int, i2: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize columns ``i1:i2``; returns them and their scaled errors."""
        W1 = self.W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = self.U[i1:i2, i1:i2]
        out_f = self.layer.out_features
        for i in range(i2 - i1):
            col = i1 + i
            j = self.group_of[col]
            if self.lazy and col % self.gsize == 0:
                self._fit_group(W1, Err1, i1, i2, col, j)
            w = W1[:, i]
            d = U1[i, i]
            pj = self.col_params[j]
            assert pj is not None
            q = self.fmt.fake_quantize(w.unsqueeze(1), pj, self.dense).reshape(out_f)
            if self.mask is not None:  # stored as the dense value plus a float16 correction
                q = torch.where(self.mask[:, col], q + (w - q).to(torch.float16).to(q.dtype), q)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        return Q1, Err1

    def _fit_group(self, W1: torch.Tensor, Err1: torch.Tensor, i1: int, i2: int, col: int, j: int) -> None:
        """Fit group ``j`` on its current (error-updated) weights: in-block columns from ``W1``,
        later ones with this block's pending updates applied."""
        out_f, gsize, layer = self.layer.out_features, self.gsize, self.layer
        end = col + gsize
        inside = W1[:, col - i1:min(end, i2) - i1]
        if end > i2:
            later = self.W[:, i2:end] - Err1[:, :col - i1] @ self.U[i1:col, i2:end]
            cur = torch.cat([inside, later], dim=1)
        else:
            cur = inside
        imp = self.col_imp[col:end].unsqueeze(0).expand(out_f, gsize) if self.col_imp is not None else None
        if self.mask is not None:
            p = self._fit_outliers(cur.contiguous(), imp, col, end)
        else:
            p = self.fmt.fit(cur.contiguous(), layer, importance=imp)
        device = self.W.device
        for k, v in p.items():
            if tuple(v.shape) != (out_f,):
                raise ValueError(
                    f"layer {layer.name!r}: {self.fmt.name!r}.fit returned params[{k!r}] of shape "
                    f"{tuple(v.shape)} for {out_f} groups"
                )
            self.fitted.setdefault(k, [v.new_zeros(())] * layer.n_groups)[j] = v.to(device)
        self.col_params[j] = {k: v.to(device) for k, v in p.items()}

    def _fit_outliers(self, cur: torch.Tensor, imp: torch.Tensor | None, col: int, end: int) -> dict[str, torch.Tensor]:
        """Group ``col:end`` of a dense-and-sparse layer, fitted lazily: choose its outliers by SpQR's
        saliency on the current weights ``cur``, mark them and fit the group without them."""
        assert self.mask is not None
        hd = torch.diagonal(self.U)[col:end].unsqueeze(0).expand_as(cur)
        idx, params = outliers.gptq_select(self.fmt, cur, self.layer, imp, hd)
        self.mask[:, col:end] = torch.zeros_like(cur, dtype=torch.bool).scatter_(1, idx, True)
        return params


def _result(weight: torch.Tensor, Q: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec,
            fmt: WeightFormat, H0: torch.Tensor, used_damp: float, n_dead: int,
            mask: torch.Tensor | None = None) -> GPTQResult:
    """Encode the quantized weight, check that the format reproduces it, and measure the objective."""
    device = weight.device
    if mask is None:
        tensors = fmt.encode(Q, params, layer)
    else:
        dl = outliers.dense_layer(layer)
        idx = outliers.select(group_view(mask, dl).to(torch.float32), outliers.per_group(layer))
        tensors = outliers.encode_with(fmt, Q, params, layer, idx)
    deq = fmt.dequantize(tensors, layer, torch.float32).to(device)
    tol = 1e-6 * max(float(Q.abs().max()), 1e-30) if Q.numel() else 0.0
    # an outlier's float16 correction rounds (it was taken from the dense code GPTQ saw)
    diff = float(((deq - Q).abs() * (~mask if mask is not None else 1)).max()) if Q.numel() else 0.0
    if not diff <= tol:
        raise RuntimeError(
            f"layer {layer.name!r}: grid {fmt.name!r}: encode() does not reproduce the values fake_quantize() "
            f"chose (max difference {diff:.3g}); the format's fake_quantize and encode disagree"
        )
    delta = weight.detach().to(device=device, dtype=torch.float32) - deq
    error = float(((delta @ H0) * delta).sum()) / 2.0
    return GPTQResult(tensors=tensors, weight=deq, params=params, damp=used_damp, error=error, n_dead=n_dead)
