"""``calibrate(model, config, data)``: data-aware post-training quantization, block by block.

The engine is a block runner. It runs the model's repeated blocks one at a time (see
:mod:`.blocks`), holding each block's inputs along two chains, *float* (what the float model
computes) and *quantized* (the outputs of the already-quantized blocks before it). The algorithms
are modifiers (:mod:`.modifier`), one module each, called at fixed points of every block:

1. the runner computes the float block's outputs on the float inputs (the targets) and records the
   input statistics of every Linear layer on the quantized inputs: per-channel range, mean square
   (the importance that weights each weight's error) and, when a modifier needs it, the Hessian
   ``X^T X``; each layer gets one :class:`~.state.LayerRecord`;
2. ``before_block``: SmoothQuant (:mod:`.smoothquant`) or LET (:mod:`.let`) fold per-channel
   scales into the previous norm/Linear (verified exact);
3. the runner fits each layer's grid parameters (activation-aware);
4. ``process_block``: LWC/LET train against the targets (:mod:`.lwc`), piecewise breakpoints are
   refined (:mod:`.refine`), GPTQ quantizes the layers (:mod:`.gptq`);
5. ``process_layer``: a plugin's calibration algorithm (:mod:`.algorithm`) turns each layer into
   stored tensors; the runner swaps in ``QuantLinear`` layers;
6. ``after_block``: static activation scales (:mod:`.static_act`); the runner runs the quantized
   block to get the next block's inputs.

Memory holds one block's inputs and outputs on both chains plus that block's statistics. Layers
outside the blocks (e.g. a pooler) and layers that receive no calibration tokens (e.g. an MoE
expert no token was routed to) are quantized data-free, never with empty statistics, and the report
lists them. With a mixed-precision budget, :class:`~.mixed_precision.MixedPrecision` first measures
every layer's sensitivity to each candidate (bits, grid) and replaces the plan before the blocks run.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import DEFAULT_CALIBRATION_PRESET, CalibrationConfig, PiecewiseQuantConfig
from ..qlinear import QuantLinear
from ..quantization import _record_in_host_config, check_float_model, plan_layers, warn_unquantized
from ..registry import get_format
from ..rotation import rotated
from .algorithm import LayerCalibration
from .blocks import capture_block_inputs, find_blocks, onload_block, relative_error, run_block
from .data import held_aside_batches, prepare_batches
from .kv_scales import kv_scale_modifiers
from .report import BlockReport, CalibrationReport, LayerReport
from .state import BlockState, LayerRecord, RunState, collect_stats
from .undo import ModelUndo

__all__ = ["calibrate", "CalibrationReport", "LayerReport", "BlockReport", "LayerCalibration"]

logger = logging.getLogger(__name__)


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

    ``config.calibration`` (a :class:`~piecewise_quant.CalibrationConfig` or preset name) chooses the
    algorithms; when it is ``None`` (or ``config`` is), the ``"default"`` preset runs: the recipe
    measured best overall on the two benchmark models (``benchmarks/recipes.py``). ``"aware"`` is the
    fast option. ``data``: ``None`` (the bundled ``pydoc_data`` corpus),
    text (a string or list of strings, tokenised with ``tokenizer`` or the model's own), token ids
    (1-D stream or 2-D samples) or an iterable of model-input dicts. The model keeps
    ``model.piecewise_quant_config`` (with the mixed-precision plan as overrides) and, for Hugging
    Face models, ``model.config.quantization_config``, so ``save_pretrained`` writes a checkpoint
    that reloads without calibration.
    """
    t_start = time.perf_counter()
    config = config if config is not None else PiecewiseQuantConfig()
    if not isinstance(config, PiecewiseQuantConfig):
        raise TypeError(f"config must be a PiecewiseQuantConfig, got {type(config).__name__}")
    cal = config.calibration or CalibrationConfig.preset(DEFAULT_CALIBRATION_PRESET)
    if config.calibration is None:
        config = dataclasses.replace(config, calibration=cal)
    check_float_model(model, "calibrate")
    if cal.rotation_trials > 1:
        if config.rotation is None:
            raise ValueError(
                f"calibration.rotation_trials={cal.rotation_trials} tries that many rotation seeds, and the config has no "
                "rotation; set rotation (e.g. 'quarot' or 'viditq') or leave rotation_trials at 1"
            )
        from .trials import TRIAL_SCORE_SAMPLES, calibrate_with_rotation_trials

        data, sampling = _data(cal, data), _sampling(model, cal, tokenizer)  # cal.dataset read once
        return calibrate_with_rotation_trials(
            model, config, cal, prepare_batches(data, **sampling), calibrate, progress,
            score_batches=held_aside_batches(data, **sampling, n_aside=max(cal.n_samples, TRIAL_SCORE_SAMPLES)),
        )
    run = _plan_run(model, config, cal, progress)
    batches = _batches(model, cal, data, tokenizer)
    torch.manual_seed(cal.seed)
    was_training = model.training
    model.eval()
    # everything calibration changes is recorded first: any exception, KeyboardInterrupt included,
    # puts the model back as it was (blocks are changed in place; outside layers only swapped)
    undo = ModelUndo()
    undo.record(run.blocks, copy_values=True)
    for name in run.plan:
        parent = name.rpartition(".")[0]
        undo.record_children(model.get_submodule(parent) if parent else model)
    try:
        with rotated(model, config.rotation, run.plan, undo, data=batches, progress=run.progress, kv=config.kv_cache):
            _run(run, batches)
    except BaseException:
        undo.restore()
        raise
    finally:
        model.train(was_training)
    del undo
    return _finish(run, t_start)


def _plan_run(model: nn.Module, config: PiecewiseQuantConfig, cal: CalibrationConfig, progress: bool) -> RunState:
    """The run's plan, blocks and modifiers; every modifier's ``setup`` (before any work)."""
    plan = plan_layers(model, config)
    if not plan:
        raise ValueError(
            "found no nn.Linear layer to quantize (all were skipped by modules_to_not_convert, or the model has none)"
        )
    blocks_path, blocks = find_blocks(model, cal.blocks)
    modifiers = cal.recipe + kv_scale_modifiers(config)  # static FP8 KV scales when config.kv_cache declares them
    _check_low_rank(plan, modifiers)
    run = RunState(model, config, cal, modifiers, plan, blocks_path, blocks, CalibrationReport(blocks_path=blocks_path),
                   run_block, progress)
    for m in run.modifiers:
        m.setup(run)
    return run


# modifiers that fit, clip or re-allocate a layer's weight groups on the whole weight (not on the
# residual a low-rank layer quantizes): refused for such layers rather than silently wrong
_NO_LOW_RANK = {"LWC": "lwc", "LET": "let", "RefineBreakpoints": "refine_breakpoints",
                "MixedPrecision": "mixed_precision_budget", "Algorithm": "algorithm", "TuneScales": "tune_scales"}


def _check_low_rank(plan: dict[str, Any], modifiers: list[Any]) -> None:
    """Refuse calibration steps that do not support ``low_rank`` layers (GPTQ, SmoothQuant, the
    activation-aware fit and static activation scales do)."""
    lr = [name for name, layer in plan.items() if getattr(layer.spec, "low_rank", None) is not None]
    bad = [_NO_LOW_RANK[type(m).__name__] for m in modifiers if type(m).__name__ in _NO_LOW_RANK]
    if lr and bad:
        raise ValueError(
            f"calibration {bad} does not support low_rank layers ({len(lr)} planned, e.g. {lr[0]!r}): it works on the "
            "whole weight, not on the residual that a low-rank layer quantizes; calibrate them with gptq (or the "
            "default activation-aware fit), or set low_rank=None"
        )


def _data(cal: CalibrationConfig, data: Any) -> Any:
    """``data``, or the text of ``cal.dataset`` when no data is given."""
    if data is None and cal.dataset is not None:
        from pathlib import Path

        try:
            return Path(cal.dataset).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"calibration.dataset={cal.dataset!r} cannot be read as UTF-8 text: {exc}") from None
    return data


def _sampling(model: nn.Module, cal: CalibrationConfig, tokenizer: Any) -> dict[str, Any]:
    """The keywords that turn data into ``cal``'s batches (:func:`prepare_batches`)."""
    return dict(model=model, tokenizer=tokenizer, n_samples=cal.n_samples, seq_len=cal.seq_len,
                batch_size=cal.batch_size, seed=cal.seed)


def _batches(model: nn.Module, cal: CalibrationConfig, data: Any, tokenizer: Any) -> list[dict[str, Any]]:
    return prepare_batches(_data(cal, data), **_sampling(model, cal, tokenizer))


def _run(run: RunState, batches: list[dict[str, Any]]) -> None:
    """Capture the first block's inputs, start the modifiers, calibrate every block along both
    chains, then quantize the layers outside the blocks data-free."""
    report = run.report
    with torch.no_grad():
        run.inputs = capture_block_inputs(run.model, run.blocks[0], batches)
    report.n_samples = sum(int(h.shape[0]) for h in run.inputs.hidden)
    report.n_tokens = sum(int(h.shape[0] * h.shape[1]) if h.dim() >= 3 else int(h.shape[0]) for h in run.inputs.hidden)
    for m in run.modifiers:
        m.start(run)
    fp = list(run.inputs.hidden)
    q = [h.clone() for h in fp]
    bar = tqdm(list(enumerate(run.blocks)), desc="calibrating", unit="block", disable=not run.progress)
    for i, block in bar:
        t0 = time.perf_counter()
        onload_block(block)
        held = sum(t.numel() * t.element_size() for t in fp + q)
        fp_out = run_block(block, run.inputs, fp)
        held += sum(t.numel() * t.element_size() for t in fp_out)
        report.peak_held_mb = max(report.peak_held_mb, held / 2**20)
        state = _calibrate_block(run, i, block, q, fp_out, fp)
        q_out = run_block(block, run.inputs, q)
        rel = relative_error(q_out, fp_out)
        report.blocks.append(BlockReport(i, rel, state.folded, state.lwc_loss, time.perf_counter() - t0))
        bar.set_postfix(rel_err=f"{rel:.2e}")
        fp, q = fp_out, q_out
    del fp, q
    for name in run.outside():
        layer = run.plan[name]
        fmt = get_format(layer.spec.grid)
        run.model.set_submodule(name, QuantLinear.from_linear(run.model.get_submodule(name), layer, fmt))
        report.layers[name] = LayerReport(name, layer.spec.grid, layer.spec.bits, fmt.bits_per_weight(layer), 0,
                                          "data-free", "outside the repeated blocks")


def _calibrate_block(run: RunState, index: int, block: nn.Module, q: list[torch.Tensor],
                     fp_out: list[torch.Tensor], fp: list[torch.Tensor] | None = None) -> BlockState:
    """One block's lifecycle: statistics and records, then the modifiers' hooks around the
    runner's fit and the swap to ``QuantLinear`` layers."""
    state = BlockState(run, index, block, _records(run, index, block, q), q, fp_out, fp=fp)
    for m in run.modifiers:
        m.before_block(state)
    for rec in state.calibrated:
        rec.params = state.fit(rec)
        rec.params_by = "aware" if run.cal.activation_aware else "calibrated"
    for m in run.modifiers:
        m.process_block(state)
    for rec in state.records.values():
        if rec.calibrated:
            for m in run.modifiers:
                m.process_layer(state, rec)
        block.set_submodule(rec.rel, _quant_linear(state, rec))
        run.report.layers[rec.name] = rec.report()
    for m in run.modifiers:
        m.after_block(state)
    return state


def _records(run: RunState, index: int, block: nn.Module, q: list[torch.Tensor]) -> dict[str, LayerRecord]:
    """One record per planned layer of the block, with its statistics on the quantized chain. A
    layer that saw no tokens, or whose format has no calibration interface, is quantized data-free."""
    names = run.block_layers(index)
    stats = collect_stats(block, lambda h: run_block(block, run.inputs, h), q, names, run.needs_hessian)
    records = {}
    for rel, full in names.items():
        layer, st = run.plan[full], stats[rel]
        fmt = get_format(layer.spec.grid)
        if st.tokens == 0:
            note = "received no calibration tokens"
        elif not fmt.supports_calibration:
            note = f"grid {layer.spec.grid!r} has no calibration interface"
        else:
            note = ""
        records[rel] = LayerRecord(rel, full, layer, fmt, st, calibrated=not note, note=note)
    return records


def _quant_linear(state: BlockState, rec: LayerRecord) -> QuantLinear:
    """The ``QuantLinear`` for a record: its chosen tensors (or the format's encoding of its
    parameters) when calibrated, a data-free quantization otherwise."""
    linear = state.linear(rec)
    if not rec.calibrated:
        return QuantLinear.from_linear(linear, rec.layer, rec.fmt)
    tensors = state.tensors(rec)
    ql = QuantLinear.empty(rec.layer, rec.fmt, linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
    try:
        ql.load_quantized(tensors)
    except ValueError as exc:
        if rec.tensors_from is None:
            raise
        raise ValueError(f"{rec.tensors_from} returned tensors that do not fit: {exc}") from None
    if linear.bias is not None:
        ql.bias.data.copy_(linear.bias.detach())
    ql.take_balance_from(linear)
    return ql


def _finish(run: RunState, t_start: float) -> CalibrationReport:
    model, report = run.model, run.report
    model.piecewise_quant_config = run.config
    _record_in_host_config(model, run.config)
    report.wall_s = time.perf_counter() - t_start
    report.peak_rss_mb = _peak_rss_mb()
    logger.info("%s", report.summary())
    if report.data_free_layers:
        logger.warning("data-free quantization for %d layer(s): %s", len(report.data_free_layers), report.data_free_layers)
    warn_unquantized(model)
    return report
