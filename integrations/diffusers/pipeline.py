"""``enable_quant(pipe, config, ...)`` / ``disable_quant(pipe)``: quantize a pipeline's denoiser in place.

The denoiser components (``transformer``, ``transformer_2``, ``unet``...) are quantized; text
encoders and the VAE stay as they are unless named in ``components``. When the config quantizes
activations with static scales, or names a calibration recipe, the pipeline itself is run on the
calibration prompts, so the statistics span every timestep of the schedule and both guidance
branches (see :mod:`.calibration`). Each quantized component gets the piecewise
``quantization_config`` and quantizer, so ``pipe.save_pretrained(dir)`` writes a pipeline that plain
``DiffusionPipeline.from_pretrained(dir)`` reloads quantized.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from piecewise_quant.config import PiecewiseQuantConfig

from .calibration import LayerActivationStats, check_calibration_prompts, resolve_calibration_inputs
from .config import DiffusionOptions, PiecewiseDiffusersConfig, check_rotation, split_config

__all__ = ["enable_quant", "disable_quant", "DiffusionQuantReport", "ComponentReport", "DENOISER_PREFIXES", "denoiser_names"]

DENOISER_PREFIXES = ("transformer", "unet")


@dataclass
class ComponentReport:
    """One quantized component: its layers, storage and (if run) calibration."""

    name: str
    class_name: str
    n_layers: int
    bits_per_weight: float
    quantized_weight_bytes: int  # the quantized layers' packed weights, scales and metadata
    float_weight_bytes: int  # what those layers' weights took before
    total_bytes: int  # every parameter and buffer of the component after quantization
    timesteps: tuple[float, ...] = ()
    activations: dict[str, LayerActivationStats] = field(default_factory=dict)
    engine: Any = None  # piecewise_quant.CalibrationReport when a calibration recipe ran
    bos: Any = None  # .bos.BosReport with bos_aware=True


@dataclass
class DiffusionQuantReport:
    """What :func:`enable_quant` did."""

    components: dict[str, ComponentReport] = field(default_factory=dict)
    n_calibration_items: int = 0
    n_pipeline_calls: int = 0
    wall_s: float = 0.0

    def summary(self) -> str:
        lines = []
        for c in self.components.values():
            lines.append(
                f"{c.name} ({c.class_name}): {c.n_layers} layers at {c.bits_per_weight:.3f} bits/weight, "
                f"{c.float_weight_bytes / 2**20:.2f} MiB -> {c.quantized_weight_bytes / 2**20:.2f} MiB"
            )
            if c.activations:
                spreads = sorted(s.timestep_spread for s in c.activations.values() if s.timestep_spread == s.timestep_spread)
                mode = f"per timestep ({len(c.timesteps)} timesteps)" if c.timesteps else "shared over timesteps"
                line = f"  static activation scales for {len(c.activations)} layers, {mode}"
                if spreads:
                    line += (f"; input range max/min across timesteps: median x{spreads[len(spreads) // 2]:.2f}, "
                             f"worst x{spreads[-1]:.2f}")
                lines.append(line)
                branches = sorted({b for s in c.activations.values() for b in s.absmax_per_branch})
                if {"cond", "uncond"} <= set(branches):
                    ratios = sorted(
                        s.absmax_per_branch["cond"] / s.absmax_per_branch["uncond"]
                        for s in c.activations.values() if s.absmax_per_branch.get("uncond", 0) > 0
                    )
                    if ratios:
                        lines.append(f"  cond/uncond input range ratio: median {ratios[len(ratios) // 2]:.2f} "
                                     f"(min {ratios[0]:.2f}, max {ratios[-1]:.2f})")
            if c.bos is not None:
                lines.append("  " + c.bos.summary())
            if c.engine is not None:
                lines.append("  " + c.engine.summary().replace("\n", "\n  "))
        if self.n_pipeline_calls:
            lines.append(f"calibration: {self.n_calibration_items} prompts/labels, {self.n_pipeline_calls} pipeline calls")
        lines.append(f"took {self.wall_s:.1f} s")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass
class _Restore:
    """What ``disable_quant`` needs to give a component back in float."""

    float_layers: dict[str, nn.Module] | None
    state: dict[str, torch.Tensor] | None  # full float state when calibration changed other weights in place
    internal_dict: Any
    device: torch.device | None


def denoiser_names(pipe: Any) -> list[str]:
    """The pipeline components that denoise: ``torch.nn.Module`` components named ``transformer*`` or ``unet*``."""
    return [
        name for name, comp in pipe.components.items()
        if name.startswith(DENOISER_PREFIXES) and isinstance(comp, nn.Module)
    ]


def _check_pipeline(pipe: Any) -> None:
    if not hasattr(pipe, "components") or not isinstance(getattr(pipe, "components", None), dict):
        raise TypeError(
            f"enable_quant expects a diffusers DiffusionPipeline; got {type(pipe).__name__}. To quantize a single model "
            "use Model.from_pretrained(..., quantization_config=PiecewiseQuantConfig(...))"
        )


def _resolve_components(pipe: Any, components: Sequence[str] | str | None) -> list[str]:
    if components is None:
        names = denoiser_names(pipe)
        if not names:
            present = ", ".join(f"{k} ({type(v).__name__})" for k, v in pipe.components.items()) or "none"
            raise ValueError(
                f"{type(pipe).__name__} has no denoiser to quantize (no torch.nn.Module component named "
                f"'transformer*' or 'unet*'; components: {present}); name the components to quantize with components=[...]"
            )
        return names
    if isinstance(components, str):
        components = [components]
    names = list(components)
    if not names:
        raise ValueError("components is empty; give the names of the pipeline components to quantize, or None for the denoiser")
    for name in names:
        comp = pipe.components.get(name)
        if comp is None:
            raise ValueError(f"{type(pipe).__name__} has no component {name!r}; it has: {', '.join(pipe.components)}")
        if not isinstance(comp, nn.Module):
            raise ValueError(f"component {name!r} is a {type(comp).__name__}, not a torch.nn.Module; "
                             "only models can be quantized")
    return names


def _is_quantized(model: nn.Module) -> bool:
    from piecewise_quant.qlinear import QuantLinear

    return any(isinstance(m, QuantLinear) for m in model.modules())


def _engine_config(core: PiecewiseQuantConfig) -> PiecewiseQuantConfig:
    """``core`` with static activation modes made dynamic: the block engine would refuse static scales
    for layers outside the blocks; the pipeline pass sets every static scale afterwards."""

    def dyn(changes: dict[str, Any]) -> dict[str, Any]:
        return {**changes, "act_mode": "dynamic_per_token"} if changes.get("act_mode") == "static_per_tensor" else changes

    mode = "dynamic_per_token" if core.act_mode == "static_per_tensor" else core.act_mode
    return dataclasses.replace(core, act_mode=mode, overrides={p: dyn(dict(c)) for p, c in core.overrides.items()})


def _check_blocks(model: nn.Module, name: str, core: PiecewiseQuantConfig, record: dict[str, Any]) -> None:
    """Calibration recipes run the denoiser block by block: the blocks must exist and map hidden
    states to hidden states (dual-stream SD3/Flux blocks return a tuple of two streams)."""
    from piecewise_quant.calibration.blocks import capture_block_inputs, find_blocks

    try:
        path, blocks = find_blocks(model, core.calibration.blocks)
    except ValueError as exc:
        raise ValueError(f"component {name!r} ({type(model).__name__}): {exc}") from None
    inputs = capture_block_inputs(model, blocks[0], [record])
    with torch.no_grad():
        if inputs.hidden_in_kwargs:
            out = blocks[0](*inputs.args[0], **{**inputs.kwargs[0], "hidden_states": inputs.hidden[0]})
        else:
            out = blocks[0](inputs.hidden[0], *inputs.args[0], **inputs.kwargs[0])
    if not isinstance(out, torch.Tensor) or out.shape != inputs.hidden[0].shape:
        raise ValueError(
            f"component {name!r} ({type(model).__name__}): calibration recipes run the blocks one at a time and need "
            f"blocks that return their hidden states, but the blocks at {path!r} return "
            f"{type(out).__name__ if not isinstance(out, torch.Tensor) else 'a tensor of another shape'} (dual-stream "
            "blocks such as SD3's or Flux's); use calibration=None (data-free weights, with static activation scales "
            "calibrated through the pipeline if act_mode='static_per_tensor')"
        )


def _swap_engine_layers(model: nn.Module, core: PiecewiseQuantConfig, diffusion: DiffusionOptions) -> PiecewiseQuantConfig:
    """After the block engine: the final config (engine result with the original activation modes)
    and every engine ``QuantLinear`` turned into a ``DiffusionQuantLinear`` with the same tensors."""
    from piecewise_quant.qlinear import QuantLinear
    from piecewise_quant.quantization import layer_spec_for

    from .layers import DiffusionQuantLinear
    from .planning import layer_kwargs

    result: PiecewiseQuantConfig = model.piecewise_quant_config
    final = dataclasses.replace(
        result, act_mode=core.act_mode,
        overrides={p: (dict(core.overrides[p]) if p in core.overrides else dict(c)) for p, c in result.overrides.items()},
    )
    for name, q in list(model.named_modules()):
        if isinstance(q, QuantLinear) and not isinstance(q, DiffusionQuantLinear):
            spec = final.spec_for(name)
            layer = layer_spec_for(name, spec, q.in_features, q.out_features, final.online_rotation_for(name, spec))
            model.set_submodule(name, DiffusionQuantLinear.from_quant_linear(q, layer, **layer_kwargs(layer, diffusion)))
    return final


def _component_report(name: str, model: nn.Module, float_bytes: int) -> ComponentReport:
    from piecewise_quant.report import model_size_report

    from .layers import DiffusionQuantLinear

    size = model_size_report(model)
    n = sum(isinstance(m, DiffusionQuantLinear) for m in model.modules())
    return ComponentReport(
        name=name, class_name=type(model).__name__, n_layers=n, bits_per_weight=size.bits_per_weight,
        quantized_weight_bytes=(size.quantized_bits + 7) // 8, float_weight_bytes=float_bytes, total_bytes=size.total_bytes,
    )


def _record_quantized(model: nn.Module, core: PiecewiseQuantConfig, diffusion: DiffusionOptions, plan: dict[str, Any]) -> None:
    from .quantizer import PiecewiseDiffusersQuantizer

    cfg = PiecewiseDiffusersConfig(core=core, diffusion=diffusion)
    if hasattr(model, "register_to_config"):
        model.register_to_config(quantization_config=cfg)
    quantizer = PiecewiseDiffusersQuantizer(cfg, pre_quantized=True)
    quantizer.plan = dict(plan)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = cfg.quant_method
    model.piecewise_quant_config = core


def enable_quant(
    pipe: Any,
    config: PiecewiseQuantConfig | PiecewiseDiffusersConfig | dict[str, Any],
    calibration_prompts: Sequence[str] | Sequence[int] | None = None,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float | None = None,
    components: Sequence[str] | str | None = None,
    act_scales: str | None = None,
    act_group_size: int | None = None,
    bos_aware: bool | None = None,
    calibration_batch_size: int = 4,
    calibration_kwargs: dict[str, Any] | None = None,
    keep_float_weights: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> DiffusionQuantReport:
    """Quantize the pipeline's denoiser in place; returns a :class:`DiffusionQuantReport`.

    Args:
        pipe: a diffusers ``DiffusionPipeline``.
        config: a :class:`piecewise_quant.PiecewiseQuantConfig` (grids, bits, groups, activation bits,
            per-pattern overrides, an optional calibration recipe), e.g. from
            :func:`~piecewise_quant.integrations.diffusers.diffusion_recipe`, or a
            :class:`PiecewiseDiffusersConfig` carrying diffusion options.
        calibration_prompts: prompts (text pipelines) or class ids / label names (``DiTPipeline``)
            to run the pipeline on when calibration is needed (static activation scales or a
            calibration recipe). ``None`` uses built-in defaults (8 varied prompts, or 8 classes
            spread over the label range). An empty list is an error.
        num_inference_steps: denoising steps of each calibration run; use the schedule you will
            generate with (per-timestep scales are matched to the nearest calibrated timestep).
        guidance_scale: guidance of the calibration runs (``None``: the pipeline's default). With
            classifier-free guidance both branches are observed.
        components: pipeline components to quantize (default: every ``transformer*``/``unet*``).
        act_scales: ``"shared"`` or ``"per_timestep"`` static activation scales (overrides the config's
            diffusion option).
        act_group_size: dynamic activation quantization in groups of this many channels (ViDiT-Q),
            for layers with ``act_mode="dynamic_per_token"``.
        bos_aware: MixDQ's BOS-aware quantization (overrides the config's diffusion option): the
            layers that read token 0 of the text embeddings (a causal encoder's BOS token, the same
            for every prompt) keep its row in float, precomputed once (see :mod:`.bos`). Runs the
            pipeline on the calibration prompts; refused when token 0 differs across prompts (T5).
        calibration_batch_size: prompts per calibration pipeline call.
        calibration_kwargs: more arguments for the calibration pipeline calls (``height``, ``width``...).
        keep_float_weights: keep the replaced float layers (moved to the CPU) so :func:`disable_quant`
            can restore the float model exactly; ``False`` frees them.
        seed: seeds the calibration runs' noise.
        progress: show tqdm progress bars.
    """
    t0 = time.perf_counter()
    _check_pipeline(pipe)
    core, diffusion = _diffusion_config(config, act_scales, act_group_size, bos_aware)
    if core.calibration is not None and core.calibration.rotation_trials != 1:
        raise ValueError(
            f"calibration.rotation_trials={core.calibration.rotation_trials}: rotation trials are run by "
            "piecewise_quant.calibrate() on a model, not by a pipeline's enable_quant (each trial would need the "
            "pipeline's calibration runs again); set rotation_trials=1 and choose rotation.seed yourself"
        )
    models: dict[str, nn.Module] = {n: pipe.components[n] for n in _resolve_components(pipe, components)}
    check_calibration_prompts(calibration_prompts)
    job = _QuantJob(pipe, models, _plan_components(models, core, diffusion), core, diffusion, keep_float_weights, progress)
    if job.static or job.engine or job.balance or job.bos:
        job.run = resolve_calibration_inputs(
            pipe, calibration_prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            batch_size=calibration_batch_size, seed=seed, extra=calibration_kwargs,
        )
    report = job.quantize()
    report.n_calibration_items = len(job.run.items) if job.run is not None else 0
    report.wall_s = time.perf_counter() - t0
    pipe.piecewise_quant_report = report
    return report


def _diffusion_config(
    config: Any, act_scales: str | None, act_group_size: int | None, bos_aware: bool | None = None
) -> tuple[PiecewiseQuantConfig, DiffusionOptions]:
    """The core config and diffusion options ``enable_quant`` works with: the config's, with the
    keyword overrides applied and no calibrated timesteps yet."""
    core, diffusion = split_config(config)
    check_rotation(core)
    changes: dict[str, Any] = {}
    if act_scales is not None:
        changes["act_scales"] = act_scales
    if act_group_size is not None:
        changes["act_group_size"] = act_group_size
    if bos_aware is not None:
        changes["bos_aware"] = bos_aware
    changes["bos_layers"] = ()  # found later when needed
    diffusion = dataclasses.replace(diffusion, **changes)
    return core, dataclasses.replace(diffusion, timesteps=())  # calibrated later when needed


def _plan_components(
    models: dict[str, nn.Module], core: PiecewiseQuantConfig, diffusion: DiffusionOptions
) -> dict[str, dict[str, Any]]:
    """Each component's layer plan; refuses a component that is already quantized."""
    from .planning import plan_component

    plans = {}
    for name, model in models.items():
        if _is_quantized(model):
            raise ValueError(f"component {name!r} is already quantized; call pipe.disable_quant() first (or reload it in float)")
        plans[name] = plan_component(model, core, diffusion, name)
    return plans


def _float_weight_bytes(model: nn.Module, plan: dict[str, Any]) -> int:
    return sum(model.get_submodule(k).weight.numel() * model.get_submodule(k).weight.element_size() for k in plan)


@dataclass
class _QuantJob:
    """One ``enable_quant`` call on the chosen components: quantize (block engine or data-free),
    calibrate static activation scales, record the result; on any error, put the float layers back."""

    pipe: Any
    models: dict[str, nn.Module]
    plans: dict[str, dict[str, Any]]
    core: PiecewiseQuantConfig
    diffusion: DiffusionOptions
    keep_float_weights: bool
    progress: bool
    run: Any = None  # the calibration inputs, when calibration is needed
    report: DiffusionQuantReport = field(default_factory=DiffusionQuantReport)
    restores: dict[str, _Restore] = field(default_factory=dict)
    records: dict[str, list[dict[str, Any]]] | None = None  # recorded denoiser calls, shared by the passes that need them

    @property
    def static(self) -> bool:
        from .planning import has_static_activations

        return any(has_static_activations(p) for p in self.plans.values())

    @property
    def engine(self) -> bool:
        return self.core.calibration is not None

    @property
    def balance(self) -> bool:
        """ViDiT-Q's channel balance: its scales are measured on pipeline runs."""
        return self.core.rotation is not None and "balance" in self.core.rotation.rotations

    @property
    def bos(self) -> bool:
        return self.diffusion.bos_aware

    def _denoiser_records(self) -> dict[str, list[dict[str, Any]]]:
        """The denoiser calls of the calibration runs: recorded once, handed to the first pass that consumes them."""
        from .calibration import capture_denoiser_inputs

        if self.records is None:
            self.records = capture_denoiser_inputs(self.pipe, self.models, self.run, progress=self.progress)
            self.report.n_pipeline_calls += len(self.run.batches())
        return self.records

    def quantize(self) -> DiffusionQuantReport:
        float_bytes = {n: _float_weight_bytes(m, self.plans[n]) for n, m in self.models.items()}
        try:
            bos_rows = self._find_bos_rows() if self.bos else {}
            finals = self._quantize_with_engine(float_bytes) if self.engine else self._quantize_data_free(float_bytes)
            self.records = None
            if self.bos:
                from .bos import install_bos_rows

                for name, model in self.models.items():
                    install_bos_rows(model, bos_rows[name][0])
                    comp = _component_report(name, model, float_bytes[name])  # the BOS rows count in the bytes
                    comp.engine, comp.bos = self.report.components[name].engine, bos_rows[name][1]
                    self.report.components[name] = comp
            final_diffusion = self._calibrate_static_scales() if self.static else {n: self.diffusion for n in self.models}
            for name, model in self.models.items():
                if self.bos:  # the layers that got a BOS row, so the checkpoint reloads them
                    final_diffusion[name] = dataclasses.replace(final_diffusion[name], bos_layers=tuple(bos_rows[name][0]))
                _record_quantized(model, finals[name], final_diffusion[name], self.plans[name])
                model._piecewise_quant_restore = self.restores[name]
        except BaseException:
            self._roll_back()
            raise
        return self.report

    def _find_bos_rows(self) -> dict[str, tuple[dict[str, Any], Any]]:
        """Before quantizing, on the float denoisers: each component's BOS rows and report (see :mod:`.bos`)."""
        from .bos import find_bos_rows

        records = self._denoiser_records()
        n_prompts = len({str(p) for p in self.run.items})
        return {name: find_bos_rows(model, records[name], self.plans[name], name, n_prompts)
                for name, model in self.models.items()}

    def _keep(self, name: str, model: nn.Module, state: bool) -> _Restore:
        """Remember what ``disable_quant`` (or a failure) needs to give ``model`` back in float."""
        keep = self.keep_float_weights
        float_layers = ({k: model.get_submodule(k) for k in self.plans[name]} if state else {}) if keep else None
        full_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if keep and state else None
        self.restores[name] = _Restore(float_layers, full_state, getattr(model, "_internal_dict", None), _device_of(model))
        return self.restores[name]

    def _quantize_with_engine(self, float_bytes: dict[str, int]) -> dict[str, PiecewiseQuantConfig]:
        """The calibration recipe: the block engine on the denoiser inputs the pipeline produces."""
        import piecewise_quant

        records = self._denoiser_records()
        engine_core = _engine_config(self.core)
        for name, model in self.models.items():
            _check_blocks(model, name, self.core, records[name][0])
        finals = {}
        for name, model in self.models.items():
            self._keep(name, model, state=True)
            eng = piecewise_quant.calibrate(model, engine_core, records.pop(name), progress=self.progress)
            finals[name] = _swap_engine_layers(model, self.core, self.diffusion)
            self.report.components[name] = _component_report(name, model, float_bytes[name])
            self.report.components[name].engine = eng
        return finals

    def _quantize_data_free(self, float_bytes: dict[str, int]) -> dict[str, PiecewiseQuantConfig]:
        """Round-to-nearest weights; with online rotations the float weights are rotated first, and
        the ``"balance"`` rotation measures its scales on the denoiser inputs of pipeline runs."""
        from piecewise_quant.rotation import rotated

        from .planning import quantize_layers

        rotation = self.core.rotation
        records = None
        if rotation is not None and "balance" in rotation.rotations:
            records = self._denoiser_records()
        for name, model in self.models.items():
            # a rotation changes the float weights in place: keep the whole float state to give back
            keep = self._keep(name, model, state=rotation is not None).float_layers
            data = records.pop(name) if records is not None else None
            with rotated(model, rotation, self.plans[name], data=data):
                quantize_layers(model, self.plans[name], self.diffusion, keep=keep, progress=self.progress,
                                desc=f"quantizing {name}")
            self.report.components[name] = _component_report(name, model, float_bytes[name])
        return {n: self.core for n in self.models}

    def _calibrate_static_scales(self) -> dict[str, DiffusionOptions]:
        """Static activation scales from pipeline runs; returns each component's diffusion options
        (with the calibrated timesteps)."""
        from .calibration import calibrate_activations
        from .layers import TimestepState, install_timestep_hook, remove_timestep_hook

        states = {}
        for name, model in self.models.items():
            states[name] = TimestepState()
            install_timestep_hook(model, states[name])
        per_timestep = self.diffusion.act_scales == "per_timestep"
        results = calibrate_activations(self.pipe, self.models, states, self.run, per_timestep, progress=self.progress)
        self.report.n_pipeline_calls += len(self.run.batches())
        final = {n: self.diffusion for n in self.models}
        for name, (timesteps, stats) in results.items():
            final[name] = dataclasses.replace(self.diffusion, timesteps=timesteps)
            self.report.components[name].timesteps = timesteps
            self.report.components[name].activations = stats
            if not per_timestep:
                remove_timestep_hook(self.models[name])
        return final

    def _roll_back(self) -> None:
        for name, model in self.models.items():
            if name in self.restores and _is_quantized(model):
                try:
                    _restore(model, self.restores[name], name)
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass


def _device_of(model: nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def _restore(model: nn.Module, restore: _Restore, name: str) -> None:
    from piecewise_quant.qlinear import QuantLinear

    from .layers import remove_timestep_hook

    if restore.float_layers is None:
        raise ValueError(f"component {name!r}: its float weights were not kept")
    device = restore.device
    for lname, linear in restore.float_layers.items():
        current = model.get_submodule(lname)
        if not isinstance(current, QuantLinear):
            continue
        model.set_submodule(lname, linear.to(device) if device is not None else linear)
    if restore.state is not None:
        model.load_state_dict(restore.state, strict=True)
    remove_timestep_hook(model)
    if restore.internal_dict is not None:
        model._internal_dict = restore.internal_dict
    for attr in ("hf_quantizer", "piecewise_quant_config", "_piecewise_quant_restore", "is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)


def disable_quant(pipe: Any, components: Sequence[str] | str | None = None) -> None:
    """Give the quantized components back their float layers, exactly as they were.

    Raises ``ValueError`` (changing nothing) when a component's float weights were not kept: it was
    loaded from a quantized checkpoint, or quantized with ``keep_float_weights=False``; reload the
    float model instead."""
    _check_pipeline(pipe)
    if components is None:
        names = [n for n, c in pipe.components.items() if isinstance(c, nn.Module) and _is_quantized(c)]
        if not names:
            raise ValueError(f"{type(pipe).__name__} has no quantized component; nothing to disable")
    else:
        names = _resolve_components(pipe, components)
        not_q = [n for n in names if not _is_quantized(pipe.components[n])]
        if not_q:
            raise ValueError(f"component(s) {not_q} are not quantized; nothing to disable there")
    cannot = []
    for n in names:
        restore = getattr(pipe.components[n], "_piecewise_quant_restore", None)
        if restore is None or restore.float_layers is None:
            why = "loaded from a quantized checkpoint" if restore is None else "quantized with keep_float_weights=False"
            cannot.append(f"{n!r} ({why})")
    if cannot:
        raise ValueError(
            "cannot restore float behaviour: the float weights of " + ", ".join(cannot) + " were not kept; reload the "
            "float model (e.g. DiffusionPipeline.from_pretrained on the original checkpoint), or quantize with "
            "enable_quant(..., keep_float_weights=True) next time"
        )
    for n in names:
        comp = pipe.components[n]
        _restore(comp, comp._piecewise_quant_restore, n)
    if hasattr(pipe, "piecewise_quant_report"):
        del pipe.piecewise_quant_report


def _finish_registration() -> None:
    from . import _finish_pending_registration

    _finish_pending_registration()


_finish_registration()
