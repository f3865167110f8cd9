"""Channel scaling folded into the previous op: SmoothQuant and the fold groups LET learns on.

SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", ICML 2023) divides each input channel ``j`` of a group of Linear layers by
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and multiplies the matching weight columns by
``s_j``: the product is unchanged, activation outliers move into the weights. The division is
folded into the op that produces the input (a norm's weight, or the rows of a previous Linear),
so inference costs nothing extra.

A *fold group* is a producer (a norm or a Linear) and the Linear layers that consume exactly its
output. Norm groups are found by watching one forward pass (a Linear whose input is the very
tensor a norm returned); Linear-to-Linear groups that pass through attention or a gated MLP
(``v_proj -> o_proj``, ``up_proj -> down_proj``, BERT's ``value -> output.dense``) are known by
name. Every group is verified on calibration data after folding: if the block's output changes
(e.g. a norm computing ``(1 + w) * x``, or an output that also feeds a residual), the fold is
reverted and the group dropped, so smoothing can never silently change the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["FoldGroup", "trace_tensors", "find_fold_groups", "apply_fold", "smoothquant_scales", "verify_folds"]

logger = logging.getLogger(__name__)

# (producer suffix, consumer suffix) of Linear -> Linear pairs whose scaling commutes with what lies
# between them (attention is linear in V; a gated MLP is linear in the up projection)
LINEAR_PAIRS = (
    ("self_attn.v_proj", "self_attn.o_proj"),
    ("attn.v_proj", "attn.o_proj"),
    ("mlp.up_proj", "mlp.down_proj"),
    ("attention.self.value", "attention.output.dense"),
)


@dataclass
class FoldGroup:
    producer: str  # name inside the block
    kind: str  # "norm" or "linear"
    consumers: list[str]
    channels: int
    shift_ok: bool = False  # producer and every consumer have a bias: a shift can be absorbed
    act_absmax: torch.Tensor | None = field(default=None, repr=False)
    act_mean: torch.Tensor | None = field(default=None, repr=False)  # (max + min) / 2 per channel


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return "norm" in type(m).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1


@torch.no_grad()
def trace_tensors(
    block: nn.Module, call, inputs_of: dict[str, nn.Module], outputs_of: dict[str, nn.Module] | None = None
) -> tuple[dict[str, tuple[int, tuple]], dict[str, tuple[int, tuple]]]:
    """Run ``call()`` once and identify, by storage address and shape, the first input of each
    module in ``inputs_of`` and the output of each module in ``outputs_of`` (first call each; the
    inputs dict is in call order). Every watched tensor is kept alive during the call, so no later
    tensor can reuse its memory and look identical."""
    in_ptr: dict[str, tuple[int, tuple]] = {}
    out_ptr: dict[str, tuple[int, tuple]] = {}
    alive: list[torch.Tensor] = []

    def watch(table: dict[str, tuple[int, tuple]], n: str, t: object) -> None:
        if isinstance(t, torch.Tensor) and n not in table:
            alive.append(t)
            table[n] = (t.data_ptr(), tuple(t.shape))

    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: watch(in_ptr, n, a[0] if a else None))
               for n, m in inputs_of.items()]
    handles += [m.register_forward_hook(lambda mod, a, o, n=n: watch(out_ptr, n, o))
                for n, m in (outputs_of or {}).items()]
    try:
        call()
    finally:
        for h in handles:
            h.remove()
        alive.clear()
    return in_ptr, out_ptr


@torch.no_grad()
def find_fold_groups(block: nn.Module, call, quantized: set[str]) -> list[FoldGroup]:
    """Fold groups of ``block`` whose consumers are all in ``quantized`` (names inside the block).
    ``call()`` runs the block once on calibration data."""
    norms = {n: m for n, m in block.named_modules() if n and _is_norm(m)}
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    in_ptr, out_ptr = trace_tensors(block, call, linears, norms)
    groups = []
    for n, ptr in out_ptr.items():
        consumers = sorted(ln for ln, p in in_ptr.items() if p == ptr)
        if consumers and all(c in quantized for c in consumers):
            norm = norms[n]
            bias = getattr(norm, "bias", None)
            shift_ok = isinstance(bias, torch.Tensor) and all(linears[c].bias is not None for c in consumers)
            groups.append(FoldGroup(n, "norm", consumers, norm.weight.numel(), shift_ok))
    for prod_sfx, cons_sfx in LINEAR_PAIRS:
        for n, m in linears.items():
            if not (n == prod_sfx or n.endswith("." + prod_sfx)):
                continue
            cons = n[: len(n) - len(prod_sfx)] + cons_sfx
            if cons not in linears or cons not in quantized or n not in quantized:
                continue
            if linears[cons].in_features != m.out_features:
                continue  # grouped-query attention: V has fewer heads than O has inputs
            shift_ok = m.bias is not None and linears[cons].bias is not None
            groups.append(FoldGroup(n, "linear", [cons], m.out_features, shift_ok))
    return groups


def smoothquant_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (channels that never fired keep ``s_j = 1``)."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    a = act_absmax.float().clamp(min=1e-5)
    s = a.pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    s = torch.where((act_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s.clamp(min=1e-5)


@torch.no_grad()
def apply_fold(block: nn.Module, group: FoldGroup, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Make the producer output ``(x - shift) / scale`` and the consumers compensate exactly."""
    prod = block.get_submodule(group.producer)
    s = scale.detach().to(torch.float32)
    d = None if shift is None else shift.detach().to(torch.float32)
    for c in group.consumers:
        lin = block.get_submodule(c)
        w = lin.weight.data.float()
        if d is not None:
            lin.bias.data += (w @ d).to(lin.bias.dtype)
        lin.weight.data.copy_((w * s.unsqueeze(0)).to(lin.weight.dtype))
    if group.kind == "norm":
        prod.weight.data.copy_((prod.weight.data.float() / s).to(prod.weight.dtype))
        bias = getattr(prod, "bias", None)
        if isinstance(bias, torch.Tensor):
            b = bias.data.float() - (d if d is not None else 0.0)
            bias.data.copy_((b / s).to(bias.dtype))
    else:
        prod.weight.data.copy_((prod.weight.data.float() / s.unsqueeze(1)).to(prod.weight.dtype))
        if prod.bias is not None:
            b = prod.bias.data.float() - (d if d is not None else 0.0)
            prod.bias.data.copy_((b / s).to(prod.bias.dtype))


def _group_params(block: nn.Module, group: FoldGroup) -> dict[str, torch.Tensor]:
    names = [group.producer] + group.consumers
    out = {}
    for n in names:
        m = block.get_submodule(n)
        for pn, p in m.named_parameters(recurse=False):
            out[f"{n}.{pn}"] = p.data.clone()
    return out


def _restore(block: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, value in saved.items():
        block.get_parameter(name).data.copy_(value)


@torch.no_grad()
def verify_folds(
    block: nn.Module, groups: list[FoldGroup], call, scales: list[torch.Tensor], shifts: list[torch.Tensor | None],
    tol: float = 1e-3,
) -> list[FoldGroup]:
    """Fold every group, one at a time, checking the block output on one batch; a group whose fold
    changes the output by more than ``tol`` (relative) is reverted and dropped. Returns the kept
    groups (folded)."""
    reference = call()
    ref_norm = reference.float().pow(2).mean().sqrt().clamp(min=1e-12)
    kept = []
    for group, s, d in zip(groups, scales, shifts):
        saved = _group_params(block, group)
        apply_fold(block, group, s, d)
        out = call()
        rel = float((out.float() - reference.float()).pow(2).mean().sqrt() / ref_norm)
        if not rel <= tol:
            _restore(block, saved)
            logger.warning(
                "channel scaling into %r changes the block output (relative %.2g); not folding it", group.producer, rel
            )
            continue
        kept.append(group)
    return kept
