"""Calibration through the pipeline itself: the denoiser sees exactly the inputs it sees at
inference, over every timestep of the schedule and both classifier-free-guidance branches.

Two kinds of calibration run here:

* **activation scales** (:func:`calibrate_activations`): every quantized layer with static
  activation scales observes its input over whole pipeline runs (float activations, quantized
  weights); scales are then set from everything seen (``act_scales="shared"``) or separately per
  timestep (``"per_timestep"``), with the layer's clip ratio / top-k clipping. Statistics per
  timestep and per guidance branch go into the report.
* **calibration recipes** (:func:`capture_denoiser_inputs` + the core engine): the denoiser's
  keyword inputs are recorded over pipeline runs and fed to :func:`piecewise_quant.calibrate`,
  which runs the blocks one at a time (GPTQ, SmoothQuant, LWC, mixed precision...).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .layers import DiffusionQuantLinear, TimestepState

__all__ = [
    "DEFAULT_PROMPTS",
    "CalibrationRun",
    "LayerActivationStats",
    "resolve_calibration_inputs",
    "run_pipeline",
    "capture_denoiser_inputs",
    "calibrate_activations",
]

# Used when a text-conditioned pipeline must calibrate and no prompts are given: varied subjects,
# styles and compositions, so activation ranges are not tuned to one kind of image.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolor painting of a quiet harbour at dawn, boats and gulls",
    "close-up portrait of an old man with a grey beard, studio lighting",
    "a bowl of ramen on a wooden table, steam rising, top-down view",
    "an isometric illustration of a futuristic city with flying cars",
    "a red fox in a snowy forest, shallow depth of field",
    "the word 'hello' written in neon letters on a brick wall at night",
    "a minimalist black and white line drawing of a cat sleeping",
)


@dataclass
class CalibrationRun:
    """How the pipeline is called for calibration (built by :func:`resolve_calibration_inputs`)."""

    mode: str  # "class_labels" or "prompt"
    items: list[Any]
    batch_size: int
    num_inference_steps: int
    guidance_scale: float | None
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def branches(self) -> tuple[str, str]:
        # classifier-free guidance batches both branches in one call: DiTPipeline puts the
        # conditional half first, diffusers' text pipelines the unconditional (negative) half first
        return ("cond", "uncond") if self.mode == "class_labels" else ("uncond", "cond")

    def batches(self) -> list[list[Any]]:
        return [self.items[i : i + self.batch_size] for i in range(0, len(self.items), self.batch_size)]


@dataclass
class LayerActivationStats:
    """What one layer's input looked like during calibration and the scales it got."""

    name: str
    absmax_per_timestep: dict[float, float]
    absmax_per_branch: dict[str, float]
    scale: float | None
    scales_per_timestep: list[float] | None = None

    @property
    def timestep_spread(self) -> float:
        """Largest over smallest per-timestep range (1.0: the range does not move with the timestep)."""
        vals = [v for v in self.absmax_per_timestep.values() if v > 0]
        return max(vals) / min(vals) if vals else float("nan")


def _call_params(pipe: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipe.__call__).parameters)


def check_calibration_prompts(prompts: Any) -> None:
    """Refuse an empty list of calibration prompts early (``None`` means the built-in defaults)."""
    if prompts is not None and not isinstance(prompts, (str, int)) and len(prompts) == 0:
        raise ValueError("calibration_prompts is empty; give at least one prompt (or class label), or None for the defaults")


def resolve_calibration_inputs(
    pipe: Any, prompts: Sequence[Any] | None, *, num_inference_steps: int, guidance_scale: float | None,
    batch_size: int, seed: int, extra: dict[str, Any] | None,
) -> CalibrationRun:
    """Check the calibration prompts (or class labels) against the pipeline and fill in defaults."""
    params = _call_params(pipe)
    if isinstance(prompts, (str, int)):
        prompts = [prompts]
    if prompts is not None:
        if not isinstance(prompts, Sequence):
            raise TypeError(f"calibration_prompts must be a list of prompts (or class labels); got {type(prompts).__name__}")
        check_calibration_prompts(prompts)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer; got {num_inference_steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"calibration_batch_size must be a positive integer; got {batch_size!r}")
    if "class_labels" in params:
        mode = "class_labels"
        if prompts is None:
            n = int(getattr(getattr(pipe, "transformer", None), "config", {}).get("num_embeds_ada_norm", 0) or 0)
            if n <= 0:
                raise ValueError(f"{type(pipe).__name__} takes class labels; pass calibration_prompts=[label ids]")
            k = min(8, n)
            items = [round(i * (n - 1) / max(k - 1, 1)) for i in range(k)]
        else:
            items = []
            for p in prompts:
                if isinstance(p, bool) or not isinstance(p, (int, str)):
                    raise TypeError(f"{type(pipe).__name__} is class-conditional: "
                                    f"calibration_prompts must be class ids or label names; got {p!r}")
                if isinstance(p, str):
                    if not hasattr(pipe, "get_label_ids") or not getattr(pipe, "labels", None):
                        raise ValueError(f"{type(pipe).__name__} has no label names; give class ids instead of {p!r}")
                    items.extend(pipe.get_label_ids(p))
                else:
                    items.append(int(p))
    elif "prompt" in params:
        mode = "prompt"
        items = list(DEFAULT_PROMPTS) if prompts is None else list(prompts)
        bad = [p for p in items if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ValueError(f"calibration_prompts must be non-empty strings; got {bad[0]!r}")
    else:
        raise ValueError(
            f"piecewise-quant does not know how to call {type(pipe).__name__} for calibration (its __call__ takes neither "
            "'prompt' nor 'class_labels'); quantize without activation calibration (act_mode='dynamic_per_token', "
            "calibration=None)"
        )
    extra = dict(extra or {})
    unknown = [k for k in extra if k not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values())]
    if unknown:
        raise ValueError(f"calibration_kwargs {unknown} are not arguments of {type(pipe).__name__}.__call__")
    return CalibrationRun(mode, items, batch_size, num_inference_steps, guidance_scale, seed, extra)


@contextlib.contextmanager
def _quiet(pipe: Any) -> Iterator[None]:
    had = hasattr(pipe, "_progress_bar_config")
    old = getattr(pipe, "_progress_bar_config", None)
    pipe.set_progress_bar_config(**{**(old or {}), "disable": True})
    try:
        yield
    finally:
        if had:
            pipe._progress_bar_config = old
        else:
            del pipe._progress_bar_config


def call_kwargs(run: CalibrationRun, params: dict[str, inspect.Parameter], i: int, batch: list[Any]) -> dict[str, Any]:
    """The pipeline arguments of calibration batch ``i`` (its seed, schedule, guidance and output type)."""
    kwargs: dict[str, Any] = {run.mode: list(batch)}
    if "num_inference_steps" in params:
        kwargs["num_inference_steps"] = run.num_inference_steps
    if run.guidance_scale is not None:
        kwargs["guidance_scale"] = run.guidance_scale
    if "generator" in params:
        kwargs["generator"] = torch.Generator("cpu").manual_seed(run.seed + i)
    if "output_type" in params:
        kwargs["output_type"] = "latent" if run.mode == "prompt" else "pt"
    kwargs.update(run.extra)
    return kwargs


@torch.no_grad()
def run_pipeline(pipe: Any, run: CalibrationRun, states: Sequence[TimestepState] = (), progress: bool = True,
                 desc: str = "calibrating") -> int:
    """Call the pipeline on every calibration batch; returns the number of pipeline calls."""
    params = _call_params(pipe)
    n_calls = 0
    with _quiet(pipe):
        for i, batch in enumerate(tqdm(run.batches(), desc=desc, unit="batch", disable=not progress)):
            kwargs = call_kwargs(run, params, i, batch)
            n = len(batch) * int(kwargs.get("num_images_per_prompt", 1) or 1)
            for st in states:
                st.n_prompts = n
                st.branches = run.branches
            pipe(**kwargs)
            n_calls += 1
    return n_calls


def _bound_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    sig = inspect.signature(type(module).forward)
    bound = sig.bind(module, *args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        if sig.parameters[name].kind == inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif sig.parameters[name].kind == inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(module).__name__}.forward takes *args; its calls cannot be recorded for calibration")
        else:
            out[name] = value
    return out


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value


@torch.no_grad()
def capture_denoiser_inputs(pipe: Any, models: dict[str, nn.Module], run: CalibrationRun,
                            progress: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Run the (float) pipeline and record every call of each denoiser as a dict of keyword inputs."""
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    handles = []
    for name, model in models.items():
        def hook(module: nn.Module, args: tuple, kwargs: dict, _name: str = name) -> None:
            rec = _detach(_bound_kwargs(module, args, kwargs))
            rec["return_dict"] = (False if "return_dict" in inspect.signature(type(module).forward).parameters
                                  else rec.get("return_dict"))
            if rec.get("return_dict") is None:
                rec.pop("return_dict", None)
            records[_name].append(rec)

        handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run_pipeline(pipe, run, progress=progress, desc="recording denoiser inputs")
    finally:
        for h in handles:
            h.remove()
    for name, recs in records.items():
        if not recs:
            raise ValueError(f"the pipeline never called component {name!r} while calibrating; is it the pipeline's denoiser?")
    return records


def calibrate_activations(
    pipe: Any, models: dict[str, nn.Module], states: dict[str, TimestepState], run: CalibrationRun, per_timestep: bool,
    progress: bool = True,
) -> dict[str, tuple[tuple[float, ...], dict[str, LayerActivationStats]]]:
    """Set the static activation scales of every component in ``models`` from pipeline runs.

    Returns, per component, the calibrated timesteps (schedule order) and per-layer statistics."""
    layers = {
        cname: {n: m for n, m in model.named_modules() if isinstance(m, DiffusionQuantLinear) and m.act_scale is not None}
        for cname, model in models.items()
    }
    for cname, ls in layers.items():
        states[cname].recording = True
        states[cname].calls = []
        for m in ls.values():
            m.start_observing()
    try:
        try:
            run_pipeline(pipe, run, states=list(states.values()), progress=progress, desc="calibrating activations")
        finally:
            for st in states.values():
                st.recording = False
        return {cname: _finish_component(cname, ls, states[cname], per_timestep) for cname, ls in layers.items()}
    except BaseException:
        for ls in layers.values():
            for m in ls.values():
                m.stop_observing()
        raise


def _finish_component(
    cname: str, layers: dict[str, DiffusionQuantLinear], state: TimestepState, per_timestep: bool
) -> tuple[tuple[float, ...], dict[str, LayerActivationStats]]:
    """Set one component's static scales from what its layers observed; returns the calibrated
    timesteps (schedule order) and per-layer statistics."""
    seen: list[float] = []
    for t, _ in state.calls:
        if t is not None and t not in seen:
            seen.append(t)
    if not state.calls:
        raise ValueError(f"the pipeline never called component {cname!r} while calibrating; is it the pipeline's denoiser?")
    if per_timestep and not seen:
        raise ValueError(
            f"component {cname!r} was called without a 'timestep' argument, so per-timestep activation scales cannot "
            "be calibrated; use act_scales='shared'"
        )
    timesteps = tuple(seen) if per_timestep else ()
    stats: dict[str, LayerActivationStats] = {}
    for name, m in layers.items():
        obs = m.finish_observing(timesteps)
        per_t = {t: max(float(v.max()) for v in vs) for t, vs in obs.per_timestep.items() if t is not None}
        stats[name] = LayerActivationStats(
            name=name,
            absmax_per_timestep=per_t,
            absmax_per_branch=dict(obs.per_branch),
            scale=float(m.act_scale),
            scales_per_timestep=[float(s) for s in m.act_scales_t] if m.act_scales_t is not None else None,
        )
    state.timesteps = timesteps
    return timesteps, stats


def _finish_registration() -> None:
    from . import _finish_pending_registration

    _finish_pending_registration()


_finish_registration()
