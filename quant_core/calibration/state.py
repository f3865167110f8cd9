"""What the block runner and the modifiers share: one record per layer, one state per block and
per run, and the per-layer input statistics every algorithm starts from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..config import LayerSpec
from ..formats.groups import group_view, importance_view
from ..token_mask import real_tokens

if TYPE_CHECKING:
    from ..config import CalibrationConfig, PiecewiseQuantConfig
    from ..formats.base import WeightFormat
    from .blocks import BlockInputs
    from .modifier import Modifier
    from .report import CalibrationReport, LayerReport
    from .smoothing import FoldGroup

__all__ = ["LayerStats", "LayerRecord", "RunState", "BlockState", "collect_stats", "fit_params", "layer_input"]

# the labels of group parameters chosen by the runner's fit (the activation-aware one or not)
FIT_LABELS = ("aware", "calibrated")


@dataclass
class LayerStats:
    """Statistics of one layer's calibration inputs (per input channel, over ``tokens`` rows)."""

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

    def add(self, x: torch.Tensor, hessian: bool) -> None:
        self.tokens += x.shape[0]
        mx, mn = x.amax(dim=0), x.amin(dim=0)
        if self.amax is None:
            self.amax, self.amin, self.sumsq = mx, mn, (x * x).sum(dim=0)
            self.xtx = x.t() @ x if hessian else None
        else:
            self.amax, self.amin = torch.maximum(self.amax, mx), torch.minimum(self.amin, mn)
            self.sumsq += (x * x).sum(dim=0)
            if hessian:
                self.xtx += x.t() @ x
        self.absmax = torch.maximum(self.amax.abs(), self.amin.abs())


def layer_input(x: torch.Tensor, name: str) -> torch.Tensor:
    """A layer's calibration input ``x`` as float32 rows (padding dropped); refuses NaN/Inf
    activations (they would give NaN scales), naming the layer."""
    x = real_tokens(x.detach()).float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"the activations entering layer {name!r} contain NaN or Inf; check the calibration "
            "data and the float model (quantizing would produce NaN scales)"
        )
    return x


@torch.no_grad()
def collect_stats(block: nn.Module, run: Callable[[list[torch.Tensor]], Any], hidden: list[torch.Tensor],
                  names: dict[str, str], hessian: bool) -> dict[str, LayerStats]:
    """Input statistics of the layers ``names`` (name in the block -> full name) while ``run``
    runs the block on ``hidden``; refuses NaN/Inf activations (they would give NaN scales)."""
    stats = {n: LayerStats() for n in names}

    def hook(rel: str):
        def fn(_m: nn.Module, args: tuple) -> None:
            stats[rel].add(layer_input(args[0], names[rel]), hessian)
        return fn

    handles = [block.get_submodule(rel).register_forward_pre_hook(hook(rel)) for rel in names]
    try:
        run(hidden)
    finally:
        for h in handles:
            h.remove()
    return stats


def fit_params(fmt: Any, weight: torch.Tensor, layer: LayerSpec, st: LayerStats | None, aware: bool) -> dict[str, torch.Tensor]:
    """The format's group parameters for ``weight``; with ``aware``, each weight's error weighted
    by the mean square of its input channel."""
    groups = group_view(weight.detach().float(), layer)
    imp = importance_view(st.importance(), layer) if (aware and st is not None and st.tokens > 0) else None
    return fmt.fit(groups, layer, importance=imp)


@dataclass
class LayerRecord:
    """One layer of the block being calibrated, and everything chosen for it so far.

    Attributes:
        rel, name: its name inside the block and in the model.
        layer: its :class:`~piecewise_quant.config.LayerSpec` (scheme, shape, resolved group
            size); ``fmt`` its weight format, resolved once.
        stats: its input statistics on the quantized chain.
        calibrated: it saw calibration tokens and its format has the calibration interface;
            otherwise it is quantized data-free and ``note`` says why.
        params: group parameters (``fmt.fit`` layout); ``params_by`` what chose them (``"aware"``
            or ``"calibrated"``: the runner's fit; ``"lwc"``: learned clipping).
        params_fixed: learned or refined parameters that later steps (GPTQ) must keep.
        tensors: stored tensors chosen by a modifier (``None``: ``fmt.encode(weight, params)``);
            ``tensors_by`` names who chose them (``"gptq"``, a plugin algorithm) and
            ``tensors_from`` how to name it in an error when they do not fit (``None``: built in).
        note: the report's note.
    """

    rel: str
    name: str
    layer: LayerSpec
    fmt: WeightFormat
    stats: LayerStats
    calibrated: bool
    params: dict[str, torch.Tensor] | None = None
    params_by: str = "aware"
    params_fixed: bool = False
    tensors: dict[str, torch.Tensor] | None = None
    tensors_by: str | None = None
    tensors_from: str | None = None
    note: str = ""

    @property
    def method(self) -> str:
        """What chose the stored weights, as the report shows it: ``"data-free"``, the fit
        (``"aware"``), ``"lwc"``, ``"gptq"``, a plugin algorithm, or ``"gptq+lwc"`` when learned
        clipping fixed the group parameters under GPTQ or a plugin algorithm."""
        if not self.calibrated:
            return "data-free"
        if self.tensors_by is None:
            return self.params_by
        learned = [] if self.params_by in FIT_LABELS else [self.params_by]
        return "+".join([self.tensors_by, *learned])

    def report(self) -> LayerReport:
        from .report import LayerReport

        spec = self.layer.spec
        return LayerReport(self.name, spec.grid, spec.bits, self.fmt.bits_per_weight(self.layer), self.stats.tokens,
                           self.method, self.note)


@dataclass
class RunState:
    """One ``calibrate`` call: what the runner and the modifiers share across blocks.

    ``run_block`` is :func:`.blocks.run_block` as the engine module holds it (one function runs
    every block forward pass). Modifiers keep per-run values (e.g. a looked-up plugin function) in
    ``cache``, keyed by themselves.
    """

    model: nn.Module
    config: PiecewiseQuantConfig
    cal: CalibrationConfig
    modifiers: tuple[Modifier, ...]
    plan: dict[str, LayerSpec]
    blocks_path: str
    blocks: nn.ModuleList
    report: CalibrationReport
    run_block: Callable[..., list[torch.Tensor]]
    progress: bool = True
    inputs: BlockInputs | None = None
    cache: dict[Any, Any] = field(default_factory=dict)

    def block_layers(self, index: int) -> dict[str, str]:
        """The planned layers of block ``index``: name inside the block -> full name."""
        p = f"{self.blocks_path}.{index}." if self.blocks_path else f"{index}."
        return {full[len(p):]: full for full in self.plan if full.startswith(p)}

    def outside(self) -> list[str]:
        """Planned layers outside the repeated blocks (quantized data-free)."""
        inside = {full for i in range(len(self.blocks)) for full in self.block_layers(i).values()}
        return [n for n in self.plan if n not in inside]

    @property
    def needs_hessian(self) -> bool:
        return any(m.needs_hessian for m in self.modifiers)


@dataclass
class BlockState:
    """The block being calibrated: its layer records (in the plan's order), its inputs on the
    quantized chain ``q`` and the float block's outputs ``fp_out`` (the targets)."""

    run: RunState
    index: int
    block: nn.Module
    records: dict[str, LayerRecord]
    q: list[torch.Tensor]
    fp_out: list[torch.Tensor]
    fold_groups: list[FoldGroup] = field(default_factory=list)
    folded: int = 0
    lwc_loss: tuple[float, float] | None = None
    training: Any = None  # the block's joint LWC/LET training (see .lwc)
    fp: list[torch.Tensor] | None = None  # the block's inputs on the float chain

    @property
    def calibrated(self) -> list[LayerRecord]:
        return [r for r in self.records.values() if r.calibrated]

    def linear(self, record: LayerRecord) -> nn.Module:
        return self.block.get_submodule(record.rel)

    def run_block(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """The block's outputs for ``hidden`` (one tensor per calibration batch)."""
        return self.run.run_block(self.block, self.run.inputs, hidden)

    def call_first(self) -> torch.Tensor:
        """One block call on the first quantized-chain batch (for tracing the block's data flow)."""
        return self.run.inputs.call(self.block, 0, self.q[0])

    def collect_stats(self, records: list[LayerRecord] | None = None, hessian: bool | None = None) -> None:
        """Collect ``records``' (default: all) statistics again, after their inputs changed."""
        records = list(self.records.values()) if records is None else records
        hessian = self.run.needs_hessian if hessian is None else hessian
        names = {r.rel: r.name for r in records}
        stats = collect_stats(self.block, self.run_block, self.q, names, hessian)
        for r in records:
            r.stats = stats[r.rel]

    def tensors(self, record: LayerRecord) -> dict[str, torch.Tensor]:
        """The tensors ``record`` would store now: a modifier's choice, else the format's encoding of
        its current weight with its group parameters."""
        if record.tensors is not None:
            return record.tensors
        return record.fmt.encode(self.linear(record).weight.detach(), record.params, record.layer)

    def fit(self, record: LayerRecord) -> dict[str, torch.Tensor]:
        """The runner's fit of ``record``'s current weight (activation-aware when configured)."""
        return fit_params(record.fmt, self.linear(record).weight, record.layer, record.stats, self.run.cal.activation_aware)
