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

from .args import KVArgs, RotationArgs
from .config import LayerSpec
from .kernels.hadamard import ScaledRotation, get_rotation, rotation_matrix, supported_size

__all__ = ["rotate_model", "rotated", "RotatedModel", "fused_rotation_targets", "balance_scales", "learn_rotations",
           "cayley"]

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
    # learn=True: the fused rotations that were learned, float64 (``"R1"``; ``"R2.<block>"``), and
    # the calibration loss of the fake-quantized model at the random start and after learning
    learned: dict[str, torch.Tensor] = field(default_factory=dict)
    learn_loss: tuple[float, float] | None = None

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
        for block in layers:
            _fold_norm(block.input_layernorm, [block.get_submodule(n) for n in _ATTN_IN])
            _fold_norm(block.post_attention_layernorm, [block.get_submodule(n) for n in _MLP_IN])
        _fold_norm(norm, [head])
        _fuse_r1(embed, layers, head, rotation_matrix(d, args.seed, "R1"))
    if "R2" in args.rotations:
        for block in layers:
            hd = _head_dim(text_cfg, block)
            if not supported_size(hd):
                raise ValueError(f"rotation R2: no Hadamard rotation of the head size {hd}")
            _fuse_r2(block, rotation_matrix(hd, args.seed, "R2"))


@torch.no_grad()
def _fuse_r1(embed: nn.Embedding, layers: nn.ModuleList, head: nn.Linear, r1: torch.Tensor) -> None:
    """Rotate the residual stream by the orthogonal float64 ``r1`` (norms already folded)."""
    _set(embed.weight, embed.weight.detach().double() @ r1)
    for block in layers:
        for n in _ATTN_IN + _MLP_IN:
            _rotate_in(block.get_submodule(n), r1)
        for n in _OUT:
            _rotate_out(block.get_submodule(n), r1)
    _rotate_in(head, r1)


@torch.no_grad()
def _fuse_r2(block: nn.Module, r2: torch.Tensor) -> None:
    """Rotate every attention head of ``block`` between ``v_proj`` and ``o_proj`` by ``r2``."""
    hd = r2.shape[0]
    v, o = block.self_attn.v_proj, block.self_attn.o_proj
    wv = v.weight.detach().double().reshape(-1, hd, v.in_features)
    _set(v.weight, torch.einsum("ji,hjk->hik", r2, wv).reshape(v.out_features, v.in_features))
    if v.bias is not None:
        _set(v.bias, (v.bias.detach().double().reshape(-1, hd) @ r2).reshape(-1))
    wo = o.weight.detach().double().reshape(o.out_features, -1, hd)
    _set(o.weight, (wo @ r2).reshape(o.out_features, o.in_features))


# ---- learned rotations (SpinQuant) -------------------------------------------------------------------


def cayley(p: torch.Tensor) -> torch.Tensor:
    """The Cayley transform ``(I - A)^-1 (I + A)`` of the skew-symmetric part ``A = (p - p^T) / 2``
    of the square ``p``: an orthogonal matrix (to round-off of ``p``'s dtype), the identity at
    ``p = 0``, differentiable in ``p``."""
    a = 0.5 * (p - p.T)
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    return torch.linalg.solve(eye - a, eye + a)


class _STE(torch.autograd.Function):
    """Forward: the quantize-dequantized tensor; backward: the gradient unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


def _fake_weight(w: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    """``w`` rounded to nearest on a min-max uniform grid of the layer's bits and groups (the
    stand-in for its format while learning: GPTQ or the piecewise fit run afterwards), with a
    straight-through gradient; unchanged for the floating-point formats."""
    spec = layer.spec
    if spec.grid not in ("uniform", "piecewise") or not isinstance(spec.bits, int):
        return w
    g = w.numel() if layer.group_size == -1 else layer.group_size
    with torch.no_grad():
        x = w.detach().reshape(-1, g)
        if spec.symmetric:
            qmax = 2 ** (spec.bits - 1) - 1
            scale = (x.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-8)
            q = (x / scale).round().clamp(-qmax - 1, qmax) * scale
        else:
            qmax = 2 ** spec.bits - 1
            lo, hi = x.amin(dim=1, keepdim=True).clamp_max(0), x.amax(dim=1, keepdim=True).clamp_min(0)
            scale = ((hi - lo) / qmax).clamp_min(1e-8)
            zero = (-lo / scale).round()
            q = ((x / scale).round() + zero).clamp(0, qmax).sub(zero) * scale
    return _STE.apply(w, q.reshape(w.shape))


def _act_operand(layer: LayerSpec):
    """How the layer's input is fake-quantized while learning (dynamic per token, its clip ratio)."""
    from .args import ActArgs
    from .kernels.ops import ActOperand

    act = ActArgs.from_spec(layer.spec)
    if act is None:
        return None
    mode = act.kernel_mode if act.dynamic else "dynamic_per_token"
    return ActOperand(None, act.kernel_format, mode, act.clip_ratio, act.topk)


def _batch_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on one calibration batch (a dict with ``input_ids``)."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError("rotation.learn=True needs token batches (dicts with input_ids) as calibration data; got "
                         f"{type(batch).__name__}")
    ids = batch["input_ids"]
    kwargs = {k: v for k, v in batch.items() if k not in ("labels",)}
    logits = model(**kwargs).logits[:, :-1].float()
    target = ids[:, 1:]
    mask = batch.get("attention_mask")
    if mask is not None:
        target = target.masked_fill(mask[:, 1:] == 0, -100)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


class _Learner:
    """The float model with its fused rotations multiplied by learnable ``cayley(P)`` factors and
    its planned layers fake-quantized, for as long as :meth:`attached` holds."""

    def __init__(self, model: nn.Module, args: RotationArgs, plan: dict[str, LayerSpec]) -> None:
        self.model = model
        self.embed, _, self.layers, self.head, cfg = fused_rotation_targets(model)
        text_cfg = getattr(cfg, "text_config", None) or cfg
        dev = self.embed.weight.device
        self.p1 = None
        if "R1" in args.rotations:
            d = self.embed.weight.shape[1]
            self.p1 = torch.zeros(d, d, device=dev, requires_grad=True)
        self.p2: list[torch.Tensor] = []
        if "R2" in args.rotations:
            for block in self.layers:
                hd = _head_dim(text_cfg, block)
                self.p2.append(torch.zeros(hd, hd, device=dev, requires_grad=True))
        self.plan = plan
        self.names = {id(m): n for n, m in model.named_modules()}
        self.q1: torch.Tensor | None = None
        self.q2: list[torch.Tensor] = []
        self.online = {}
        for name, layer in plan.items():
            rot = layer.rotation
            if rot is not None and (rot.output or rot.balance):
                raise ValueError(f"rotation.learn=True: layer {name!r} has an online output/balance rotation, which "
                                 "learning does not model; use rotations from ['R1', 'R2', 'R3', 'R4']")
            if rot is not None and rot.input:
                self.online[name] = (rotation_matrix(layer.in_features, rot.seed, "input"),
                                     get_rotation(layer.in_features, rot.seed, "input"))

    def parameters(self) -> list[torch.Tensor]:
        return ([self.p1] if self.p1 is not None else []) + self.p2

    def _weight(self, name: str, lin: nn.Linear, role: str, block: int | None) -> torch.Tensor:
        w = lin.weight.detach().float()
        if self.q1 is not None:
            if role == "in":
                w = w @ self.q1
            elif role == "out":
                w = self.q1.T @ w
        if self.q2 and block is not None:
            q2 = self.q2[block]
            hd = q2.shape[0]
            if name.endswith("v_proj"):
                w = torch.einsum("ji,hjk->hik", q2, w.reshape(-1, hd, w.shape[1])).reshape(w.shape)
            elif name.endswith("o_proj"):
                w = (w.reshape(w.shape[0], -1, hd) @ q2).reshape(w.shape)
        if name in self.online:  # R4: the float layer's online rotation is applied after learning
            w = w @ self.online[name][0].to(w)
        return w

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Swap the forwards of the embedding and of every rotated / planned Linear for learning ones."""
        patched: list[nn.Module] = []
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)

        def embed_forward(ids: torch.Tensor) -> torch.Tensor:
            w = self.embed.weight.detach().float()
            return nn.functional.embedding(ids, w @ self.q1 if self.q1 is not None else w)

        def linear_forward(lin: nn.Linear, name: str, role: str, block: int | None):
            layer = self.plan.get(name)
            act = _act_operand(layer) if layer is not None else None
            rot = self.online.get(name)

            def forward(x: torch.Tensor) -> torch.Tensor:
                from .kernels.ops import quantize_input

                w = self._weight(name, lin, role, block)
                if rot is not None:
                    x = rot[1](x)
                if layer is not None:
                    w = _fake_weight(w, layer)
                    if act is not None:
                        x = quantize_input(x, act)
                bias = None if lin.bias is None else lin.bias.detach().float()
                if bias is not None and role == "out" and self.q1 is not None:
                    bias = bias @ self.q1
                if bias is not None and self.q2 and block is not None and name.endswith("v_proj"):
                    bias = (bias.reshape(-1, self.q2[block].shape[0]) @ self.q2[block]).reshape(-1)  # Qwen2's v bias
                return nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
            return forward

        try:
            if self.q1 is not None or self.p1 is not None:
                self.embed.forward = embed_forward
                patched.append(self.embed)
            for bi, block in enumerate(self.layers):
                for n in _ATTN_IN + _MLP_IN + _OUT:
                    lin = block.get_submodule(n)
                    role = "in" if n in _ATTN_IN + _MLP_IN else "out"
                    lin.forward = linear_forward(lin, self.names[id(lin)], role, bi)
                    patched.append(lin)
            self.head.forward = linear_forward(self.head, self.names[id(self.head)], "in", None)
            patched.append(self.head)
            for name in self.plan:  # any other planned layer (outside the blocks): fake-quantized as it is
                lin = self.model.get_submodule(name)
                if "forward" not in lin.__dict__ and isinstance(lin, nn.Linear):
                    lin.forward = linear_forward(lin, name, "none", None)
                    patched.append(lin)
            yield
        finally:
            for m in patched:
                m.__dict__.pop("forward", None)
            for p in frozen:
                p.requires_grad_(True)

    def refresh(self) -> None:
        """Recompute the rotations from the parameters (float32, in the autograd graph)."""
        self.q1 = cayley(self.p1) if self.p1 is not None else None
        self.q2 = [cayley(p) for p in self.p2]

    def final(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The learned correction factors, recomputed in float64 (orthogonal to float64 round-off)."""
        with torch.no_grad():
            q1 = cayley(self.p1.detach().double()) if self.p1 is not None else None
            return q1, [cayley(p.detach().double()) for p in self.p2]


@contextlib.contextmanager
def _restore_mode(model: nn.Module, training: bool) -> Iterator[None]:
    try:
        yield
    finally:
        model.train(training)


def _loss_on(learner: _Learner, batches: list) -> float:
    with torch.no_grad():
        learner.refresh()
        return float(sum(float(_batch_loss(learner.model, b)) for b in batches) / len(batches))


@contextlib.contextmanager
def _kv_in_the_loss(model: nn.Module, kv: KVArgs | None) -> Iterator[None]:
    """Within the block, every attention module fake-quantizes its new keys and values as the KV
    cache ``kv`` (a :class:`~piecewise_quant.args.KVArgs`) would store them (R3 included when it
    declares ``key_rotation``), with a straight-through gradient, so learned rotations see the
    cache's error. Static (calibrated) scales do not exist yet while rotations are learned: the
    cache is then not modelled."""
    if kv is None or kv.static_scales:
        yield
        return
    from .kv import fake_quantize_keys_values
    from .kv_static import _modules_or_raise, _tapped

    def quantize(_module: nn.Module, k: torch.Tensor, v: torch.Tensor):
        with torch.no_grad():
            qk, qv = fake_quantize_keys_values(k, v, kv)
        return k + (qk - k).detach(), v + (qv - v).detach()

    with _tapped(_modules_or_raise(model, "rotation.learn with a quantized KV cache"), lambda _name: quantize):
        yield


def learn_rotations(model: nn.Module, args: RotationArgs, plan: dict[str, LayerSpec], data: Any,
                    progress: bool = True, state: RotatedModel | None = None,
                    kv: KVArgs | None = None) -> dict[str, torch.Tensor]:
    """SpinQuant: optimise the fused rotations of ``model`` (already rotated by :func:`_fuse`) to
    minimise the calibration loss of the fake-quantized model, then fuse the learned orthogonal
    corrections into the weights in float64. Returns the learned rotations (``"R1"``: the whole
    residual-stream rotation, random Hadamard times the correction; ``"R2.<i>"``: block ``i``'s).

    Each step takes one batch of ``data`` (cycling), computes the next-token cross-entropy of the
    model whose planned layers have their weights rounded to nearest (a uniform grid of their bits
    and group size) and their inputs quantized as their spec says (dynamic per token), both with
    a straight-through gradient, and takes an Adam step on the skew-symmetric parameters ``A`` of
    ``Q = cayley(A)``. Online rotations (R4) stay fixed and are modelled. ``kv``: the config's
    KV cache (:class:`~piecewise_quant.args.KVArgs`, or ``None``); with ``args.learn_kv`` its
    keys and values are fake-quantized in the loss too (straight-through), unless it uses static
    scales."""
    if data is None:
        raise ValueError(
            "rotation.learn=True optimises the rotations on calibration data, and this call has none: use "
            "piecewise_quant.calibrate(model, config, data), or give the config a calibration recipe (e.g. "
            "calibration='gptq') when quantizing on load; quantize() is data-free"
        )
    batches = list(data)
    if not batches:
        raise ValueError("rotation.learn=True: the calibration data is empty")
    from tqdm.auto import tqdm

    embed, _, layers, head, cfg = fused_rotation_targets(model)
    text_cfg = getattr(cfg, "text_config", None) or cfg
    learner = _Learner(model, args, plan)
    opt = torch.optim.Adam(learner.parameters(), lr=args.learn_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / args.learn_steps)
    was_training = model.training
    model.eval()
    with learner.attached(), _restore_mode(model, was_training), _kv_in_the_loss(model, kv if args.learn_kv else None):
        start = _loss_on(learner, batches)
        bar = tqdm(range(args.learn_steps), desc="learning rotations", unit="step", disable=not progress)
        for step in bar:
            learner.refresh()
            loss = _batch_loss(model, batches[step % len(batches)])
            if not bool(torch.isfinite(loss.detach())):
                raise ValueError(f"rotation.learn: the calibration loss became {loss.item()} at step {step}; lower "
                                 f"learn_lr (now {args.learn_lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        end = _loss_on(learner, batches)
    q1, q2 = learner.final()
    learned: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if q1 is not None:
            _fuse_r1(embed, layers, head, q1)
            learned["R1"] = rotation_matrix(q1.shape[0], args.seed, "R1") @ q1
        for i, (block, q) in enumerate(zip(layers, q2)):
            _fuse_r2(block, q)
            learned[f"R2.{i}"] = rotation_matrix(_head_dim(text_cfg, block), args.seed, "R2") @ q
    logger.info("rotation learn: calibration loss %.4f at the random Hadamard, %.4f after %d steps", start, end,
                args.learn_steps)
    if state is not None:
        state.learned.update(learned)
        state.learn_loss = (start, end)
    return learned


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
    if spec.act_bits is not None and spec.act_mode == "static_per_tensor":
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


def rotate_model(model: nn.Module, args: RotationArgs, plan: dict[str, LayerSpec], data: Any = None,
                 progress: bool = True, kv: KVArgs | None = None) -> RotatedModel:
    """Apply ``args`` to the float ``model`` in place: fuse R1/R2 (and learn them when
    ``args.learn``), rotate the weights of the layers of ``plan`` that rotate online and hook their
    run-time rotations; ``data``: the calibration inputs ``"balance"`` measures its scales on and
    learning optimises on; ``kv``: the config's KV cache, modelled while learning with
    ``args.learn_kv``. The caller
    records the model for undo first and calls :meth:`RotatedModel.remove_hooks` when the layers
    are quantized (or on failure)."""
    state = RotatedModel(fused=args.fused)
    if args.learn and data is None:
        learn_rotations(model, args, plan, None)  # raises, naming the fix, before anything changes
    before, tokens = _probe(model, args)
    _fuse(model, args)
    _check_same_function(model, before, tokens)
    if args.learn:
        learn_rotations(model, args, plan, data, progress, state, kv)
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
            data: Any = None, progress: bool = True, kv: KVArgs | None = None) -> Iterator[RotatedModel | None]:
    """Rotate ``model`` for the body, which receives the :class:`RotatedModel` (``args`` ``None``:
    nothing, and ``None``; ``data``: calibration inputs for ``"balance"`` and learning; ``kv``: the
    config's KV cache, which learning models with ``args.learn_kv``). An
    exception in the body, or in the rotation, puts the model back exactly as it was (``undo``:
    the caller's :class:`~piecewise_quant.calibration.undo.ModelUndo`, which must not have been
    restored yet; one is made when ``None``); the float layers' hooks are removed either way."""
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
        state = rotate_model(model, args, plan, data, progress, kv)
        yield state
    except BaseException:
        if own:
            undo.restore()
        for cfg, tie in ties:
            cfg.tie_word_embeddings = tie
        raise
    finally:
        if state is not None:
            state.remove_hooks()
