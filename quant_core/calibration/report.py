"""What a calibration run reports: per layer (grid, bits, tokens seen, what chose the weights),
per block (output error, folds, LWC loss, time), and the run's time and memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CalibrationReport", "LayerReport", "BlockReport"]


@dataclass
class LayerReport:
    """One quantized layer: its scheme, its exact storage cost, the calibration tokens it saw,
    what chose its stored weights and why (e.g. why it fell back to data-free)."""

    name: str
    grid: str
    bits: int
    bits_per_weight: float
    tokens: int
    method: str  # what chose the weights: "gptq", "lwc", "aware", "data-free", or a plugin algorithm's name
    note: str = ""


@dataclass
class BlockReport:
    """One calibrated block: its output error against the float chain, the channel-scaling folds
    kept, the LWC/LET loss before and after training (``None`` without them) and the time taken."""

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
    rotation_trials: list[tuple[int, float]] | None = None  # (seed, distance to float) of each trial

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
            listed = ", ".join(f"{n} ({self.layers[n].note})" for n in free)
            lines.append(f"data-free fallback for {len(free)} layer(s): " + listed)
        if self.mixed_precision:
            mp = self.mixed_precision
            lines.append(f"mixed precision: {mp['average_bits_per_weight']:.3f} bits/weight "
                         f"(budget {mp['budget']}); {mp['counts']}")
        if self.rotation_trials:
            tried = ", ".join(f"{seed}: {d:.4g}" for seed, d in self.rotation_trials)
            best = min(self.rotation_trials, key=lambda t: (t[1], t[0]))[0]
            lines.append(f"rotation trials (seed: distance to float): {tried}; kept seed {best}")
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
