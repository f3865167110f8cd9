"""``calibrate(model, config, data)``: data-aware post-training quantization, block by block.

The engine runs the model's repeated blocks one at a time (see :mod:`.blocks`). For each block it
holds the block's inputs along two chains, *float* (what the float model computes) and *quantized*
(the outputs of the already-quantized blocks before it), and:

1. computes the float block's outputs on the float inputs (the targets);
2. records input statistics of every Linear layer on the quantized inputs: per-channel range, mean
   square (the importance that weights each weight's error) and, for GPTQ, the Hessian ``X^T X``;
3. SmoothQuant or LET: folds per-channel scales into the previous norm/Linear (verified exact);
4. LWC/LET: trains clipping strengths and channel scales against the targets (:mod:`.lwc`);
5. chooses each layer's grid parameters (activation-aware fit, or LWC's), refines piecewise
   breakpoints against the block output, runs GPTQ (or a plugin's calibration algorithm, which
   gets a :class:`LayerCalibration`) if asked, and swaps in ``QuantLinear`` layers;
6. sets static activation scales, and runs the quantized block to get the next block's inputs.

Memory holds one block's inputs and outputs on both chains plus that block's statistics. Layers
outside the blocks (e.g. a pooler) and layers that receive no calibration tokens (e.g. an MoE
expert no token was routed to) are quantized data-free, never with empty statistics, and the report
lists them. With ``mixed_precision_budget`` a first pass measures every layer's sensitivity to each
candidate (bits, grid) and :func:`.mixed_precision.allocate` picks one per layer; the plan becomes
per-layer ``overrides`` in the saved config, so a reload rebuilds the same layers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import CalibrationConfig, LayerSpec, PiecewiseQuantConfig, QuantSpec
from ..formats.groups import group_view, importance_view
from ..qlinear import QuantLinear
from ..quantization import _record_in_host_config, check_float_model, layer_spec_for, plan_layers, warn_unquantized
from ..registry import get_calibration_algorithm, get_format
from .blocks import BlockInputs, capture_block_inputs, find_blocks, onload_block, relative_error, run_block
from .data import prepare_batches
from .smoothing import find_fold_groups, smoothquant_scales, trace_tensors, verify_folds
from .undo import ModelUndo

__all__ = ["calibrate", "CalibrationReport", "LayerReport", "BlockReport", "LayerCalibration"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerCalibration:
    """What a plugin calibration algorithm knows about one layer (see ``CalibrationConfig.algorithm``).

    Attributes:
        name: the layer's full module name.
        layer: its :class:`~piecewise_quant.config.LayerSpec` (scheme, shape, resolved group size).
        fmt: its weight format; ``fmt.fake_quantize`` / ``fmt.encode`` work with ``params``.
        params: per-group parameters already chosen (activation-aware fit, or LWC's learned clip),
            in the format's ``fit`` layout; a good starting point or a baseline.
        hessian: ``2 X^T X / n`` over the layer's ``n`` calibration input rows ``X`` (float32,
            ``(in, in)``): the squared output error of a weight change ``D`` is ``tr(D H D^T) / 2``.
        importance: mean squared input per column (float32, ``(in,)``), the diagonal of ``H / 2``.
        tokens: how many input rows the statistics saw.
    """

    name: str
    layer: LayerSpec
    fmt: Any
    params: dict[str, torch.Tensor]
    hessian: torch.Tensor
    importance: torch.Tensor
    tokens: int


@dataclass
class LayerReport:
    name: str
    grid: str
    bits: int
    bits_per_weight: float
    tokens: int
    method: str  # what chose the weights: "gptq", "lwc", "aware", "data-free", or a plugin algorithm's name
    note: str = ""


@dataclass
class BlockReport:
    index: int
    rel_error: float  # ||quantized block output - float block output||^2 / ||float output||^2
    folded: int
    lwc_loss: tuple[float, float] | None
    seconds: float


@dataclass(repr=False)
class CalibrationReport:
    """What a calibration run did: per layer and per block, time and memory.

    ``str(report)`` and ``repr(report)`` give :meth:`summary` followed by :meth:`table` (one row
    per layer); ``calibrate`` logs the summary (logger ``piecewise_quant.calibration.engine``) and
    prints nothing."""

    layers: dict[str, LayerReport] = field(default_factory=dict)
    blocks: list[BlockReport] = field(default_factory=list)
    blocks_path: str = ""
    n_samples: int = 0
    n_tokens: int = 0
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_held_mb: float = 0.0
    mixed_precision: dict[str, Any] | None = None

    @property
    def data_free_layers(self) -> list[str]:
        return [n for n, r in self.layers.items() if r.method == "data-free"]

    def summary(self) -> str:
        lines = [
            f"calibrated {len(self.layers)} layers in {len(self.blocks)} blocks ({self.blocks_path}) on "
            f"{self.n_samples} samples / {self.n_tokens} tokens in {self.wall_s:.1f} s",
            f"peak memory: process RSS {self.peak_rss_mb:.0f} MB; block inputs/outputs held at once {self.peak_held_mb:.1f} MB",
        ]
        if self.blocks:
            errs = ", ".join(f"{b.rel_error:.2e}" for b in self.blocks)
            lines.append(f"block output relative error: {errs}")
        free = self.data_free_layers
        if free:
            lines.append(f"data-free fallback for {len(free)} layer(s): " + ", ".join(f"{n} ({self.layers[n].note})" for n in free))
        if self.mixed_precision:
            mp = self.mixed_precision
            lines.append(f"mixed precision: {mp['average_bits_per_weight']:.3f} bits/weight (budget {mp['budget']}); {mp['counts']}")
        return "\n".join(lines)

    def table(self) -> str:
        """One Markdown row per calibrated layer: grid, bits, bits/weight, calibration tokens seen,
        what chose its weights (``gptq``, ``lwc``, ``aware``, ``data-free``...) and why."""
        lines = ["| layer | grid | bits | bits/weight | tokens | method | note |", "|---|---|---:|---:|---:|---|---|"]
        for r in self.layers.values():
            lines.append(f"| {r.name} | {r.grid} | {r.bits} | {r.bits_per_weight:.3f} | {r.tokens:,} | {r.method} | {r.note} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary() + "\n\n" + self.table()

    def __repr__(self) -> str:
        return str(self)


@dataclass
class _Stats:
    tokens: int = 0
    absmax: torch.Tensor | None = None
    amin: torch.Tensor | None = None
    amax: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None
    xtx: torch.Tensor | None = None

    def importance(self) -> torch.Tensor:
        return self.sumsq / max(self.tokens, 1)

    def hessian(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.tokens, 1))


@torch.no_grad()
def _collect_stats(block: nn.Module, inputs: BlockInputs, hidden: list[torch.Tensor], names: dict[str, str],
                   hessian: bool, call_block: Any = None) -> dict[str, _Stats]:
    stats = {n: _Stats() for n in names}
    handles = []

    def hook(rel: str):
        def fn(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if not bool(torch.isfinite(x).all()):
                raise ValueError(
                    f"the activations entering layer {names[rel]!r} contain NaN or Inf; check the calibration "
                    "data and the float model (quantizing would produce NaN scales)"
                )
            st = stats[rel]
            st.tokens += x.shape[0]
            mx, mn = x.amax(dim=0), x.amin(dim=0)
            if st.amax is None:
                st.amax, st.amin, st.sumsq = mx, mn, (x * x).sum(dim=0)
                st.xtx = x.t() @ x if hessian else None
            else:
                st.amax, st.amin = torch.maximum(st.amax, mx), torch.minimum(st.amin, mn)
                st.sumsq += (x * x).sum(dim=0)
                if hessian:
                    st.xtx += x.t() @ x
            st.absmax = torch.maximum(st.amax.abs(), st.amin.abs())
        return fn

    for rel in names:
        handles.append(block.get_submodule(rel).register_forward_pre_hook(hook(rel)))
    try:
        run_block(block, inputs, hidden)
    finally:
        for h in handles:
            h.remove()
    return stats


def _fit(fmt: Any, weight: torch.Tensor, layer: LayerSpec, st: _Stats | None, aware: bool) -> dict[str, torch.Tensor]:
    groups = group_view(weight.detach().float(), layer)
    imp = importance_view(st.importance(), layer) if (aware and st is not None and st.tokens > 0) else None
    return fmt.fit(groups, layer, importance=imp)


def _candidate_spec(spec: QuantSpec, bits: int, grid: str) -> QuantSpec:
    observer = spec.observer if spec.observer in ("mse", "minmax") else "mse"
    return spec.with_changes({"bits": bits, "grid": grid, "observer": observer, "group_size": spec.group_size})


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def calibrate(
    model: nn.Module,
    config: PiecewiseQuantConfig | None = None,
    data: Any = None,
    *,
    tokenizer: Any = None,
    progress: bool = True,
) -> CalibrationReport:
    """Quantize ``model`` in place with data-aware calibration; returns a :class:`CalibrationReport`.

    ``config.calibration`` (a :class:`~piecewise_quant.CalibrationConfig` or preset name; default
    ``"aware"``) chooses the algorithms. ``data``: ``None`` (the bundled ``pydoc_data`` corpus),
    text (a string or list of strings, tokenised with ``tokenizer`` or the model's own), token ids
    (1-D stream or 2-D samples) or an iterable of model-input dicts. The model keeps
    ``model.piecewise_quant_config`` (with the mixed-precision plan as overrides) and, for Hugging
    Face models, ``model.config.quantization_config``, so ``save_pretrained`` writes a checkpoint
    that reloads without calibration.
    """
    t_start = time.perf_counter()
    config = config if config is not None else PiecewiseQuantConfig(calibration=CalibrationConfig())
    if not isinstance(config, PiecewiseQuantConfig):
        raise TypeError(f"config must be a PiecewiseQuantConfig, got {type(config).__name__}")
    cal = config.calibration or CalibrationConfig()
    if config.calibration is None:
        config = dataclasses.replace(config, calibration=cal)
    check_float_model(model, "calibrate")
    # looked up once, before any work: an unknown name fails at once
    algorithm = get_calibration_algorithm(cal.algorithm) if cal.algorithm is not None else None
    plan = plan_layers(model, config)
    if not plan:
        raise ValueError("found no nn.Linear layer to quantize (all were skipped by modules_to_not_convert, or the model has none)")
    blocks_path, blocks = find_blocks(model, cal.blocks)
    if data is None and cal.dataset is not None:
        from pathlib import Path

        try:
            data = Path(cal.dataset).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"calibration.dataset={cal.dataset!r} cannot be read as UTF-8 text: {exc}") from None
    batches = prepare_batches(
        data, model=model, tokenizer=tokenizer, n_samples=cal.n_samples, seq_len=cal.seq_len,
        batch_size=cal.batch_size, seed=cal.seed,
    )
    torch.manual_seed(cal.seed)
    was_training = model.training
    model.eval()
    report = CalibrationReport(blocks_path=blocks_path)
    prefixes = [f"{blocks_path}.{i}." if blocks_path else f"{i}." for i in range(len(blocks))]
    block_layers: list[dict[str, str]] = [
        {full[len(p):]: full for full in plan if full.startswith(p)} for p in prefixes
    ]
    inside = {full for bl in block_layers for full in bl.values()}
    outside = [n for n in plan if n not in inside]
    # everything calibration changes is recorded first: any exception, KeyboardInterrupt included,
    # puts the model back as it was (blocks are changed in place; outside layers only swapped)
    undo = ModelUndo()
    undo.record(blocks, copy_values=True)
    for name in plan:
        parent = name.rpartition(".")[0]
        undo.record_children(model.get_submodule(parent) if parent else model)
    try:
        with torch.no_grad():
            inputs = capture_block_inputs(model, blocks[0], batches)
        report.n_samples = sum(int(h.shape[0]) for h in inputs.hidden)
        report.n_tokens = sum(int(h.shape[0] * h.shape[1]) if h.dim() >= 3 else int(h.shape[0]) for h in inputs.hidden)
        if cal.mixed_precision_budget is not None:
            plan, config, report.mixed_precision = _mixed_precision(
                model, config, cal, plan, blocks, block_layers, inputs, progress
            )
        fp = list(inputs.hidden)
        q = [h.clone() for h in fp]
        bar = tqdm(list(enumerate(blocks)), desc="calibrating", unit="block", disable=not progress)
        for i, block in bar:
            t0 = time.perf_counter()
            onload_block(block)
            names = {rel: full for rel, full in block_layers[i].items()}
            held = sum(t.numel() * t.element_size() for t in fp + q)
            fp_out = run_block(block, inputs, fp)
            held += sum(t.numel() * t.element_size() for t in fp_out)
            report.peak_held_mb = max(report.peak_held_mb, held / 2**20)
            folded, lwc_loss = _calibrate_block(block, names, plan, cal, algorithm, inputs, q, fp_out, report)
            q_out = run_block(block, inputs, q)
            rel = relative_error(q_out, fp_out)
            report.blocks.append(BlockReport(i, rel, folded, lwc_loss, time.perf_counter() - t0))
            bar.set_postfix(rel_err=f"{rel:.2e}")
            fp, q = fp_out, q_out
        del fp, q
        for name in outside:
            layer = plan[name]
            fmt = get_format(layer.spec.grid)
            linear = model.get_submodule(name)
            model.set_submodule(name, QuantLinear.from_linear(linear, layer, fmt))
            report.layers[name] = LayerReport(name, layer.spec.grid, layer.spec.bits, fmt.bits_per_weight(layer), 0,
                                              "data-free", "outside the repeated blocks")
            if layer.spec.act_bits is not None and layer.spec.act_mode == "static_per_tensor":
                raise ValueError(
                    f"layer {name!r} lies outside the calibrated blocks ({blocks_path}) and cannot get a static "
                    "activation scale; keep it in float (modules_to_not_convert) or give it act_mode='dynamic_per_token'"
                )
    except BaseException:
        undo.restore()
        raise
    finally:
        model.train(was_training)
    del undo
    model.piecewise_quant_config = config
    _record_in_host_config(model, config)
    report.wall_s = time.perf_counter() - t_start
    report.peak_rss_mb = _peak_rss_mb()
    logger.info("%s", report.summary())
    if report.data_free_layers:
        logger.warning("data-free quantization for %d layer(s): %s", len(report.data_free_layers), report.data_free_layers)
    warn_unquantized(model)
    return report


def _calibrate_block(
    block: nn.Module, names: dict[str, str], plan: dict[str, LayerSpec], cal: CalibrationConfig, algorithm: Any,
    inputs: BlockInputs, q: list[torch.Tensor], fp_out: list[torch.Tensor], report: CalibrationReport,
) -> tuple[int, tuple[float, float] | None]:
    layers = {rel: plan[full] for rel, full in names.items()}
    fmts = {rel: get_format(lay.spec.grid) for rel, lay in layers.items()}
    need_h = cal.gptq or cal.refine_breakpoints or cal.algorithm is not None
    stats = _collect_stats(block, inputs, q, names, hessian=need_h)
    # a layer that saw no tokens, or whose format has no calibration interface, is quantized data-free
    calibrated = {rel for rel in layers if stats[rel].tokens > 0 and fmts[rel].supports_calibration}
    folded = 0
    call0 = lambda: inputs.call(block, 0, q[0])  # noqa: E731
    if (cal.smoothquant is not None or cal.let) and calibrated:
        groups = find_fold_groups(block, call0, calibrated)
        alpha = cal.smoothquant if cal.smoothquant is not None else 0.5
        scales = [
            smoothquant_scales(stats[g.consumers[0]].absmax, [block.get_submodule(c).weight for c in g.consumers], alpha)
            for g in groups
        ]
        groups = verify_folds(block, groups, call0, scales, [None] * len(groups))
        folded = len(groups)
        if groups:
            stats = _collect_stats(block, inputs, q, names, hessian=need_h)
            for g in groups:
                st = stats[g.consumers[0]]
                g.act_absmax, g.act_mean = st.absmax, (st.amax + st.amin) / 2
    else:
        groups = []
    params: dict[str, dict[str, torch.Tensor]] = {}
    for rel in calibrated:
        params[rel] = _fit(fmts[rel], block.get_submodule(rel).weight, layers[rel], stats[rel], cal.activation_aware)
    lwc_loss = None
    method = {rel: ("aware" if cal.activation_aware else "calibrated") for rel in calibrated}
    if (cal.lwc or cal.let) and calibrated:
        from .lwc import train_block

        sub = {rel: layers[rel] for rel in calibrated}
        clips, before, after = train_block(
            block, sub, {r: fmts[r] for r in sub}, params, groups if cal.let else [],
            lambda fn, i, h: inputs.call(fn, i, h), q, fp_out,
            lwc=cal.lwc, let=cal.let, epochs=cal.epochs, lwc_lr=cal.lwc_lr, let_lr=cal.let_lr, seed=cal.seed,
        )
        lwc_loss = (before, after)
        if cal.let and groups:
            stats = _collect_stats(block, inputs, q, names, hessian=need_h)
        for rel in calibrated:
            w = block.get_submodule(rel).weight
            if cal.lwc and clips[rel].learn:
                params[rel] = clips[rel].final_params(w)
                method[rel] = "lwc"
            else:
                params[rel] = _fit(fmts[rel], w, layers[rel], stats[rel], cal.activation_aware)
    if cal.refine_breakpoints:
        from .refine import refine_breakpoints

        for rel in sorted(calibrated):
            if layers[rel].spec.grid == "piecewise":
                params[rel] = refine_breakpoints(
                    block, rel, layers[rel], fmts[rel], params[rel], stats[rel].hessian(),
                    lambda: run_block(block, inputs, q[:2]), fp_out[:2],
                )
    gptq_out: dict[str, tuple[dict[str, torch.Tensor], str]] = {}
    if cal.gptq and calibrated:
        from .gptq import gptq_quantize

        stages = _stages(block, call0, [r for r in names if r in calibrated]) if cal.true_sequential else [sorted(calibrated)]
        for k, stage in enumerate(stages):
            if k > 0:  # inputs as the already-quantized layers of this block produce them
                sub = {r: names[r] for r in stage}
                stats.update(_collect_stats(block, inputs, q, sub, hessian=True))
            for rel in stage:
                layer, fmt = layers[rel], fmts[rel]
                linear = block.get_submodule(rel)
                refined = cal.refine_breakpoints and layer.spec.grid == "piecewise"
                fixed = params[rel] if method[rel] == "lwc" or refined else None
                res = gptq_quantize(
                    linear.weight.detach(), stats[rel].hessian(), layer, fmt, params=fixed,
                    act_order=cal.act_order, damp=cal.damp, activation_aware=cal.activation_aware,
                )
                linear.weight.data.copy_(res.weight.to(linear.weight.dtype))
                gptq_out[rel] = (res.tensors, f"damp {res.damp:g}" if res.damp != cal.damp else "")
                method[rel] = "gptq" + ("+lwc" if method[rel] == "lwc" else "")
    for rel, full in names.items():
        layer, fmt = layers[rel], fmts[rel]
        linear = block.get_submodule(rel)
        st = stats[rel]
        if rel in calibrated:
            if rel in gptq_out:
                tensors, note = gptq_out[rel]
            elif cal.algorithm is not None:
                ctx = LayerCalibration(full, layer, fmt, params[rel], st.hessian(), st.importance(), st.tokens)
                tensors = _run_algorithm(cal.algorithm, algorithm, linear.weight.detach(), ctx)
                method[rel] = cal.algorithm + ("+lwc" if method[rel] == "lwc" else "")
                note = ""
            else:
                tensors = fmt.encode(linear.weight.detach(), params[rel], layer)
                note = ""
            ql = QuantLinear.empty(layer, fmt, linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
            try:
                ql.load_quantized(tensors)
            except ValueError as exc:
                if cal.algorithm is None or rel in gptq_out:
                    raise
                raise ValueError(f"calibration algorithm {cal.algorithm!r} returned tensors that do not fit: {exc}") from None
            if linear.bias is not None:
                ql.bias.data.copy_(linear.bias.detach())
            report.layers[full] = LayerReport(full, layer.spec.grid, layer.spec.bits, fmt.bits_per_weight(layer), st.tokens, method[rel], note)
        else:
            ql = QuantLinear.from_linear(linear, layer, fmt)
            why = "received no calibration tokens" if st.tokens == 0 else f"grid {layer.spec.grid!r} has no calibration interface"
            report.layers[full] = LayerReport(full, layer.spec.grid, layer.spec.bits, fmt.bits_per_weight(layer), st.tokens, "data-free", why)
            if st.tokens == 0 and layer.spec.act_bits is not None and layer.spec.act_mode == "static_per_tensor":
                raise ValueError(
                    f"layer {full!r} received no calibration tokens, so its static activation scale is unknown; give more "
                    "varied calibration data or use act_mode='dynamic_per_token' for it (overrides)"
                )
        block.set_submodule(rel, ql)
    static = [m for m in block.modules() if isinstance(m, QuantLinear) and m.act_scale is not None]
    if static:
        for m in static:
            m.start_observing()
        try:
            run_block(block, inputs, q)
        finally:
            for m in static:
                m._observing = False
        for m in static:
            m.finish_observing()
    return folded, lwc_loss


def _run_algorithm(name: str, algorithm: Any, weight: torch.Tensor, ctx: LayerCalibration) -> dict[str, torch.Tensor]:
    """Call a plugin algorithm on a copy of the weight (it cannot corrupt the model) and check
    that it returned finite tensors by name; shapes and dtypes are checked on loading."""
    with torch.no_grad():
        tensors = algorithm(weight.clone(), ctx)
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise TypeError(
            f"calibration algorithm {name!r} must return a dict of tensor name -> Tensor for layer {ctx.name!r}, "
            f"got {type(tensors).__name__}"
        )
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"calibration algorithm {name!r} returned NaN or Inf in {bad} for layer {ctx.name!r}")
    return tensors


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


def _mixed_precision(
    model: nn.Module, config: PiecewiseQuantConfig, cal: CalibrationConfig, plan: dict[str, LayerSpec],
    blocks: nn.Module, block_layers: list[dict[str, str]], inputs: BlockInputs, progress: bool,
) -> tuple[dict[str, LayerSpec], PiecewiseQuantConfig, dict[str, Any]]:
    """Sensitivity of every layer to every candidate (bits, grid), measured as the relative error of
    its block's output when only that layer is quantized; then the allocation under the budget."""
    from .mixed_precision import Candidate, allocate, summarize

    candidates: dict[str, list[Candidate]] = {}
    n_weights: dict[str, int] = {}
    fp = list(inputs.hidden)
    n_probe = min(len(fp), 2)
    # at 8 bits the grids are equally fine and piecewise's 256-breakpoint search is slow: uniform only
    combos = [(b, g) for b in cal.mixed_precision_bits for g in cal.mixed_precision_grids
              if not (b == 8 and g == "piecewise" and "uniform" in cal.mixed_precision_grids)]
    bar = tqdm(list(enumerate(blocks)), desc="sensitivity", unit="block", disable=not progress)
    for i, block in bar:
        onload_block(block)
        names = block_layers[i]
        fp_out = run_block(block, inputs, fp)
        stats = _collect_stats(block, inputs, fp[:n_probe], names, hessian=False)
        for rel, full in names.items():
            base = plan[full]
            linear = block.get_submodule(rel)
            w0 = linear.weight.data.clone()
            cands = []
            for bits, grid in combos:
                try:
                    spec = _candidate_spec(base.spec, bits, grid)
                    layer = layer_spec_for(full, spec, base.in_features, base.out_features)
                except ValueError:
                    continue
                fmt = get_format(grid)
                st = stats[rel] if stats[rel].tokens > 0 else None
                p = _fit(fmt, w0, layer, st, cal.activation_aware)
                wq = fmt.fake_quantize(group_view(w0.float(), layer), p, layer).reshape(w0.shape)
                linear.weight.data.copy_(wq.to(w0.dtype))
                out = run_block(block, inputs, fp[:n_probe])
                linear.weight.data.copy_(w0)
                err = relative_error(out, fp_out[:n_probe])
                cands.append(Candidate(bits, grid, fmt.bits_per_weight(layer), err if math.isfinite(err) else float("inf")))
            if not cands:
                raise ValueError(f"layer {full!r}: none of the mixed-precision candidates fits its shape")
            candidates[full] = cands
            n_weights[full] = base.in_features * base.out_features
        fp = fp_out
    outside = [n for n in plan if n not in candidates]
    for name in outside:  # layers outside the blocks keep the config's scheme and count against the budget
        base = plan[name]
        fmt = get_format(base.spec.grid)
        candidates[name] = [Candidate(base.spec.bits, base.spec.grid, fmt.bits_per_weight(base), 0.0)]
        n_weights[name] = base.in_features * base.out_features
    choice = allocate(candidates, n_weights, cal.mixed_precision_budget)
    overrides = {}
    for name, c in choice.items():
        if name in outside:
            continue
        overrides[name] = {"bits": c.bits, "grid": c.grid}
    config = config.with_overrides(overrides)
    new_plan = plan_layers(model, config)
    summary = summarize(choice, n_weights)
    summary["budget"] = cal.mixed_precision_budget
    summary["plan"] = {n: f"{c.grid}{c.bits}" for n, c in choice.items()}
    return new_plan, config, summary
