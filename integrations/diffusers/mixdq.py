"""MixDQ-style mixed precision for diffusion denoisers: metric-decoupled sensitivity and an exact
allocation of weight and activation bits under average-bit budgets.

MixDQ (Zhao et al., 2024) observes that a denoiser's layers hurt different things when quantized:
the layers that carry the *content* (cross-attention, which reads the condition, and the
feed-forward layers) change *what* is drawn, the others mostly its *quality*. A single
sensitivity metric mixes the two and misallocates bits. So the layers are split in two groups,
each scored by the metric of its kind, and bits are allocated within each group:

* **content layers** (``CONTENT_PATTERNS``: ``attn2`` cross-attention, ``ff``/``ff_context``
  feed-forward, Flux's ``proj_mlp``): each candidate is scored by how far the *final images* of a
  pipeline run (same prompts, same noise) move from the float pipeline's images, the relative
  squared error of the images;
* **quality layers** (everything else): each candidate is scored by the noise of the *denoiser
  output* on the recorded float inputs of every timestep, ``1 / SQNR`` (squared error over
  squared output).

Every candidate quantizes one layer only (round-to-nearest weights; activations dynamic per
token), the rest of the model stays float. Weights and activations are allocated separately, each
group on its own under the same budget (so the whole model meets it), by the exact multiple-choice
knapsack solver of :mod:`piecewise_quant.calibration.mixed_precision`.

:func:`mixdq_plan` returns a :class:`MixDQPlan` whose ``config`` names every layer's bits as plain
``overrides``; pass it to ``pipe.enable_quant`` (with any calibration recipe, e.g. GPTQ, or the
``"balance"`` rotation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["CONTENT_PATTERNS", "MixDQPlan", "mixdq_plan"]

CONTENT_PATTERNS: tuple[str, ...] = ("*attn2.*", "*.ff.*", "*.ff_context.*", "*proj_mlp*")
BUDGET_UNITS = ("codes", "bits_per_weight")


@dataclass
class MixDQPlan:
    """What :func:`mixdq_plan` measured and chose.

    Attributes:
        config: the input config with one ``overrides`` entry per allocated layer (its ``bits``,
            and ``act_bits`` where activations were allocated); give it to ``enable_quant``.
        groups: layer -> ``"content"`` or ``"quality"``.
        weight_bits / act_bits: layer -> the chosen width (``act_bits`` only for layers whose
            activations the config quantizes).
        weight_sensitivity / act_sensitivity: layer -> {width: measured error}.
        bits_per_weight: layer -> stored bits per weight of the chosen scheme (metadata included).
        weight_budget / act_budget / budget_unit: what was asked.
    """

    config: Any
    groups: dict[str, str]
    weight_bits: dict[str, int]
    act_bits: dict[str, int]
    weight_sensitivity: dict[str, dict[int, float]]
    act_sensitivity: dict[str, dict[int, float]]
    bits_per_weight: dict[str, float]
    n_weights: dict[str, int]
    in_features: dict[str, int]
    weight_budget: float
    act_budget: float | None
    budget_unit: str
    n_evaluations: int = 0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def average_weight_bits(self) -> float:
        """Average code bits per weight (weighted by each layer's weight count)."""
        n = sum(self.n_weights.values())
        return sum(self.weight_bits[k] * self.n_weights[k] for k in self.weight_bits) / n

    @property
    def average_bits_per_weight(self) -> float:
        """Average stored bits per weight, scales and zero points/breakpoints included."""
        n = sum(self.n_weights.values())
        return sum(self.bits_per_weight[k] * self.n_weights[k] for k in self.bits_per_weight) / n

    @property
    def average_act_bits(self) -> float | None:
        """Average activation bits (weighted by each layer's input width), ``None`` without any."""
        if not self.act_bits:
            return None
        n = sum(self.in_features[k] for k in self.act_bits)
        return sum(self.act_bits[k] * self.in_features[k] for k in self.act_bits) / n

    def table(self) -> str:
        """A markdown table: one row per layer, group, chosen widths and the sensitivities."""
        lines = ["| layer | group | weight bits | sensitivity by weight bits | act bits | sensitivity by act bits |",
                 "|---|---|---:|---|---:|---|"]
        for name in self.weight_bits:
            ws = ", ".join(f"{b}: {e:.2e}" for b, e in sorted(self.weight_sensitivity[name].items()))
            a = self.act_bits.get(name)
            as_ = ", ".join(f"{b}: {e:.2e}" for b, e in sorted(self.act_sensitivity.get(name, {}).items()))
            lines.append(f"| {name} | {self.groups[name]} | {self.weight_bits[name]} | {ws} | "
                         f"{a if a is not None else 'float'} | {as_ or '-'} |")
        act = self.average_act_bits
        lines.append("")
        lines.append(f"average: {self.average_weight_bits:.3f} weight code bits ({self.average_bits_per_weight:.3f} "
                     f"bits/weight stored), " + (f"{act:.3f} activation bits" if act is not None else "float activations")
                     + f"; {self.n_evaluations} evaluations in {self.wall_s:.1f} s")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _check_widths(name: str, widths: Sequence[int], allowed: Sequence[int]) -> tuple[int, ...]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
        raise ValueError(f"{name} must be a non-empty list of bit widths, e.g. [4, 8]; got {widths!r}")
    out = []
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, int) or w not in allowed:
            raise ValueError(f"{name} entries must be among {list(allowed)}; got {w!r}")
        out.append(w)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} lists a width twice: {out}")
    return tuple(sorted(out))


def _images(out: Any) -> torch.Tensor:
    if isinstance(out, tuple):
        out = out[0]
    out = getattr(out, "images", out)
    if isinstance(out, torch.Tensor):
        return out.detach().float().cpu()
    import numpy as np

    return torch.from_numpy(np.asarray(out)).float()


@torch.no_grad()
def _pipeline_images(pipe: Any, run: Any) -> torch.Tensor:
    """The pipeline's outputs on the calibration batches, with the calibration seeds (latents for
    text pipelines, ``pt`` images for class-conditional ones)."""
    import inspect

    from .calibration import _quiet, call_kwargs

    params = dict(inspect.signature(pipe.__call__).parameters)
    outs = []
    with _quiet(pipe):
        for i, batch in enumerate(run.batches()):
            outs.append(_images(pipe(**call_kwargs(run, params, i, batch))))
    return torch.cat([o.reshape(o.shape[0], -1) for o in outs])


@torch.no_grad()
def _denoise_all(model: nn.Module, records: list[dict[str, Any]]) -> list[torch.Tensor]:
    outs = []
    for rec in records:
        out = model(**rec)
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        outs.append(out.detach().float())
    return outs


def _rel_sq(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    num = sum(float((o - r).double().pow(2).sum()) for o, r in zip(outs, refs))
    den = sum(float(r.double().pow(2).sum()) for r in refs)
    return num / max(den, 1e-30)


def _in_group(name: str, patterns: Sequence[str]) -> bool:
    from piecewise_quant.config import _pattern_matches

    return any(_pattern_matches(p, name) for p in patterns)


def mixdq_plan(
    pipe: Any,
    config: Any,
    *,
    weight_budget: float,
    act_budget: float | None = None,
    weight_candidates: Sequence[int] = (4, 8),
    act_candidates: Sequence[int] = (4, 8),
    budget_unit: str = "codes",
    calibration_prompts: Sequence[Any] | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float | None = None,
    component: str | None = None,
    content_patterns: Sequence[str] = CONTENT_PATTERNS,
    calibration_batch_size: int = 4,
    calibration_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> MixDQPlan:
    """Measure every layer's sensitivity with MixDQ's decoupled metrics and allocate weight (and
    activation) bits under average budgets; returns a :class:`MixDQPlan` whose ``config`` goes
    to ``pipe.enable_quant``. The pipeline is left exactly as it was (float).

    Args:
        pipe: a float diffusers pipeline (its denoiser not quantized).
        config: the base ``PiecewiseQuantConfig`` (or ``diffusion_recipe(...)``): grids, group
            sizes, which layers are quantized and which quantize activations. Its per-layer
            ``bits`` / ``act_bits`` are what the plan replaces.
        weight_budget: the largest average weight width, in ``budget_unit``: ``"codes"`` (code bits,
            the papers' "W5") or ``"bits_per_weight"`` (stored bits, scales included).
        act_budget: the largest average activation width over the layers that quantize
            activations (weighted by input width); ``None`` keeps the config's ``act_bits``.
        weight_candidates / act_candidates: the widths offered to every layer.
        content_patterns: layer-name patterns of the content group (the rest is the quality group).
        calibration_prompts, num_inference_steps, guidance_scale, calibration_batch_size,
        calibration_kwargs, seed: the pipeline runs that sensitivities are measured on (as in
            ``enable_quant``; use the schedule you generate with).
        component: the denoiser to plan (default: the pipeline's only denoiser).
    """
    import time

    from piecewise_quant.calibration.mixed_precision import Candidate, allocate
    from piecewise_quant.registry import get_format

    from .calibration import capture_denoiser_inputs, resolve_calibration_inputs
    from .config import split_config
    from .layers import DiffusionQuantLinear
    from .pipeline import _check_pipeline, _is_quantized, _resolve_components
    from .planning import plan_component

    t0 = time.perf_counter()
    _check_pipeline(pipe)
    names = _resolve_components(pipe, component)
    if len(names) != 1:
        raise ValueError(f"{type(pipe).__name__} has several denoisers {names}; choose one with component=...")
    cname = names[0]
    model = pipe.components[cname]
    if _is_quantized(model):
        raise ValueError(f"component {cname!r} is already quantized; plan on the float pipeline (disable_quant() first)")
    if budget_unit not in BUDGET_UNITS:
        raise ValueError(f"budget_unit must be one of {list(BUDGET_UNITS)}; got {budget_unit!r}")
    w_cands = _check_widths("weight_candidates", weight_candidates, (2, 3, 4, 8))
    a_cands = _check_widths("act_candidates", act_candidates, (4, 8)) if act_budget is not None else ()
    for label, b in (("weight_budget", weight_budget), ("act_budget", act_budget)):
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0):
            raise ValueError(f"{label} must be a positive number of bits; got {b!r}")
    core, diffusion = split_config(config)
    if core.rotation is not None:
        raise ValueError("mixdq_plan measures sensitivities without rotations; plan with the config minus rotation=, "
                         "then add the rotation to plan.config before enable_quant")
    plan = plan_component(model, core, dataclasses.replace(diffusion, act_group_size=None, act_scales="shared"), cname)
    act_layers = [n for n, lay in plan.items() if lay.spec.act_bits is not None]
    if act_budget is not None and not act_layers:
        raise ValueError("act_budget is set but the config quantizes no activations; set act_bits (e.g. 8)")
    run = resolve_calibration_inputs(pipe, calibration_prompts, num_inference_steps=num_inference_steps,
                                     guidance_scale=guidance_scale, batch_size=calibration_batch_size, seed=seed,
                                     extra=calibration_kwargs)
    groups = {n: ("content" if _in_group(n, content_patterns) else "quality") for n in plan}

    records = capture_denoiser_inputs(pipe, {cname: model}, run, progress=progress)[cname]
    ref_eps = _denoise_all(model, records)
    ref_img = _pipeline_images(pipe, run) if "content" in groups.values() else None
    n_eval = 0

    def score(name: str) -> float:
        nonlocal n_eval
        n_eval += 1
        if groups[name] == "content":
            return _rel_sq([_pipeline_images(pipe, run)], [ref_img])
        return _rel_sq(_denoise_all(model, records), ref_eps)

    def spec_for(layer, bits: int | None, act: int | None):
        changes: dict[str, Any] = {"act_bits": act, "act_mode": "dynamic_per_token"}
        if bits is not None:
            changes["bits"] = bits
        spec = layer.spec.with_changes(changes)
        return dataclasses.replace(layer, spec=spec)

    w_sens: dict[str, dict[int, float]] = {n: {} for n in plan}
    a_sens: dict[str, dict[int, float]] = {n: {} for n in act_layers}
    bpw: dict[str, dict[int, float]] = {n: {} for n in plan}
    jobs = [(n, "w", b) for n in plan for b in w_cands] + [(n, "a", a) for n in act_layers for a in a_cands]
    bar = tqdm(jobs, desc=f"MixDQ sensitivities ({cname})", unit="eval", disable=not progress)
    for name, kind, width in bar:
        linear = model.get_submodule(name)
        layer = plan[name]
        if kind == "w":
            probe = spec_for(layer, width, None)
        else:  # activation sensitivity: the widest weight candidate, so the weights add little
            probe = spec_for(layer, max(w_cands), width)
        fmt = get_format(probe.spec.grid)
        q = DiffusionQuantLinear.build(probe, fmt, linear)
        model.set_submodule(name, q)
        try:
            err = score(name)
        finally:
            model.set_submodule(name, linear)
        if kind == "w":
            w_sens[name][width] = err
            bpw[name][width] = fmt.bits_per_weight(probe)
        else:
            a_sens[name][width] = err

    n_w = {n: plan[n].in_features * plan[n].out_features for n in plan}
    in_f = {n: plan[n].in_features for n in plan}
    weight_bits: dict[str, int] = {}
    act_bits: dict[str, int] = {}
    for group in ("content", "quality"):
        members = [n for n in plan if groups[n] == group]
        if not members:
            continue
        cands = {n: [Candidate(b, plan[n].spec.grid, float(b) if budget_unit == "codes" else bpw[n][b], w_sens[n][b])
                     for b in w_cands] for n in members}
        try:
            chosen = allocate(cands, {n: n_w[n] for n in members}, float(weight_budget))
        except ValueError as exc:
            raise ValueError(f"weight_budget={weight_budget} ({budget_unit}) for the {group} layers: {exc}") from None
        weight_bits.update({n: c.bits for n, c in chosen.items()})
        acts = [n for n in members if n in a_sens]
        if act_budget is not None and acts:
            acands = {n: [Candidate(a, "act", float(a), a_sens[n][a]) for a in a_cands] for n in acts}
            try:
                achosen = allocate(acands, {n: in_f[n] for n in acts}, float(act_budget))
            except ValueError as exc:
                raise ValueError(f"act_budget={act_budget} for the {group} layers: {exc}") from None
            act_bits.update({n: c.bits for n, c in achosen.items()})
    # one full scheme per layer, ahead of the config's own patterns (the first matching override wins)
    per_layer: dict[str, dict[str, Any]] = {}
    for n in plan:
        entry = dict(plan[n].spec.spec_dict())
        entry["bits"] = weight_bits[n]
        if n in act_bits:
            entry["act_bits"] = act_bits[n]
        per_layer[n] = entry
    new_core = core.with_overrides(per_layer)
    return MixDQPlan(
        config=new_core, groups=groups, weight_bits=dict(sorted(weight_bits.items())), act_bits=act_bits,
        weight_sensitivity=w_sens, act_sensitivity=a_sens,
        bits_per_weight={n: bpw[n][weight_bits[n]] for n in plan}, n_weights=n_w, in_features=in_f,
        weight_budget=float(weight_budget), act_budget=None if act_budget is None else float(act_budget),
        budget_unit=budget_unit, n_evaluations=n_eval, wall_s=time.perf_counter() - t0,
    )
