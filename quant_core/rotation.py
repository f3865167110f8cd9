"""Hadamard rotations applied to a float model before its layers are quantized (QuaRot, QuIP#).

:func:`rotate_model` is what ``quantize()`` and ``calibrate()`` run first when
``PiecewiseQuantConfig.rotation`` is set:

* **fused rotations** (``R1``, ``R2``) change the float weights so that the model computes the same
  function in a rotated basis. ``R1`` rotates the residual stream: RMSNorm weights are folded into
  the Linear layers that read the norm's output (the norm weights become 1, which makes the norm
  commute with a rotation), the embeddings and every block's o/down outputs are rotated, the
  q/k/v/gate/up and ``lm_head`` inputs counter-rotated. ``R2`` rotates each attention head
  between ``v_proj`` and ``o_proj``. All of it is computed in float64 and cast back.
* **online rotations** (``R4``, QuIP's ``input``/``output``) rotate a layer's input (and output)
  at run time; the weight gets the matching rotation here, and a hook applies the run-time side
  while the layer is still float (calibration runs through it). The ``QuantLinear`` that replaces
  the layer applies it from its :class:`~piecewise_quant.config.LayerSpec`.
* **channel balance** (``"balance"``, ViDiT-Q) is an online input rotation preceded by a
  per-channel smoothing scale ``s`` measured on the calibration data (every input row the layer
  sees, so for a diffusion model every timestep and guidance branch): the weight becomes
  ``W diag(s) R`` and the input ``(x / s) R``. The float layer carries ``s`` as
  ``_pq_balance_scale`` until its ``QuantLinear`` (which stores it as ``balance_scale``) is built.

The rotated float model is checked against the original on random tokens; a model the fusion does
not fit (a norm computing ``(1 + w) x``, a LayerNorm that subtracts the mean) is refused, put back
as it was, and named.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .args import RotationArgs
from .config import LayerSpec
from .kernels.hadamard import ScaledRotation, get_rotation, rotation_matrix, supported_size

__all__ = ["rotate_model", "rotated", "RotatedModel", "fused_rotation_targets", "balance_scales"]

logger = logging.getLogger(__name__)

_ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
_OUT = ("self_attn.o_proj", "mlp.down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass
class RotatedModel:
    """What :func:`rotate_model` did: the hooks it left on float layers (removed by
    :meth:`remove_hooks` once the layers are quantized, or the run failed)."""

    fused: tuple[str, ...] = ()
    online: dict[str, str] = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    balanced: list = field(default_factory=list)  # float layers carrying ``_pq_balance_scale``

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        for lin in self.balanced:
            lin.__dict__.pop("_pq_balance_scale", None)
        self.balanced.clear()


def fused_rotation_targets(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.ModuleList, nn.Module, nn.Module]:
    """``(embed_tokens, final norm, layers, lm_head, text config)`` of a Llama-family decoder, or a
    ``ValueError`` saying what is missing for the fused (R1/R2) rotations."""
    base = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    embed = getattr(base, "embed_tokens", None)
    norm = getattr(base, "norm", None)
    layers = getattr(base, "layers", None)
    if not (isinstance(embed, nn.Embedding) and isinstance(head, nn.Linear) and isinstance(layers, nn.ModuleList)
            and norm is not None and isinstance(getattr(norm, "weight", None), torch.Tensor)):
        raise ValueError(
            f"rotation R1/R2 needs a Llama-family causal LM (model.model.embed_tokens, .layers, .norm and "
            f"model.lm_head); {type(model).__name__} does not have them. Use rotation='quip' (online input/output "
            "rotations work on any model) or leave rotation unset"
        )
    for i, block in enumerate(layers):
        for name in _ATTN_IN + _MLP_IN + _OUT + _NORMS:
            try:
                block.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"rotation R1/R2: block {i} of {type(model).__name__} has no {name!r} (a Llama-family block has "
                    f"{', '.join(_NORMS + _ATTN_IN + _OUT + _MLP_IN)}); use rotation='quip' instead"
                ) from None
    return embed, norm, layers, head, getattr(model, "config", None)


@torch.no_grad()
def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device).contiguous()


@torch.no_grad()
def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.detach().double()
    for lin in linears:
        _set(lin.weight, lin.weight.detach().double() * g)
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        raise ValueError("rotation R1: the norm has a bias (a LayerNorm); only RMSNorm models can be rotated this way")
    _set(norm.weight, torch.ones_like(g))


@torch.no_grad()
def _rotate_in(lin: nn.Linear, r: torch.Tensor) -> None:
    _set(lin.weight, lin.weight.detach().double() @ r)


@torch.no_grad()
def _rotate_out(lin: nn.Linear, r: torch.Tensor) -> None:
    _set(lin.weight, r.T @ lin.weight.detach().double())
    if lin.bias is not None:
        _set(lin.bias, lin.bias.detach().double() @ r)


def _untie(model: nn.Module, embed: nn.Embedding, head: nn.Linear, cfg) -> None:
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
        for c in (cfg, getattr(cfg, "text_config", None)):
            if c is not None and hasattr(c, "tie_word_embeddings"):
                c.tie_word_embeddings = False
        logger.info("rotation R1: untied lm_head from the input embeddings (they now differ)")


def _head_dim(cfg, block: nn.Module) -> int:
    hd = getattr(cfg, "head_dim", None)
    if not hd:
        heads = getattr(cfg, "num_attention_heads", None)
        if not heads:
            raise ValueError("rotation R2 needs the model config's head_dim or num_attention_heads")
        hd = block.self_attn.o_proj.in_features // heads
    return int(hd)


@torch.no_grad()
def _fuse(model: nn.Module, args: RotationArgs) -> None:
    if not args.fused:
        return
    embed, norm, layers, head, cfg = fused_rotation_targets(model)
    text_cfg = getattr(cfg, "text_config", None) or cfg
    if "R1" in args.rotations:
        d = embed.weight.shape[1]
        if not supported_size(d):
            raise ValueError(f"rotation R1: no Hadamard rotation of the hidden size {d} (see kernels/hadamard.py)")
        _untie(model, embed, head, cfg)
        r1 = rotation_matrix(d, args.seed, "R1")
        _set(embed.weight, embed.weight.detach().double() @ r1)
        for block in layers:
            _fold_norm(block.input_layernorm, [block.get_submodule(n) for n in _ATTN_IN])
            _fold_norm(block.post_attention_layernorm, [block.get_submodule(n) for n in _MLP_IN])
            for n in _ATTN_IN + _MLP_IN:
                _rotate_in(block.get_submodule(n), r1)
            for n in _OUT:
                _rotate_out(block.get_submodule(n), r1)
        _fold_norm(norm, [head])
        _rotate_in(head, r1)
    if "R2" in args.rotations:
        for block in layers:
            hd = _head_dim(text_cfg, block)
            if not supported_size(hd):
                raise ValueError(f"rotation R2: no Hadamard rotation of the head size {hd}")
            r2 = rotation_matrix(hd, args.seed, "R2")
            v, o = block.self_attn.v_proj, block.self_attn.o_proj
            wv = v.weight.detach().double().reshape(-1, hd, v.in_features)
            _set(v.weight, torch.einsum("ji,hjk->hik", r2, wv).reshape(v.out_features, v.in_features))
            if v.bias is not None:
                _set(v.bias, (v.bias.detach().double().reshape(-1, hd) @ r2).reshape(-1))
            wo = o.weight.detach().double().reshape(o.out_features, -1, hd)
            _set(o.weight, (wo @ r2).reshape(o.out_features, o.in_features))


def _online_hooks(lin: nn.Linear, layer: LayerSpec, state: RotatedModel,
                  balance: torch.Tensor | None = None) -> None:
    """Rotate ``lin``'s weight (and bias) for its online rotations, and hook the run-time side;
    ``balance``: the layer's smoothing scale (``"balance"`` layers)."""
    rot = layer.rotation
    with torch.no_grad():
        if balance is not None:
            _set(lin.weight, lin.weight.detach().double() * balance.double())
        if rot.input:
            _rotate_in(lin, rotation_matrix(layer.in_features, rot.seed, "input"))
        if rot.output:
            _rotate_out(lin, rotation_matrix(layer.out_features, rot.seed, "output"))
    if balance is not None:
        scale = balance.to(torch.float16)
        lin._pq_balance_scale = scale
        state.balanced.append(lin)
        r_in = ScaledRotation(layer.in_features, rot.seed, "input", scale.float())
        state.hooks.append(lin.register_forward_pre_hook(lambda _m, args: (r_in(args[0]),) + tuple(args[1:])))
    elif rot.input:
        r_in = get_rotation(layer.in_features, rot.seed, "input")
        state.hooks.append(lin.register_forward_pre_hook(lambda _m, args: (r_in(args[0]),) + tuple(args[1:])))
    if rot.output:
        r_out = get_rotation(layer.out_features, rot.seed, "output")
        state.hooks.append(lin.register_forward_hook(lambda _m, _args, out: r_out(out, inverse=True)))
    state.online[layer.name] = rot.describe()


@torch.no_grad()
def _check_same_function(model: nn.Module, before: torch.Tensor | None, tokens: torch.Tensor | None) -> None:
    if before is None:
        return
    after = model(input_ids=tokens).logits.double()
    err = float((after - before).norm() / before.norm().clamp_min(1e-30))
    if not err < 1e-3:
        raise ValueError(
            f"the rotated float model differs from the original (relative error {err:.2e} on random tokens): this "
            f"architecture ({type(model).__name__}) does not fit the fused rotations (e.g. a norm computing (1 + w) * x "
            "or a LayerNorm); use rotation='quip' or leave rotation unset"
        )


def _probe(model: nn.Module, args: RotationArgs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not args.fused:
        return None, None
    embed = fused_rotation_targets(model)[0]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, embed.num_embeddings, (1, 8), generator=g).to(embed.weight.device)
    with torch.no_grad():
        return model(input_ids=tokens).logits.double(), tokens


def _balanced(plan: dict[str, LayerSpec]) -> list[str]:
    return [n for n, lay in plan.items() if getattr(lay.rotation, "balance", False)]


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


BALANCE_ALPHAS = (0.0, 0.25, 0.5, 0.75)  # the candidates of balance_alpha="auto"
_SAMPLE_ROWS = 1024  # calibration rows per layer kept for choosing alpha


def _smoothing(amax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|X|^alpha / max|W|^(1 - alpha)``, clamped, rounded to the float16 it is stored as."""
    s = amax.clamp_min(1e-5).pow(alpha) / wmax.clamp_min(1e-5).pow(1.0 - alpha)
    return s.clamp(1e-4, 1e4).to(torch.float16).double()


@torch.no_grad()
def _balanced_error(lin: nn.Linear, layer: LayerSpec, s: torch.Tensor, x: torch.Tensor, ref: torch.Tensor) -> float:
    """Output error of ``lin`` balanced with ``s`` and quantized as ``layer`` (weights rounded to
    nearest, activations quantized dynamically per token) on the input rows ``x``."""
    from .args import ActArgs
    from .qlinear import QuantLinear
    from .registry import get_format

    spec = layer.spec
    if spec.act_bits is not None and spec.act_mode != "dynamic_per_token":
        spec = dataclasses.replace(spec, act_mode="dynamic_per_token")
    probe = dataclasses.replace(layer, spec=spec)
    fmt = get_format(spec.grid)
    w = (lin.weight.detach().double().cpu() * s) @ rotation_matrix(layer.in_features, layer.rotation.seed, "input")
    q = QuantLinear(probe, fmt, False, act_args=ActArgs.from_spec(spec))
    q.load_quantized(fmt.quantize(w.float(), probe))
    q.balance_scale.copy_(s.float())
    return float((q(x) - ref).double().pow(2).sum())


@torch.no_grad()
def balance_scales(model: nn.Module, plan: dict[str, LayerSpec], names: list[str], data: Any,
                   alpha: float | str) -> dict[str, torch.Tensor]:
    """Each named layer's smoothing scale ``max|X_j|^alpha / max|W_j|^(1 - alpha)`` (per input
    channel ``j``; float64 holding float16 values, the stored precision), with ``max|X_j|`` over
    every row the layer sees while ``model`` runs on ``data`` (model-input dicts, tuples or
    tensors) and ``max|W_j|`` over the weight's column. ``alpha="auto"``: per layer, the
    candidate of :data:`BALANCE_ALPHAS` with the smallest quantized output error on a sample of
    those rows."""
    if data is None:
        raise ValueError(
            "rotation 'balance' sets each layer's smoothing scale from calibration data, and this call has none: use "
            "piecewise_quant.calibrate(model, config, data) (or a diffusers pipeline's enable_quant), not quantize() / "
            "quantization on load"
        )
    auto = alpha == "auto"
    amax: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []

    def observe(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1])
            m = flat.abs().amax(dim=0).double()
            amax[name] = m if name not in amax else torch.maximum(amax[name], m)
            if auto:
                step = max(1, flat.shape[0] // 64)
                rows[name].append(flat[::step][:64].float().cpu())
        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(observe(name)))
    try:
        n = 0
        for batch in data:
            _call(model, batch)
            n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("rotation 'balance': the calibration data is empty")
    scales = {}
    for name in names:
        if name not in amax:
            raise ValueError(f"rotation 'balance': layer {name!r} never ran on the calibration data, so it has no "
                             "activation range; leave it out of activation quantization or give data that reaches it")
        a = amax[name].cpu()
        if not bool(torch.isfinite(a).all()):
            raise ValueError(f"rotation 'balance': the calibration inputs of layer {name!r} contain NaN or Inf; "
                             "clean the calibration data")
        lin = model.get_submodule(name)
        wmax = lin.weight.detach().abs().amax(dim=0).double().cpu()
        if not auto:
            scales[name] = _smoothing(a, wmax, float(alpha))
            continue
        x = torch.cat(rows[name])
        if x.shape[0] > _SAMPLE_ROWS:
            x = x[torch.linspace(0, x.shape[0] - 1, _SAMPLE_ROWS).long()]
        ref = (x.double() @ lin.weight.detach().double().cpu().T)
        best = min((_balanced_error(lin, plan[name], _smoothing(a, wmax, c), x, ref), c) for c in BALANCE_ALPHAS)
        scales[name] = _smoothing(a, wmax, best[1])
        logger.debug("balance %s: alpha %.2f", name, best[1])
    return scales


def rotate_model(model: nn.Module, args: RotationArgs, plan: dict[str, LayerSpec], data: Any = None) -> RotatedModel:
    """Apply ``args`` to the float ``model`` in place: fuse R1/R2, rotate the weights of the
    layers of ``plan`` that rotate online and hook their run-time rotations; ``data``: the
    calibration inputs ``"balance"`` measures its scales on. The caller records the model for
    undo first and calls :meth:`RotatedModel.remove_hooks` when the layers are quantized (or on
    failure)."""
    state = RotatedModel(fused=args.fused)
    before, tokens = _probe(model, args)
    _fuse(model, args)
    _check_same_function(model, before, tokens)
    balanced = _balanced(plan)
    scales = balance_scales(model, plan, balanced, data, args.balance_alpha) if balanced else {}
    try:
        for name, layer in plan.items():
            if layer.rotation is not None:
                _online_hooks(model.get_submodule(name), layer, state, scales.get(name))
    except BaseException:
        state.remove_hooks()
        raise
    logger.info("rotation %s: fused %s, online on %d layer(s)", args.describe(), list(state.fused) or "none",
                len(state.online))
    return state


def _tie_flags(model: nn.Module) -> list[tuple[object, bool]]:
    cfg = getattr(model, "config", None)
    return [(c, c.tie_word_embeddings) for c in (cfg, getattr(cfg, "text_config", None))
            if c is not None and hasattr(c, "tie_word_embeddings")]


@contextlib.contextmanager
def rotated(model: nn.Module, args: RotationArgs | None, plan: dict[str, LayerSpec], undo=None,
            data: Any = None) -> Iterator[None]:
    """Rotate ``model`` for the body (``args`` ``None``: nothing; ``data``: calibration inputs for
    ``"balance"``). An exception in the body, or in the rotation, puts the model back exactly as
    it was (``undo``: the caller's :class:`~piecewise_quant.calibration.undo.ModelUndo`, which must
    not have been restored yet; one is made when ``None``); the float layers' hooks are removed
    either way."""
    if args is None:
        yield
        return
    from .calibration.undo import ModelUndo

    own = undo is None
    undo = ModelUndo() if own else undo
    undo.record(model, copy_values=True)
    ties = _tie_flags(model)
    state = None
    try:
        state = rotate_model(model, args, plan, data)
        yield
    except BaseException:
        if own:
            undo.restore()
        for cfg, tie in ties:
            cfg.tie_word_embeddings = tie
        raise
    finally:
        if state is not None:
            state.remove_hooks()
