"""DiTFastAttn for diffusers pipelines: per-step, per-layer attention compression with a searched plan.

::

    report = pipe.enable_fast_attention(threshold=0.05, calibration_prompts=[1, 2, 3], num_inference_steps=20)
    report.summary()                  # the method of every layer at every step, attention FLOPs saved, wall time
    images = pipe(class_labels=[7], num_inference_steps=20).images
    pipe.save_pretrained("out")       # the plan travels in transformer/config.json; from_pretrained re-enables it
    pipe.disable_fast_attention()     # the original attention processors, exactly

Methods (Yuan et al., "DiTFastAttn", NeurIPS 2024), chosen per attention layer and per step. The layers
are plain self-attention (DiT, PixArt; :class:`FastAttnProcessor`) and SD3 / Flux joint attention
(:class:`JointFastAttnProcessor`: there the window covers the image tokens and the text tokens stay
global, see its docstring):

* ``full``: ordinary attention (at a full step followed by window steps, the window attention of
  the same inputs is also computed and ``R = full - window`` is cached for that layer);
* ``wars`` (WA-RS): window attention plus the residual ``R`` cached at the layer's last full step;
* ``ast``: the layer's attention output of the previous step, reused (nothing computed);
* ``full+asc`` / ``wars+asc`` (ASC): with classifier-free guidance, only one branch (the
  conditional one by default) is computed and its output serves both.

The step comes from the pipeline's scheduler, not from per-module call counters: every diffusers
pipeline calls ``scheduler.set_timesteps`` once at the start of a call and ``scheduler.step`` once
per denoising step, so the processors know the step whatever the number of transformer calls per
step, and the caches are freed when the last step is taken (or when the next call starts). Calls
of the transformer outside a pipeline call use full attention.

The classifier-free guidance batch order is detected from each transformer call's inputs: the
two halves of the batch must hold the same latents; the unconditional half is the one with
``DiT``'s null class, or all-zero text embeddings, or (with two or more prompts) identical
embeddings in every row. When none of these decides, ``cfg_order`` (default: diffusers' text
pipelines' ``[uncond, cond]``) is used and the report says so.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .window_attention import WindowSpec, keys_per_query, window_attention

__all__ = [
    "enable_fast_attention",
    "disable_fast_attention",
    "FastAttentionPlan",
    "FastAttentionReport",
    "FastAttnProcessor",
    "JointFastAttnProcessor",
    "self_attention_layers",
    "unsupported_attention_layers",
    "attention_layer_kind",
    "METHODS",
    "clipped_relative_l1",
]

METHODS = ("full", "full+asc", "wars", "wars+asc", "ast")
# the greedy search tries these from the most to the least aggressive (DiTFastAttn's order)
CANDIDATES = ("ast", "wars+asc", "wars", "full+asc")
_ALIASES = {
    "full_attn": "full",
    "output_share": "ast",
    "residual_window_attn": "wars",
    "residual_window_attn+cfg_attn_share": "wars+asc",
    "full_attn+cfg_attn_share": "full+asc",
}
_SHORT = {"full": "F", "full+asc": "FC", "wars": "W", "wars+asc": "WC", "ast": "A"}
CONFIG_KEY = "_fast_attention_plan"
CFG_ORDERS = ("auto", "uncond_first", "cond_first")


def _method(name: str, where: str = "") -> str:
    m = _ALIASES.get(name, name)
    if m not in METHODS:
        raise ValueError(f"unknown fast-attention method {name!r}{where}; known: {', '.join(METHODS)} "
                         f"(or DiTFastAttn's names {', '.join(_ALIASES)})")
    return m


def clipped_relative_l1(reference: torch.Tensor, output: torch.Tensor, eps: float = 1e-6) -> float:
    """DiTFastAttn's default search metric: the mean over elements of ``|a - b| / max(|a|, |b|)``,
    each term clipped to at most 1 (so a handful of near-zero elements cannot dominate)."""
    a, b = reference.float(), output.float()
    rel = (a - b).abs() / torch.maximum(a.abs(), b.abs()).clamp_min(eps)
    return float(rel.clamp(max=1.0).mean())


# ---- the plan --------------------------------------------------------------------------------------


@dataclass
class FastAttentionPlan:
    """``methods[step][layer]`` for ``layers`` (the self-attention modules, in order) over a
    ``num_inference_steps``-step schedule, with the window used by ``wars``."""

    methods: list[list[str]]
    layers: list[str]
    window: WindowSpec
    threshold: float | None = None
    cfg_order: str = "auto"
    asc_branch: str = "cond"
    version: int = 1

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("fast-attention plan has no steps")
        if self.cfg_order not in CFG_ORDERS:
            raise ValueError(f"cfg_order {self.cfg_order!r} is not one of {CFG_ORDERS}")
        if self.asc_branch not in ("cond", "uncond"):
            raise ValueError(f"asc_branch {self.asc_branch!r} is not 'cond' or 'uncond'")
        out = []
        for i, row in enumerate(self.methods):
            if len(row) != len(self.layers):
                raise ValueError(
                    f"fast-attention plan step {i} has {len(row)} layer methods but the plan names {len(self.layers)} layers"
                )
            out.append([_method(m, f" at step {i}, layer {j}") for j, m in enumerate(row)])
        self.methods = out
        for j in range(len(self.layers)):
            have_out = have_res = False
            for i in range(len(out)):
                m = out[i][j]
                if m == "ast" and not have_out:
                    raise ValueError(f"fast-attention plan: layer {j} ({self.layers[j]}) reuses the previous output ('ast') "
                                     f"at step {i} before any step computed it")
                if m.startswith("wars") and not have_res:
                    raise ValueError(f"fast-attention plan: layer {j} ({self.layers[j]}) uses window attention ('{m}') "
                                     f"at step {i} before any full step cached its residual")
                have_out = True
                have_res = have_res or m.startswith("full")

    @property
    def num_inference_steps(self) -> int:
        return len(self.methods)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "num_inference_steps": self.num_inference_steps, "num_layers": len(self.layers),
            "layers": list(self.layers), "window": self.window.to_dict(), "threshold": self.threshold,
            "cfg_order": self.cfg_order, "asc_branch": self.asc_branch, "methods": [list(r) for r in self.methods],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FastAttentionPlan":
        if not isinstance(d, dict) or "methods" not in d or "layers" not in d:
            raise ValueError("not a fast-attention plan: expected a dict with 'methods' and 'layers'")
        if d.get("version", 1) != 1:
            raise ValueError(f"fast-attention plan version {d.get('version')} is not supported "
                             "(this piecewise-quant reads version 1)")
        w = d.get("window") or {}
        plan = cls(
            methods=[list(r) for r in d["methods"]], layers=list(d["layers"]),
            window=WindowSpec(int(w.get("window", 0)), w.get("shape", "1d"), w.get("block")),
            threshold=d.get("threshold"), cfg_order=d.get("cfg_order", "auto"), asc_branch=d.get("asc_branch", "cond"),
        )
        n = d.get("num_inference_steps")
        if n is not None and n != plan.num_inference_steps:
            raise ValueError(f"fast-attention plan says num_inference_steps={n} "
                             f"but has {plan.num_inference_steps} rows of methods")
        return plan

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "FastAttentionPlan":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def check_model(self, layers: Sequence[str], where: str = "the model") -> None:
        if len(layers) != len(self.layers):
            raise ValueError(
                f"fast-attention plan is for {len(self.layers)} self-attention layers but {where} has {len(layers)}; "
                "search a plan for this model (enable_fast_attention(threshold=...))"
            )
        if list(layers) != list(self.layers):
            bad = next(i for i, (a, b) in enumerate(zip(layers, self.layers)) if a != b)
            raise ValueError(f"fast-attention plan layer {bad} is {self.layers[bad]!r} but {where} has {layers[bad]!r} there")

    def summary(self) -> str:
        lines = ["step | " + " ".join(f"{j:>2}" for j in range(len(self.layers)))]
        for i, row in enumerate(self.methods):
            lines.append(f"{i:>4} | " + " ".join(f"{_SHORT[m]:>2}" for m in row))
        lines.append("F full, FC full+asc (one CFG branch), W window+residual, WC window+residual+asc, A reuse previous step")
        return "\n".join(lines)


# ---- state shared by one component's processors ----------------------------------------------------


@dataclass
class _LayerCache:
    output: torch.Tensor | None = None
    residual: torch.Tensor | None = None


@dataclass
class _Flops:
    done: float = 0.0
    dense: float = 0.0


class FastAttnState:
    """The step, the plan, the CFG layout of the current call and the per-layer caches."""

    def __init__(self, layers: list[str], window: WindowSpec, cfg_order: str = "auto", asc_branch: str = "cond") -> None:
        self.layers = layers
        self.window = window
        self.cfg_order = cfg_order
        self.asc_branch = asc_branch
        self.plan: FastAttentionPlan | None = None
        self.step: int | None = None  # None: outside a pipeline call -> full attention
        self.n_steps = 0
        self.caches: list[_LayerCache] = [_LayerCache() for _ in layers]
        self.cfg: str | None = None  # "cond_first" / "uncond_first" when this forward's batch is CFG
        self.cfg_how: str = ""
        self.grid: tuple[int, int] | None = None
        self.text_tokens: int | None = None  # context tokens of the current call (joint attention)
        self.image_tokens: int | None = None  # image tokens of the current call
        self.search: Any = None  # the search context while enable_fast_attention searches
        self.trial = False  # a search trial forward: read caches, write nothing, count nothing
        self.override: dict[int, str] = {}  # search: the methods tried at this step
        self.flops = _Flops()
        self.last_call_flops = _Flops()
        self.cfg_seen: dict[str, int] = {}

    # pipeline call lifecycle (driven by the scheduler hooks)
    def begin(self, n_steps: int) -> None:
        if self.plan is not None and self.search is None and n_steps != self.plan.num_inference_steps:
            self.end()
            raise ValueError(
                f"the fast-attention plan was made for {self.plan.num_inference_steps} inference steps but this pipeline "
                f"call runs {n_steps}; call with num_inference_steps={self.plan.num_inference_steps}, or search a plan for "
                f"{n_steps} steps (pipe.enable_fast_attention(num_inference_steps={n_steps}, ...)), or disable it "
                "(pipe.disable_fast_attention())"
            )
        self.free()
        self.step = 0
        self.n_steps = n_steps
        self.flops = _Flops()

    def advance(self) -> None:
        if self.step is None:
            return
        self.step += 1
        if self.search is not None:
            self.search.step_done()
        if self.step >= self.n_steps:
            self.end()

    def end(self) -> None:
        if self.step is not None:
            self.last_call_flops = self.flops
        self.step = None
        self.free()

    def free(self) -> None:
        self.caches = [_LayerCache() for _ in self.layers]
        self.override = {}

    def method(self, layer: int) -> str:
        if self.step is None:
            return "full"
        if layer in self.override:
            return self.override[layer]
        if self.search is not None:
            return "full"
        if self.plan is None or self.step >= self.plan.num_inference_steps:
            return "full"
        return self.plan.methods[self.step][layer]

    def needs_residual(self, layer: int) -> bool:
        """Whether this full step must cache ``full - window`` (a later step, before the next full one, uses wars)."""
        if self.step is None:
            return False
        if self.search is not None:
            return True
        if self.plan is None:
            return False
        for row in self.plan.methods[self.step + 1:]:
            if row[layer].startswith("full"):
                return False
            if row[layer].startswith("wars"):
                return True
        return False

    def needs_output(self, layer: int) -> bool:
        if self.step is None:
            return False
        if self.search is not None:
            return True
        if self.plan is None or self.step + 1 >= self.plan.num_inference_steps:
            return False
        return self.plan.methods[self.step + 1][layer] == "ast"

    def available(self, layer: int, method: str) -> bool:
        c = self.caches[layer]
        if method == "ast":
            return c.output is not None
        if method.startswith("wars") and c.residual is None:
            return False
        if method.endswith("+asc") and self.cfg is None:
            return False
        return True


# ---- CFG detection ---------------------------------------------------------------------------------


def _first_tensor(args: tuple, kwargs: dict, name: str, position: int | None) -> Any:
    if name in kwargs:
        return kwargs[name]
    if position is not None and len(args) > position:
        return args[position]
    return None


def detect_cfg(model: nn.Module, args: tuple, kwargs: dict, default: str) -> tuple[str | None, str]:
    """``("cond_first" | "uncond_first" | None, how)`` for one transformer call."""
    x = _first_tensor(args, kwargs, "hidden_states", 0)
    if not isinstance(x, torch.Tensor) or x.shape[0] % 2 or x.shape[0] < 2:
        return None, "batch is not two halves"
    n = x.shape[0] // 2
    if not torch.equal(x[:n], x[n:]):
        return None, "the two halves hold different latents"
    labels = kwargs.get("class_labels")
    null = getattr(getattr(model, "config", None), "num_embeds_ada_norm", None)
    if isinstance(labels, torch.Tensor) and labels.numel() == 2 * n and null is not None:
        labels = labels.reshape(-1)
        first, second = bool((labels[:n] == null).all()), bool((labels[n:] == null).all())
        if second and not first:
            return "cond_first", "null class in the second half"
        if first and not second:
            return "uncond_first", "null class in the first half"
        return None, "class labels are not cond/null halves"
    emb = _first_tensor(args, kwargs, "encoder_hidden_states", None)
    if isinstance(emb, torch.Tensor) and emb.shape[0] == 2 * n:
        a, b = emb[:n], emb[n:]
        if torch.equal(a, b):
            return None, "the two halves have the same conditioning"
        za, zb = not bool(a.any()), not bool(b.any())
        if za != zb:
            return (("uncond_first", "zero embeddings in the first half") if za
                    else ("cond_first", "zero embeddings in the second half"))
        if n >= 2:
            ua, ub = bool((a == a[:1]).all()), bool((b == b[:1]).all())
            if ua != ub:
                return (("uncond_first", "identical embeddings in the first half") if ua
                        else ("cond_first", "identical embeddings in the second half"))
        return (("uncond_first" if default in ("auto", "uncond_first") else "cond_first"),
                f"assumed ({default}: could not tell the halves apart)")
    return None, "no conditioning input to tell the halves apart"


# ---- the processor ---------------------------------------------------------------------------------


def _attention_flops(batch: int, n: int, keys: int, width: int) -> float:
    """Multiply-adds x2 of QK^T and PV for ``batch`` sequences of ``n`` queries over ``keys`` keys."""
    return 4.0 * batch * n * keys * width


def _proj_flops(batch: int, n: int, width: int) -> float:
    return 4 * 2.0 * batch * n * width * width  # q, k, v, out


class FastAttnProcessor:
    """A diffusers attention processor for one self-attention layer that runs the plan's method
    for the current step; ``original`` (the processor it replaced) is used for plain full steps."""

    def __init__(self, original: Any, layer: int, state: FastAttnState) -> None:
        self.original = original
        self.layer = layer
        self.state = state

    def _plain(self, hidden_states: torch.Tensor, encoder_hidden_states, attention_mask, temb) -> bool:
        return hidden_states.ndim != 3 or encoder_hidden_states is not None or attention_mask is not None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        st = self.state
        method = st.method(self.layer)
        cache = st.caches[self.layer]
        writing = st.step is not None and not st.trial
        b, n = hidden_states.shape[0], hidden_states.shape[1] if hidden_states.ndim == 3 else 0
        if method != "full" and self._plain(hidden_states, encoder_hidden_states, attention_mask, temb):
            raise ValueError(
                f"fast-attention method {method!r} (layer {self.layer}, {st.layers[self.layer]}) needs plain self-attention "
                "over (batch, tokens, channels) without a mask"
            )
        if method == "ast":
            if cache.output is None or cache.output.shape[0] != b:
                raise RuntimeError(f"layer {self.layer}: 'ast' at step {st.step} but no output of the previous step is cached")
            if writing:
                st.flops.dense += self._dense_flops(attn, b, n)
            return cache.output
        need_res = method == "full" and st.needs_residual(self.layer) or method == "full+asc" and st.needs_residual(self.layer)
        need_out = st.needs_output(self.layer)
        if method == "full" and not need_res:
            out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
            if writing:
                st.flops.dense += self._dense_flops(attn, b, n)
                st.flops.done += self._dense_flops(attn, b, n)
                cache.output = out if need_out else None
            return out
        return self._compute(attn, hidden_states, method, need_res and writing, need_out and writing, writing)

    def _dense_flops(self, attn, b: int, n: int) -> float:
        width = attn.to_q.out_features if hasattr(attn.to_q, "out_features") else attn.inner_dim
        return _attention_flops(b, n, n, width) + _proj_flops(b, n, width)

    def _compute(self, attn, x: torch.Tensor, method: str, store_res: bool, store_out: bool, writing: bool) -> torch.Tensor:
        st = self.state
        cache = st.caches[self.layer]
        b, n, _ = x.shape
        asc = method.endswith("+asc") and st.cfg is not None
        sel = slice(None)
        if asc:
            h = b // 2
            cond_first = st.cfg == "cond_first"
            first = (st.asc_branch == "cond") == cond_first
            sel = slice(0, h) if first else slice(h, b)
            x = x[sel]
        bb = x.shape[0]
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        width = q.shape[-1]
        d = width // attn.heads
        q, k, v = (t.view(bb, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        keys = keys_per_query(n, st.window, st.grid)
        if method.startswith("full"):
            o = F.scaled_dot_product_attention(q, k, v)
            core = _attention_flops(bb, n, n, width)
            if store_res:
                r = o - window_attention(q, k, v, st.window, st.grid)
                core += _attention_flops(bb, n, keys, width)
                r = r.transpose(1, 2).reshape(bb, n, width)
                cache.residual = torch.cat([r, r]) if asc else r
        else:
            if cache.residual is None:
                raise RuntimeError(f"layer {self.layer}: '{method}' at step {st.step} but no residual was cached at a full step")
            o = window_attention(q, k, v, st.window, st.grid)
            core = _attention_flops(bb, n, keys, width)
        o = o.transpose(1, 2).reshape(bb, n, width).to(q.dtype)
        if method.startswith("wars"):
            o = o + cache.residual[sel]
        o = attn.to_out[0](o)
        o = attn.to_out[1](o)
        if attn.residual_connection:
            raise ValueError(f"layer {self.layer}: attention with residual_connection=True is not supported by fast attention")
        o = o / attn.rescale_output_factor
        if asc:
            o = torch.cat([o, o])
        if writing:
            st.flops.dense += self._dense_flops(attn, b, n)
            st.flops.done += core + _proj_flops(bb, n, width)
            cache.output = o if store_out else None
        return o


# ---- joint (SD3 / Flux) attention ------------------------------------------------------------------

# the layer kinds fast attention handles, and the original processors it knows how to replace for each
JOINT_KINDS = ("sd3_joint", "flux_joint", "flux_single")
_JOINT_PROCESSORS = {
    "sd3_joint": ("JointAttnProcessor2_0",),
    "flux_joint": ("FluxAttnProcessor", "FluxAttnProcessor2_0"),
    "flux_single": ("FluxAttnProcessor", "FluxAttnProcessor2_0"),
}


def attention_layer_kind(module: nn.Module) -> str | None:
    """``"self"`` (plain self-attention: DiT, PixArt, SD3.5's second image attention), ``"sd3_joint"``
    (SD3's ``Attention`` with ``add_q_proj``: image tokens first, then the context tokens),
    ``"flux_joint"`` (Flux's dual-stream ``FluxAttention``: context first, then image, RoPE over both),
    ``"flux_single"`` (Flux's single-stream ``FluxAttention``: one concatenated context + image sequence,
    RoPE, no output projection), or ``None`` (not a layer fast attention applies to)."""
    kind = type(module).__name__
    if not hasattr(module, "processor"):
        return None
    if kind == "FluxAttention":
        return "flux_joint" if getattr(module, "added_kv_proj_dim", None) is not None else "flux_single"
    if kind != "Attention":
        return None
    if getattr(module, "spatial_norm", None) is not None or getattr(module, "group_norm", None) is not None:
        return None
    if getattr(module, "add_q_proj", None) is not None:
        return "sd3_joint"
    if getattr(module, "is_cross_attention", False):
        return None
    return "self"


def _original_processor(module: nn.Module) -> Any:
    proc = module.processor
    return proc.original if isinstance(proc, (FastAttnProcessor, JointFastAttnProcessor)) else proc


def _joint_supported(module: nn.Module, kind: str) -> bool:
    """Whether a joint layer's (original) processor is the stock one whose computation
    :class:`JointFastAttnProcessor` reproduces (IP-adapter, PAG, fused or custom processors are not)."""
    return type(_original_processor(module)).__name__ in _JOINT_PROCESSORS[kind]


class JointFastAttnProcessor:
    """Fast attention for joint attention (SD3's ``JointAttnProcessor2_0``, Flux's ``FluxAttnProcessor``
    on dual- and single-stream blocks).

    The image tokens and the context (text) tokens attend to each other in one softmax. The methods:

    * ``full``: the original processor (or, when the residual must be cached, the same computation
      done here, plus the window pass);
    * ``wars``: the **image queries** attend to a window of **image keys** (the :class:`WindowSpec`
      over the image tokens' patch grid, 1-D or 2-D) **plus every context key**; the **context
      queries** attend to every key, as in full attention (they are global tokens). The residual
      ``R = full - window`` cached at the last full step therefore lives on the image rows only;
      on the context rows it is exactly zero, so they are not cached;
    * ``ast``: both streams' outputs (or the single-stream output) of the previous step reused;
    * ``+asc``: one CFG half of both streams computed, its outputs copied to the other half.

    Projections, QK-norms and Flux's RoPE (on the concatenated sequence, before attention) are
    applied as the original processor applies them."""

    def __init__(self, original: Any, layer: int, state: "FastAttnState", kind: str) -> None:
        if kind not in JOINT_KINDS:
            raise ValueError(f"unknown joint attention kind {kind!r}; known: {', '.join(JOINT_KINDS)}")
        self.original = original
        self.layer = layer
        self.state = state
        self.kind = kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 *args, **kwargs):
        st = self.state
        method = st.method(self.layer)
        cache = st.caches[self.layer]
        writing = st.step is not None and not st.trial
        b = hidden_states.shape[0]
        if method != "full" and (attention_mask is not None or args or kwargs):
            raise ValueError(
                f"fast-attention method {method!r} (layer {self.layer}, {st.layers[self.layer]}) supports joint attention "
                "without an attention mask or extra processor arguments (IP-adapter inputs)"
            )
        need_res = method.startswith("full") and st.needs_residual(self.layer)
        if method == "full" and not need_res:
            out = self._call_original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                      args, kwargs)
            if writing:
                n_img, n_txt = self._split(hidden_states, encoder_hidden_states)
                st.flops.dense += self._dense_flops(attn, b, n_img, n_txt)
                st.flops.done += self._dense_flops(attn, b, n_img, n_txt)
                cache.output = out if st.needs_output(self.layer) else None
            return out
        n_img, n_txt = self._split(hidden_states, encoder_hidden_states)
        if method == "ast":
            out = cache.output
            if out is None or _batch(out) != b:
                raise RuntimeError(f"layer {self.layer}: 'ast' at step {st.step} but no output of the previous step is cached")
            if writing:
                st.flops.dense += self._dense_flops(attn, b, n_img, n_txt)
            return out
        need_out = st.needs_output(self.layer)
        return self._compute(attn, hidden_states, encoder_hidden_states, image_rotary_emb, method, n_img, n_txt,
                             need_res and writing, need_out and writing, writing)

    def _call_original(self, attn, x, ctx, mask, rope, args, kwargs):
        if self.kind == "sd3_joint":
            return self.original(attn, x, ctx, mask, *args, **kwargs)
        return self.original(attn, x, ctx, mask, rope, *args, **kwargs)

    def _split(self, x: torch.Tensor, ctx: torch.Tensor | None) -> tuple[int, int]:
        """(image tokens, context tokens) of this call."""
        if self.kind == "flux_single":
            n_txt = self.state.text_tokens
            if n_txt is None or n_txt >= x.shape[1]:
                raise RuntimeError(
                    f"layer {self.layer} ({self.state.layers[self.layer]}): a Flux single-stream block's sequence has "
                    f"{x.shape[1]} tokens and the text length of this call is {n_txt}; fast attention takes it from the "
                    "transformer's encoder_hidden_states, so call the transformer with encoder_hidden_states"
                )
            return x.shape[1] - n_txt, n_txt
        if ctx is None:
            raise ValueError(f"layer {self.layer} ({self.state.layers[self.layer]}) is joint attention but was called "
                             "without encoder_hidden_states")
        return x.shape[1], ctx.shape[1]

    def _width(self, attn) -> int:
        return attn.to_q.out_features if hasattr(attn.to_q, "out_features") else attn.inner_dim

    def _dense_flops(self, attn, b: int, n_img: int, n_txt: int) -> float:
        n = n_img + n_txt
        width = self._width(attn)
        return _attention_flops(b, n, n, width) + _proj_flops(b, n, width) * _PROJ_SHARE[self.kind]

    def _qkv(self, attn, x: torch.Tensor, ctx: torch.Tensor | None, rope: Any) -> tuple[torch.Tensor, ...]:
        """Joint ``q, k, v`` shaped ``(batch, heads, tokens, head_dim)`` in the processor's token order."""
        b = x.shape[0]
        if self.kind == "sd3_joint":
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
            d = k.shape[-1] // attn.heads
            q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            cq, ck, cv = attn.add_q_proj(ctx), attn.add_k_proj(ctx), attn.add_v_proj(ctx)
            cq, ck, cv = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (cq, ck, cv))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            return torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        # Flux (diffusers' FluxAttnProcessor): (batch, tokens, heads, head_dim) until attention
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if self.kind == "flux_joint":
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
                cq, ck, cv = attn.to_added_qkv(ctx).chunk(3, dim=-1)
            else:
                cq, ck, cv = attn.add_q_proj(ctx), attn.add_k_proj(ctx), attn.add_v_proj(ctx)
            cq, ck, cv = (t.unflatten(-1, (-1, attn.head_dim)) for t in (cq, ck, cv))
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
        if rope is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q = apply_rotary_emb(q, rope, sequence_dim=1)
            k = apply_rotary_emb(k, rope, sequence_dim=1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _compute(self, attn, x: torch.Tensor, ctx: torch.Tensor | None, rope: Any, method: str, n_img: int, n_txt: int,
                 store_res: bool, store_out: bool, writing: bool) -> Any:
        st = self.state
        cache = st.caches[self.layer]
        b = x.shape[0]
        asc = method.endswith("+asc") and st.cfg is not None
        sel = slice(None)
        if asc:
            h = b // 2
            first = (st.asc_branch == "cond") == (st.cfg == "cond_first")
            sel = slice(0, h) if first else slice(h, b)
            x = x[sel]
            ctx = ctx[sel] if ctx is not None else None
        bb = x.shape[0]
        q, k, v = self._qkv(attn, x, ctx, rope)
        n = n_img + n_txt
        width = q.shape[1] * q.shape[3]
        img = slice(0, n_img) if self.kind == "sd3_joint" else slice(n_txt, n)
        txt = slice(n_img, n) if self.kind == "sd3_joint" else slice(0, n_txt)
        grid = st.grid if st.grid is not None and st.grid[0] * st.grid[1] == n_img else None
        keys = keys_per_query(n_img, st.window, grid)
        window_core = _attention_flops(bb, n_img, keys + n_txt, width) + _attention_flops(bb, n_txt, n, width)

        def window_image_rows() -> torch.Tensor:
            return window_attention(q[:, :, img], k[:, :, img], v[:, :, img], st.window, grid,
                                    global_key=k[:, :, txt], global_value=v[:, :, txt])

        if method.startswith("full"):
            o = F.scaled_dot_product_attention(q, k, v)
            core = _attention_flops(bb, n, n, width)
            if store_res:
                r = (o[:, :, img] - window_image_rows()).transpose(1, 2).reshape(bb, n_img, width)
                core += _attention_flops(bb, n_img, keys + n_txt, width)
                cache.residual = torch.cat([r, r]) if asc else r
        else:
            if cache.residual is None:
                raise RuntimeError(f"layer {self.layer}: '{method}' at step {st.step} but no residual was cached at a full step")
            o_img = window_image_rows()
            o_txt = F.scaled_dot_product_attention(q[:, :, txt], k, v)
            o = torch.cat([o_img, o_txt] if self.kind == "sd3_joint" else [o_txt, o_img], dim=2)
            core = window_core
        o = o.transpose(1, 2).reshape(bb, n, width).to(q.dtype)
        if method.startswith("wars"):
            res = cache.residual[sel]
            parts = [o[:, img] + res, o[:, txt]]
            o = torch.cat(parts if self.kind == "sd3_joint" else parts[::-1], dim=1)
        out = self._project(attn, o, img, txt, ctx is not None)
        if asc:
            out = tuple(torch.cat([t, t]) for t in out) if isinstance(out, tuple) else torch.cat([out, out])
        if writing:
            st.flops.dense += self._dense_flops(attn, b, n_img, n_txt)
            st.flops.done += core + _proj_flops(bb, n, width) * _PROJ_SHARE[self.kind]
            cache.output = out if store_out else None
        return out

    def _project(self, attn, o: torch.Tensor, img: slice, txt: slice, has_ctx: bool) -> Any:
        """The output projections, as the original processor applies them."""
        if self.kind == "flux_single":
            return o
        o_img, o_txt = o[:, img], o[:, txt]
        if self.kind == "sd3_joint":
            if not attn.context_pre_only:
                o_txt = attn.to_add_out(o_txt)
            o_img = attn.to_out[1](attn.to_out[0](o_img))
            return o_img, o_txt
        o_img = attn.to_out[1](attn.to_out[0](o_img.contiguous()))
        return o_img, attn.to_add_out(o_txt.contiguous())


# share of the q, k, v, out projections' FLOPs a layer kind runs over all its tokens (Flux's single-stream
# attention has no output projection: the block's proj_out, shared with the MLP, is not part of the attention)
_PROJ_SHARE = {"self": 1.0, "sd3_joint": 1.0, "flux_joint": 1.0, "flux_single": 0.75}


def _batch(out: Any) -> int:
    return (out[0] if isinstance(out, tuple) else out).shape[0]


# ---- installing and removing -----------------------------------------------------------------------


def self_attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules fast attention applies to, in module order: plain diffusers
    self-attention (``Attention`` without cross attention: DiT, PixArt, SD3.5's second image
    attention) and joint attention whose processor is the stock one (SD3's ``Attention`` with
    ``add_q_proj`` and ``JointAttnProcessor2_0``; Flux's dual- and single-stream ``FluxAttention``
    with ``FluxAttnProcessor``). Joint layers with any other processor (IP-adapter, PAG, fused,
    custom) are left out: :func:`unsupported_attention_layers` names them."""
    found = []
    for name, m in model.named_modules():
        kind = attention_layer_kind(m)
        if kind is None or (kind != "self" and not _joint_supported(m, kind)):
            continue
        found.append((name, m))
    return found


def unsupported_attention_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, processor class)`` of the joint attention layers left out because fast attention does
    not reproduce their processor."""
    return [(name, type(_original_processor(m)).__name__) for name, m in model.named_modules()
            if (kind := attention_layer_kind(m)) not in (None, "self") and not _joint_supported(m, kind)]


def make_processor(module: nn.Module, original: Any, layer: int, state: FastAttnState) -> Any:
    """The fast-attention processor for ``module`` (one of :func:`self_attention_layers`), wrapping
    its ``original`` processor, as layer ``layer`` of ``state``'s plan."""
    kind = attention_layer_kind(module)
    if kind is None:
        raise ValueError(f"{type(module).__name__} is not an attention layer fast attention applies to")
    return FastAttnProcessor(original, layer, state) if kind == "self" else JointFastAttnProcessor(original, layer, state, kind)


@dataclass
class _Installed:
    state: FastAttnState
    originals: dict[str, Any]
    handle: Any
    scheduler: Any
    scheduler_attrs: dict[str, Any]


def _install(pipe: Any, name: str, model: nn.Module, state: FastAttnState) -> _Installed:
    layers = dict(self_attention_layers(model))
    originals = {n: m.processor for n, m in layers.items()}
    for i, n in enumerate(state.layers):
        layers[n].processor = make_processor(layers[n], originals[n], i, state)
    patch = getattr(model.config, "patch_size", None) if hasattr(model, "config") else None

    def pre_hook(module, args, kwargs):
        if state.trial:
            return None
        x = _first_tensor(args, kwargs, "hidden_states", 0)
        if isinstance(x, torch.Tensor) and x.ndim == 4 and patch:
            state.grid = (x.shape[-2] // patch, x.shape[-1] // patch)
            state.image_tokens = state.grid[0] * state.grid[1]
        elif isinstance(x, torch.Tensor) and x.ndim == 3:
            state.image_tokens = x.shape[1]
        ids = kwargs.get("img_ids")  # Flux: (tokens, 3) position ids (0, row, column) of the packed image tokens
        if isinstance(ids, torch.Tensor) and ids.ndim in (2, 3) and ids.shape[-1] == 3 and ids.numel():
            ids = ids[0] if ids.ndim == 3 else ids
            h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
            state.grid = (h, w) if h * w == ids.shape[0] else None
        emb = _first_tensor(args, kwargs, "encoder_hidden_states", 1)  # 1: PixArt's, SD3's and Flux's position
        state.text_tokens = emb.shape[1] if isinstance(emb, torch.Tensor) and emb.ndim == 3 else None
        if state.step is None:
            state.cfg = None
            return None
        default = state.cfg_order
        if default != "auto":
            cfg, how = detect_cfg(module, args, kwargs, default)
            if cfg is not None:
                cfg, how = default, f"given (cfg_order={default!r})"
        else:
            cfg, how = detect_cfg(module, args, kwargs, default)
        state.cfg, state.cfg_how = cfg, how
        key = f"{cfg}: {how}" if cfg else f"no CFG: {how}"
        state.cfg_seen[key] = state.cfg_seen.get(key, 0) + 1
        if state.search is not None:
            state.search.search_step(module, args, kwargs)
        return None

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    sched = pipe.components.get("scheduler") if hasattr(pipe, "components") else None
    saved: dict[str, Any] = {}
    if sched is not None and hasattr(sched, "set_timesteps") and hasattr(sched, "step"):
        for attr in ("set_timesteps", "step"):
            saved[attr] = sched.__dict__.get(attr, _MISSING)
        orig_set, orig_step = sched.set_timesteps, sched.step

        def set_timesteps(*a, **kw):
            out = orig_set(*a, **kw)
            state.begin(len(sched.timesteps))
            return out

        def step(*a, **kw):
            out = orig_step(*a, **kw)
            state.advance()
            return out

        sched.set_timesteps = set_timesteps
        sched.step = step
    else:
        raise ValueError(f"{type(pipe).__name__} has no scheduler with set_timesteps/step to take the denoising step from")
    return _Installed(state, originals, handle, sched, saved)


_MISSING = object()


def _uninstall(model: nn.Module, inst: _Installed) -> None:
    for n, proc in inst.originals.items():
        layer = model.get_submodule(n)
        if isinstance(layer.processor, (FastAttnProcessor, JointFastAttnProcessor)):
            layer.processor = proc
    inst.handle.remove()
    for attr, old in inst.scheduler_attrs.items():
        if old is _MISSING:
            inst.scheduler.__dict__.pop(attr, None)
        else:
            inst.scheduler.__dict__[attr] = old
    inst.state.free()


def _set_config_plan(model: nn.Module, plan: dict | None) -> None:
    internal = getattr(model, "_internal_dict", None)
    if internal is None:
        return
    from diffusers.configuration_utils import FrozenDict

    d = {k: v for k, v in internal.items() if k != CONFIG_KEY}
    if plan is not None:
        d[CONFIG_KEY] = plan
    model._internal_dict = FrozenDict(d)


# ---- the search ------------------------------------------------------------------------------------


def _tensor_out(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


class _Search:
    """Greedy DiTFastAttn search, run inside the transformer's forward pre-hook at each step."""

    def __init__(self, state: FastAttnState, threshold: float, metric: Callable[[torch.Tensor, torch.Tensor], float],
                 candidates: Sequence[str]):
        self.state = state
        self.threshold = threshold
        self.metric = metric
        self.candidates = list(candidates)
        self.calls: list[list[list[str]]] = []  # per pipeline call: methods[step][layer]
        self.current: list[list[str]] | None = None
        self.errors: dict[tuple[int, int], float] = {}
        self.forwards = 0

    def step_done(self) -> None:
        self.state.override = {}

    def search_step(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        st = self.state
        L = len(st.layers)
        if st.step == 0:
            self.current = []
            self.calls.append(self.current)
        while len(self.current) <= st.step:
            self.current.append(["full"] * L)
        row = self.current[st.step]
        st.override = {}
        if st.step == 0:
            return

        def run() -> torch.Tensor:
            st.trial = True
            try:
                with torch.no_grad():
                    self.forwards += 1
                    return _tensor_out(model(*args, **kwargs)).detach().clone()
            finally:
                st.trial = False

        st.override = {j: "full" for j in range(L)}
        ref = run()
        for j in range(L):
            budget = self.threshold * (j + 1) / L
            chosen = "full"
            for cand in self.candidates:
                if not st.available(j, cand):
                    continue
                st.override[j] = cand
                err = self.metric(ref, run())
                if err < budget:
                    chosen = cand
                    self.errors[(st.step, j)] = err
                    break
            st.override[j] = chosen
            row[j] = chosen


@dataclass
class FastAttentionReport:
    """What :func:`enable_fast_attention` decided."""

    component: str
    plan: FastAttentionPlan
    attention_flops_saved: float  # over the planned call: 1 - attention-module FLOPs / dense
    wall_s: float = 0.0
    n_pipeline_calls: int = 0
    n_search_forwards: int = 0
    cfg_detected: dict[str, int] = field(default_factory=dict)
    method_counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        p = self.plan
        lines = [
            f"{self.component}: fast attention over {len(p.layers)} attention layers x {p.num_inference_steps} steps"
            + (f", threshold {p.threshold}" if p.threshold is not None else "")
            + f", window {p.window.window} ({p.window.shape}, block {p.window.query_block})",
            "methods: " + ", ".join(f"{m} {c}" for m, c in self.method_counts.items() if c),
            f"attention FLOPs saved (attention modules, projections included): {100 * self.attention_flops_saved:.1f}%",
        ]
        if self.cfg_detected:
            lines.append("CFG batch: " + "; ".join(f"{k} ({v} calls)" for k, v in self.cfg_detected.items()))
        lines.append(p.summary())
        if self.n_pipeline_calls:
            lines.append(f"search: {self.n_pipeline_calls} pipeline calls, {self.n_search_forwards} trial transformer forwards")
        lines.append(f"took {self.wall_s:.1f} s")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def planned_flops_saved(plan: FastAttentionPlan, n_tokens: int, width: int, cfg: bool, text_tokens: int = 0,
                        kinds: Sequence[str] | None = None, grid: tuple[int, int] | None = None) -> float:
    """1 - (attention-module FLOPs of ``plan``) / (all-full FLOPs), per sample, for ``n_tokens``
    image tokens of ``width`` channels (the same accounting as the processors' counters).

    ``kinds`` (one :func:`attention_layer_kind` per plan layer; default all ``"self"``): joint layers
    attend over ``n_tokens + text_tokens`` tokens, and their window steps cost the image queries'
    window plus all context keys, and the context queries' full rows."""
    b = 2 if cfg else 1
    kinds = list(kinds) if kinds is not None else ["self"] * len(plan.layers)
    if grid is None or grid[0] * grid[1] != n_tokens:
        grid = None if plan.window.shape == "1d" else _square(n_tokens)
    keys = keys_per_query(n_tokens, plan.window, grid)
    done = 0.0
    total = 0.0
    for j, kind in enumerate(kinds):
        t = text_tokens if kind != "self" else 0
        for i, row in enumerate(plan.methods):
            m = row[j]
            total += _layer_cost(kind, b, n_tokens, t, keys, width, "full")
            bb = 1 if (m.endswith("+asc") and cfg) else b
            if m == "ast":
                continue
            if m.startswith("wars"):
                done += _layer_cost(kind, bb, n_tokens, t, keys, width, "window")
                continue
            done += _layer_cost(kind, bb, n_tokens, t, keys, width, "full")
            later = next((r[j] for r in plan.methods[i + 1:] if not r[j] == "ast"), "full")
            if later.startswith("wars"):
                done += _layer_cost(kind, bb, n_tokens, t, keys, width, "residual")
    return 1.0 - done / total


def _layer_cost(kind: str, b: int, n_img: int, n_txt: int, keys: int, width: int, what: str) -> float:
    """FLOPs of one layer call: ``"full"`` attention, ``"window"`` attention (image queries over their
    window plus all context keys, context queries over everything), or the ``"residual"`` caching's
    extra window pass (no projections)."""
    n = n_img + n_txt
    proj = _proj_flops(b, n, width) * _PROJ_SHARE[kind]
    if what == "full":
        return _attention_flops(b, n, n, width) + proj
    if what == "window":
        return _attention_flops(b, n_img, keys + n_txt, width) + _attention_flops(b, n_txt, n, width) + proj
    return _attention_flops(b, n_img, keys + n_txt, width)


def _square(n: int) -> tuple[int, int]:
    s = math.isqrt(n)
    return (s, n // s)


# ---- public API ------------------------------------------------------------------------------------


def _denoiser(pipe: Any, component: str | None) -> tuple[str, nn.Module]:
    from .pipeline import _check_pipeline, denoiser_names

    _check_pipeline(pipe)
    names = [component] if component is not None else denoiser_names(pipe)
    if component is not None and not isinstance(pipe.components.get(component), nn.Module):
        raise ValueError(f"{type(pipe).__name__} has no model component {component!r}; it has: {', '.join(pipe.components)}")
    if not names:
        raise ValueError(f"{type(pipe).__name__} has no transformer/unet component to apply fast attention to")
    name = names[0]
    model = pipe.components[name]
    if not self_attention_layers(model):
        bad = unsupported_attention_layers(model)
        extra = (f"; its joint attention layers use processors fast attention does not reproduce ({bad[0][0]}: "
                 f"{bad[0][1]}" + (f", and {len(bad) - 1} more" if len(bad) > 1 else "") + "): put the stock processor back "
                 "(transformer.set_attn_processor(JointAttnProcessor2_0()) for SD3, FluxAttnProcessor() for Flux)"
                 if bad else "")
        raise ValueError(
            f"component {name!r} ({type(model).__name__}) has no attention layer fast attention applies to (diffusers "
            "self-attention without cross attention, or SD3/Flux joint attention with its stock processor); fast "
            "attention supports DiT, PixArt, SD3 and Flux transformers" + extra
        )
    return name, model


def _check_threshold(threshold: Any) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise TypeError(f"threshold must be a number >= 0, got {threshold!r}") from None
    if not t >= 0 or math.isinf(t):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    return t


def enable_fast_attention(
    pipe: Any,
    threshold: float = 0.05,
    calibration_prompts: Sequence[str] | Sequence[int] | None = None,
    *,
    num_inference_steps: int = 20,
    plan: FastAttentionPlan | dict | str | None = None,
    window: int | None = None,
    window_shape: str = "1d",
    window_block: int | None = None,
    metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
    candidates: Sequence[str] = CANDIDATES,
    guidance_scale: float | None = None,
    cfg_order: str = "auto",
    asc_branch: str = "cond",
    component: str | None = None,
    calibration_batch_size: int = 4,
    calibration_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> FastAttentionReport:
    """Install DiTFastAttn on the pipeline's transformer; returns a :class:`FastAttentionReport`.

    Without ``plan``, searches one: the pipeline runs on ``calibration_prompts`` (class ids for
    ``DiTPipeline``, prompts for text pipelines; ``None``: built-in defaults) for
    ``num_inference_steps`` steps and, at every step after the first, each self-attention layer in
    order gets the most aggressive of ``candidates`` whose error on the transformer output (``metric``,
    default :func:`clipped_relative_l1` against full attention at that step) is below
    ``threshold * (layer + 1) / num_layers``; earlier layers keep their choice. With ``plan`` (a
    :class:`FastAttentionPlan`, its dict, or a JSON path), installs it after checking it matches.

    ``window``: tokens on each side (1-D) or patches around a tile (2-D); default: 1/8 of the
    tokens (1-D, DiTFastAttn's PixArt setting) or 1/8 of the grid side around tiles of 1/4 of
    the side (2-D). ``window_block``: queries per block (1-D, default ``window``) or tile side (2-D).
    """
    t0 = time.perf_counter()
    name, model = _denoiser(pipe, component)
    if getattr(model, "_piecewise_fast_attention", None) is not None:
        raise ValueError(f"fast attention is already enabled on {name!r}; call pipe.disable_fast_attention() first")
    layer_names = [n for n, _ in self_attention_layers(model)]
    if cfg_order not in CFG_ORDERS:
        raise ValueError(f"cfg_order {cfg_order!r} is not one of {CFG_ORDERS}")
    if plan is not None:
        return _install_plan(pipe, name, model, _as_plan(plan), layer_names, t0)
    threshold, cands = _search_options(threshold, num_inference_steps, candidates, calibration_prompts)
    spec = _window_spec(model, window, window_shape, window_block, pipe)
    state = FastAttnState(layer_names, spec, cfg_order, asc_branch)
    state.search = _Search(state, threshold, metric or clipped_relative_l1, cands)
    calls = _search_plan(pipe, name, model, state, calibration_prompts, dict(
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=calibration_batch_size,
        seed=seed, extra=calibration_kwargs,
    ), progress)
    return _finish_search(pipe, name, model, state, calls, t0)


def _as_plan(plan: FastAttentionPlan | dict | str) -> FastAttentionPlan:
    """A plan given as a :class:`FastAttentionPlan`, its dict or a JSON path."""
    if isinstance(plan, str):
        return FastAttentionPlan.load(plan)
    if isinstance(plan, dict):
        return FastAttentionPlan.from_dict(plan)
    return plan


def _install_plan(pipe: Any, name: str, model: nn.Module, plan: FastAttentionPlan, layer_names: list[str],
                  t0: float) -> FastAttentionReport:
    """Install a given plan (no search) after checking it fits the model's layers."""
    plan.check_model(layer_names, f"{name!r} ({type(model).__name__})")
    state = FastAttnState(layer_names, plan.window, plan.cfg_order, plan.asc_branch)
    state.plan = plan
    model._piecewise_fast_attention = _install(pipe, name, model, state)
    _set_config_plan(model, plan.to_dict())
    report = _report(name, plan, model, state, time.perf_counter() - t0)
    pipe.fast_attention_report = report
    return report


def _search_options(threshold: Any, num_inference_steps: Any, candidates: Sequence[str],
                    calibration_prompts: Any) -> tuple[float, list[str]]:
    """Check the search's arguments; returns the threshold and the candidate methods."""
    from .calibration import check_calibration_prompts

    threshold = _check_threshold(threshold)
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    cands = [_method(c, " in candidates") for c in candidates]
    if "full" in cands:
        raise ValueError("candidates must not include 'full' (it is what remains when no candidate is accurate enough)")
    check_calibration_prompts(calibration_prompts)
    return threshold, cands


def _search_plan(pipe: Any, name: str, model: nn.Module, state: FastAttnState, calibration_prompts: Any,
                 run_options: dict[str, Any], progress: bool) -> int:
    """Install the searching processors and run the pipeline on the calibration prompts; sets
    ``state.plan`` to the plan found and returns the number of pipeline calls. On any error the
    original processors are put back."""
    from .calibration import resolve_calibration_inputs, run_pipeline

    search: _Search = state.search
    steps = run_options["num_inference_steps"]
    inst = _install(pipe, name, model, state)
    model._piecewise_fast_attention = inst
    try:
        run = resolve_calibration_inputs(pipe, calibration_prompts, **run_options)
        calls = run_pipeline(pipe, run, progress=progress, desc="searching fast-attention plan")
        if not search.calls or len(search.calls[0]) != steps:
            got = len(search.calls[0]) if search.calls else 0
            raise RuntimeError(f"the calibration pipeline calls took {got} transformer steps, expected {steps}")
        plan = FastAttentionPlan(
            _merge_calls(search.calls), state.layers, state.window, search.threshold, state.cfg_order, state.asc_branch
        )
    except BaseException:
        _uninstall(model, inst)
        del model._piecewise_fast_attention
        raise
    state.plan = plan
    return calls


def _finish_search(pipe: Any, name: str, model: nn.Module, state: FastAttnState, calls: int,
                   t0: float) -> FastAttentionReport:
    """Switch from searching to the plan found, store it in the model's config, report."""
    search: _Search = state.search
    state.search = None
    state.cfg_seen = dict(state.cfg_seen)
    _set_config_plan(model, state.plan.to_dict())
    report = _report(name, state.plan, model, state, time.perf_counter() - t0)
    report.n_pipeline_calls = calls
    report.n_search_forwards = search.forwards
    pipe.fast_attention_report = report
    return report


def _merge_calls(calls: list[list[list[str]]]) -> list[list[str]]:
    """One method per (step, layer) from several calibration calls: the least aggressive of them."""
    rank = {m: i for i, m in enumerate(("full", "full+asc", "wars", "wars+asc", "ast"))}
    steps = len(calls[0])
    out = []
    for i in range(steps):
        row = []
        for j in range(len(calls[0][i])):
            row.append(min((c[i][j] for c in calls if i < len(c)), key=lambda m: rank[m]))
        out.append(row)
    # keep the plan valid (a 'wars' needs an earlier full step, 'ast' an earlier computed step): merging can't break
    # this because every call's own plan was valid and step 0 is always full
    return out


def _window_spec(model: nn.Module, window: int | None, shape: str, block: int | None, pipe: Any = None) -> WindowSpec:
    if window is None:
        cfg = getattr(model, "config", None)
        size, patch = getattr(cfg, "sample_size", None), getattr(cfg, "patch_size", None)
        default = getattr(pipe, "default_sample_size", None)
        if isinstance(size, int) and isinstance(patch, int) and patch > 0:
            side = max(size // patch, 1)
        elif type(model).__name__ == "FluxTransformer2DModel" and isinstance(default, int):
            side = max(default // 2, 1)  # FluxPipeline packs 2x2 latent patches: 1024 px -> 128 latents -> 64 tokens a side
        else:
            side = 16
        window = max(1, side * side // 8) if shape == "1d" else max(1, side // 8)
        if shape == "2d" and block is None:
            block = max(1, side // 4)
    return WindowSpec(int(window), shape, block)


def _report(name: str, plan: FastAttentionPlan, model: nn.Module, state: FastAttnState, wall: float) -> FastAttentionReport:
    counts = {m: sum(r.count(m) for r in plan.methods) for m in METHODS}
    saved = float("nan")
    cfg = getattr(model, "config", None)
    size, patch = getattr(cfg, "sample_size", None), getattr(cfg, "patch_size", None)
    layers = self_attention_layers(model)
    kinds = [attention_layer_kind(m) for _, m in layers]
    joint = any(k != "self" for k in kinds)
    n = None
    if state.image_tokens is not None and (joint or not isinstance(size, int)):
        n = state.image_tokens  # the image tokens of the last call (Flux has no sample_size)
    elif isinstance(size, int) and isinstance(patch, int):
        n = (size // patch) ** 2
    if n and layers and (not joint or state.text_tokens is not None):
        width = layers[0][1].to_q.out_features if hasattr(layers[0][1].to_q, "out_features") else layers[0][1].inner_dim
        saved = planned_flops_saved(plan, n, width, cfg=any(k.startswith(("cond", "uncond")) for k in state.cfg_seen),
                                    text_tokens=state.text_tokens or 0, kinds=kinds, grid=state.grid)
    return FastAttentionReport(name, plan, saved, wall, cfg_detected=dict(state.cfg_seen), method_counts=counts)


def disable_fast_attention(pipe: Any, component: str | None = None) -> None:
    """Put the original attention processors (the same objects) and scheduler methods back and
    forget the plan."""
    from .pipeline import _check_pipeline

    _check_pipeline(pipe)
    names = [component] if component is not None else [
        n for n, c in pipe.components.items() if getattr(c, "_piecewise_fast_attention", None) is not None
    ]
    if not names:
        raise ValueError(f"fast attention is not enabled on {type(pipe).__name__}; nothing to disable")
    for n in names:
        model = pipe.components.get(n)
        inst = getattr(model, "_piecewise_fast_attention", None)
        if inst is None:
            raise ValueError(f"fast attention is not enabled on component {n!r}")
        _uninstall(model, inst)
        del model._piecewise_fast_attention
        _set_config_plan(model, None)
    if hasattr(pipe, "fast_attention_report"):
        del pipe.fast_attention_report


def restore_saved_plan(pipe: Any) -> FastAttentionReport | None:
    """Re-enable the plan a loaded pipeline's transformer carries in its config (``save_pretrained``
    wrote it); ``None`` when there is none."""
    if not hasattr(pipe, "components"):
        return None
    for n, comp in pipe.components.items():
        cfg = getattr(comp, "config", None)
        saved = cfg.get(CONFIG_KEY) if hasattr(cfg, "get") else None
        if saved and getattr(comp, "_piecewise_fast_attention", None) is None:
            return enable_fast_attention(pipe, plan=FastAttentionPlan.from_dict(saved), component=n)
    return None


def _finish_registration() -> None:
    from . import _finish_pending_registration

    _finish_pending_registration()


_finish_registration()
