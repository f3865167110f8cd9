"""``PiecewiseQuantConfig``: what to quantize and how, JSON-serializable with a schema version.

One config describes the default weight/activation scheme, the modules kept in float, and
per-module overrides by name pattern (``fnmatch`` globs such as ``"*.mlp.down_proj"``, or regular
expressions prefixed with ``"re:"``). The same object drives ``piecewise_quant.quantize`` and
``from_pretrained(..., quantization_config=...)``, and is stored in the checkpoint's
``config.json`` so a reload rebuilds exactly the same layers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from .patterns import PatternSet, check_pattern, compile_pattern

if TYPE_CHECKING:
    from .args import ActArgs, KVArgs, OnlineRotation, RotationArgs, WeightArgs

__all__ = ["PiecewiseQuantConfig", "QuantSpec", "LayerSpec", "CalibrationConfig", "SCHEMA_VERSION", "QUANT_METHOD"]

# 2: overrides are stored as an ordered list of [pattern, changes] pairs (hosts such as
# transformers write config.json with sorted keys, which would reorder a mapping and change which
# pattern matches first). Version 1 configs (a mapping) still load.
SCHEMA_VERSION = 2
QUANT_METHOD = "piecewise"
BUILTIN_GRIDS = ("piecewise", "uniform", "fp8", "mxfp4", "nvfp4")
ACT_FORMATS = ("int", "fp8", "mxfp4", "nvfp4")
FP4_ACT_FORMATS = ("mxfp4", "nvfp4")  # E2M1 with block scales: 4 bits, dynamic, no clipping
FP4_GRID_BLOCKS = {"mxfp4": 32, "nvfp4": 16}  # their group size is the format's block
ACT_MODES = ("dynamic_per_token", "dynamic_per_token_asym", "static_per_tensor")
SCALE_DTYPES = ("float16", "bfloat16", "float32")
GROUP_WORDS = ("channel", "tensor")
DEFAULT_MODULES_TO_NOT_CONVERT = ("lm_head",)

# Fields a per-module override may change (everything that describes one layer's scheme).
SPEC_FIELDS = (
    "grid",
    "bits",
    "group_size",
    "symmetric",
    "observer",
    "scale_dtype",
    "act_bits",
    "act_format",
    "act_mode",
    "act_clip_ratio",
    "act_topk",
    "outliers",
    "outlier_method",
    "low_rank",
)
# written to config.json only when set, so configs without outliers keep their bytes and plan hash
OPTIONAL_SPEC_FIELDS = {"outliers": None, "outlier_method": "hessian", "low_rank": None}
# a float low_rank is a budget of extra bits per weight in (0, LOW_RANK_MAX_BUDGET]
LOW_RANK_MAX_BUDGET = 4.0
OUTLIER_METHODS = ("hessian", "magnitude")


def _allowed(values: Any) -> str:
    return ", ".join(repr(v) for v in values)


@dataclass(frozen=True)
class QuantSpec:
    """The scheme of one layer (weights and, optionally, input activations).

    Attributes:
        grid: weight format: ``"piecewise"`` (dense centre + sparse tails), ``"uniform"`` or
            ``"fp8"`` (E4M3, per-channel scales), ``"mxfp4"`` / ``"nvfp4"`` (E2M1 with block scales
            of 32 / 16 weights, docs/formats.md), or the name of a format added by a plugin.
        bits: bits per stored weight code: 2, 3, 4 or 8 (fp8: 8; mxfp4/nvfp4: 4).
        group_size: weights sharing one scale along the input dimension: a positive integer
            (32/64/128/256 are typical), ``"channel"`` (or ``None``: one scale per output row) or
            ``"tensor"`` (one scale for the whole matrix).
        symmetric: uniform grid only: ``False`` (default) stores a b-bit zero point per group,
            ``True`` stores a signed scale only. The piecewise grid is always sign-symmetric and
            spends the b bits on its breakpoint instead.
        observer: how weight ranges are chosen: ``"mse"`` (search the clipping range that
            minimises squared error, default), ``"minmax"`` or a plugin observer's name.
        scale_dtype: dtype of stored scales, ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.
        act_bits: ``None`` (weight-only), 8 (int8 or fp8) or 4 (int4, mxfp4, nvfp4) to quantize the layer's
            input activations.
        act_format: ``"int"`` (integer, ``act_bits`` wide; symmetric unless ``act_mode`` says
            ``"dynamic_per_token_asym"``), ``"fp8"`` (E4M3, 8 bits) or
            ``"mxfp4"`` / ``"nvfp4"`` (E2M1 with block scales along the channels, 4 bits, dynamic only).
        act_mode: ``"dynamic_per_token"`` (a scale per token, computed at run time),
            ``"dynamic_per_token_asym"`` (``act_format="int"`` only: a scale and an offset per token,
            so the codes span the token's own minimum to maximum; all ``2^act_bits`` levels are used,
            which matters at 4 bits: docs/rotation.md) or ``"static_per_tensor"`` (one scale from
            calibration statistics).
        act_clip_ratio: the activation range is multiplied by this coefficient, in (0, 1].
        act_topk: the range is the (k+1)-th largest magnitude, so the k largest are clipped.
        outliers: dense-and-sparse weights (docs/outliers.md): ``None`` (default, none), a float in
            (0, 1) (the share of weights kept exactly, as float16 corrections; rounded up to a
            whole count per group) or an integer >= 1 (that many per group). The dense codes are
            fitted without them, so they do not stretch the ranges.
        outlier_method: how outliers are chosen: ``"hessian"`` (the largest output-error
            saliency: GPTQ's ``(w - q(w))^2 / [H^-1]_qq``, else the activation-weighted error) or
            ``"magnitude"`` (the largest distance from the group median).
        low_rank: a 16-bit low-rank branch beside the quantized residual (SVDQuant,
            docs/low-rank.md): ``None`` (default, none), an integer ``r >= 1`` (the rank, smaller
            than ``min(out_features, in_features)`` of every layer it applies to) or a float ``b``
            in (0, 4] (a budget of extra bits per weight: each layer gets the largest rank whose
            float16 factors cost at most ``b`` bits per weight, at least 1). Does not combine
            with ``outliers``.
    """

    grid: str = "piecewise"
    bits: int | None = None
    group_size: int | str | None = "auto"
    symmetric: bool | None = None
    observer: str = "mse"
    scale_dtype: str = "float16"
    act_bits: int | None = None
    act_format: str = "int"
    act_mode: str = "dynamic_per_token"
    act_clip_ratio: float = 1.0
    act_topk: int = 0
    outliers: float | int | None = None
    outlier_method: str = "hessian"
    low_rank: int | float | None = None

    def __post_init__(self) -> None:
        grid = self.grid
        if not isinstance(grid, str) or not grid:
            raise ValueError(f"grid must be a format name such as {_allowed(BUILTIN_GRIDS)}, got {grid!r}")
        bits, group_size, symmetric = _format_defaults(grid)
        if self.bits is None:
            object.__setattr__(self, "bits", bits)
        if self.group_size == "auto":
            object.__setattr__(self, "group_size", group_size)
        if self.group_size is None or self.group_size == -1:
            object.__setattr__(self, "group_size", "channel")
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", symmetric)
        self._validate_common()
        if grid in FP4_GRID_BLOCKS and (self.bits != 4 or self.group_size != FP4_GRID_BLOCKS[grid]):
            raise ValueError(
                f"grid {grid!r} stores 4-bit E2M1 codes in blocks of {FP4_GRID_BLOCKS[grid]} weights; use bits=4 and "
                f"group_size={FP4_GRID_BLOCKS[grid]} (or leave both at their defaults), not bits={self.bits!r}, "
                f"group_size={self.group_size!r}"
            )

    def _validate_common(self) -> None:
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an integer; allowed values: 2, 3, 4, 8 (8 for fp8); got {bits!r}")
        gs = self.group_size
        if isinstance(gs, bool) or not (
            (isinstance(gs, int) and gs > 0) or (isinstance(gs, str) and gs in GROUP_WORDS)
        ):
            raise ValueError(
                f"group_size must be a positive integer (e.g. 32, 64, 128, 256), 'channel'/None or 'tensor'; got {gs!r}"
            )
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True, False or None; got {self.symmetric!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {_allowed(SCALE_DTYPES)}; got {self.scale_dtype!r}")
        if not isinstance(self.observer, str) or not self.observer:
            raise ValueError(f"observer must be a registered observer name such as 'mse' or 'minmax'; got {self.observer!r}")
        # checked with or without act_bits: a typo must not be written to config.json unnoticed
        if self.act_format not in ACT_FORMATS:
            raise ValueError(f"act_format must be one of {_allowed(ACT_FORMATS)}; got {self.act_format!r}")
        if self.act_mode not in ACT_MODES:
            raise ValueError(f"act_mode must be one of {_allowed(ACT_MODES)}; got {self.act_mode!r}")
        if self.act_bits is not None:
            if isinstance(self.act_bits, bool) or self.act_bits not in (4, 8):
                raise ValueError(f"act_bits must be None (weight-only), 8 or 4; got {self.act_bits!r}")
            if self.act_format == "fp8" and self.act_bits != 8:
                raise ValueError(
                    f"act_format='fp8' must be 8 bits wide; set act_bits=8 (got {self.act_bits}) or act_format='int'"
                )
            if self.act_format in FP4_ACT_FORMATS:
                self._validate_fp4_act()
            if self.act_mode == "dynamic_per_token_asym":
                if self.act_format != "int":
                    raise ValueError(f"act_mode='dynamic_per_token_asym' needs act_format='int' ({self.act_format} "
                                     "activations are symmetric); use act_mode='dynamic_per_token'")
                if self.act_topk != 0:
                    raise ValueError("act_topk clips the largest magnitudes of a symmetric range; with "
                                     "act_mode='dynamic_per_token_asym' use act_clip_ratio (it shrinks the range "
                                     "about its midpoint) and act_topk=0")
        ratio = self.act_clip_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 < ratio <= 1:
            raise ValueError(f"act_clip_ratio must be a number in (0, 1]; got {ratio!r}")
        if isinstance(self.act_topk, bool) or not isinstance(self.act_topk, int) or self.act_topk < 0:
            raise ValueError(f"act_topk must be an integer >= 0 (how many largest magnitudes to clip); got {self.act_topk!r}")
        self._validate_outliers()
        self._validate_low_rank()

    def _validate_low_rank(self) -> None:
        lr = self.low_rank
        if lr is None:
            return
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise ValueError(
                f"low_rank must be None, an integer rank >= 1 or a float budget of extra bits per weight in "
                f"(0, {LOW_RANK_MAX_BUDGET:g}]; got {lr!r}"
            )
        if isinstance(lr, int) and lr < 1:
            raise ValueError(f"low_rank (the rank of the 16-bit branch) must be >= 1 or None; got {lr}")
        if isinstance(lr, float) and not (math.isfinite(lr) and 0 < lr <= LOW_RANK_MAX_BUDGET):
            raise ValueError(
                f"low_rank={lr!r}: a float is a budget of extra bits per weight in (0, {LOW_RANK_MAX_BUDGET:g}]; "
                "for a rank pass an integer (e.g. low_rank=32)"
            )
        if self.outliers is not None:
            raise ValueError(
                "low_rank and outliers do not combine (the low-rank branch already absorbs the weight's outliers); "
                "set one of them to None"
            )

    def _validate_fp4_act(self) -> None:
        fmt = self.act_format
        if self.act_bits != 4:
            raise ValueError(f"act_format={fmt!r} is 4 bits wide (E2M1); set act_bits=4 (got {self.act_bits})")
        if self.act_mode != "dynamic_per_token":
            raise ValueError(f"act_format={fmt!r} computes its block scales at run time; set "
                             f"act_mode='dynamic_per_token' (got {self.act_mode!r})")
        if self.act_clip_ratio != 1.0 or self.act_topk != 0:
            raise ValueError(f"act_format={fmt!r} takes its block scales from each block's maximum; "
                             "act_clip_ratio and act_topk must stay 1.0 and 0")

    def _validate_outliers(self) -> None:
        o = self.outliers
        if o is not None:
            if isinstance(o, bool) or not isinstance(o, (int, float)) or not math.isfinite(o) or (
                isinstance(o, float) and not 0 < o < 1) or (isinstance(o, int) and o < 1):
                raise ValueError(
                    "outliers must be None, a fraction in (0, 1) of weights kept in float16 (e.g. 0.005) or an "
                    f"integer >= 1 per weight group; got {o!r}"
                )
            if self.group_size == "tensor":
                raise ValueError("outliers are counted per weight group: use group_size=<int> or 'channel', not 'tensor'")
            if isinstance(self.group_size, int) and isinstance(o, int) and o >= self.group_size:
                raise ValueError(f"outliers={o} per group must be smaller than group_size={self.group_size}")
        if self.outlier_method not in OUTLIER_METHODS:
            raise ValueError(f"outlier_method must be one of {_allowed(OUTLIER_METHODS)}; got {self.outlier_method!r}")

    def spec_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in SPEC_FIELDS}

    @property
    def weight_args(self) -> "WeightArgs":
        """The weight half of this spec as a typed :class:`~piecewise_quant.args.WeightArgs`."""
        from .args import WeightArgs

        return WeightArgs.from_spec(self)

    @property
    def act_args(self) -> "ActArgs | None":
        """The activation half as a typed :class:`~piecewise_quant.args.ActArgs` (``None``: weight-only)."""
        from .args import ActArgs

        return ActArgs.from_spec(self)

    def with_changes(self, changes: Mapping[str, Any]) -> "QuantSpec":
        """A copy with ``changes``; a different grid re-derives what does not carry over
        (``symmetric``; with FP8 on either side also ``bits`` and ``group_size``) unless given."""
        base = self.spec_dict()
        if "grid" in changes and changes["grid"] != base["grid"]:
            base["symmetric"] = None
            if _format_defaults(changes["grid"])[:2] != _format_defaults(base["grid"])[:2]:
                base.update(bits=None, group_size="auto")
        base.update(changes)
        return QuantSpec(**base)

    def changes_from(self, default: "QuantSpec") -> dict[str, Any]:
        """The ``overrides`` entry that gives this scheme to a layer of a config whose default is
        ``default``: the fields that differ (with ``bits``, ``group_size`` and ``symmetric`` spelled
        out when the grid differs, since a grid change re-derives them)."""
        changes = {f: getattr(self, f) for f in SPEC_FIELDS if getattr(self, f) != getattr(default, f)}
        if "grid" in changes:
            changes.update({f: getattr(self, f) for f in ("bits", "group_size", "symmetric")})
        return changes


def _format_defaults(grid: str) -> tuple[int, int | str, bool | None]:
    """``(bits, group_size, symmetric)`` that ``None``/``"auto"`` mean for ``grid`` (FP8: 8 bits, per
    channel), from the formats' own table; a plugin grid gets 4 bits and groups of 128: reading its
    class would load every plugin whenever a spec is built."""
    from .formats.defaults import BUILTIN_DEFAULTS, GENERIC_DEFAULTS

    return BUILTIN_DEFAULTS.get(grid, GENERIC_DEFAULTS)


@dataclass(frozen=True)
class LayerSpec:
    """A :class:`QuantSpec` bound to one layer: ``group_size`` resolved to an integer
    (``in_features`` for per-channel, ``-1`` for per-tensor)."""

    name: str
    spec: QuantSpec
    in_features: int
    out_features: int
    group_size: int
    rotation: "OnlineRotation | None" = None

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size == -1 else self.in_features // self.group_size


def _pattern_matches(pattern: str, name: str) -> bool:
    """``fnmatch`` glob, ``re:`` regex (whole name) or plain name (also as a dotted suffix:
    ``"lm_head"`` matches ``"model.lm_head"``); linear time (:mod:`piecewise_quant.patterns`)."""
    return compile_pattern(pattern)(name)


# Named recipes, as flat CalibrationConfig keywords; as modifier lists (piecewise_quant.calibration):
# aware [], smoothquant [SmoothQuant(0.5)], gptq [GPTQ()], lwc [LWC()], omniquant [LET(), LWC()].
CALIBRATION_PRESETS: dict[str, dict[str, Any]] = {
    # activation-aware ranges only (every weight's error weighted by its input's energy); the fast
    # option, and what CalibrationConfig() with no algorithm keyword means (as before)
    "aware": {},
    "smoothquant": {"smoothquant": 0.5},
    "gptq": {"gptq": True},
    # GPTQ against the float model's layer outputs (GPTAQ): better at 2 bits and out of domain at
    # W4A4, not everywhere (docs/calibration.md#asymmetric-gptq-gptaq)
    "gptaq": {"gptq": True, "asymmetric": True},
    "lwc": {"lwc": True},
    "omniquant": {"lwc": True, "let": True},
    # the recipe calibrate() runs when none is named: measured best overall on both models at 2, 3
    # and 4 bits (benchmarks/recipes.py, docs/results/recipes.md)
    "default": {"gptq": True},
}
# PiecewiseQuantConfig(calibration=None) given to calibrate() runs this preset. Checkpoints store the
# flat fields of the recipe that ran, never this name, so changing it never changes a saved config.
DEFAULT_CALIBRATION_PRESET = "default"


def check_known_fields(cls: type, data: Mapping[str, Any], what: str, hidden: frozenset[str] = frozenset()) -> None:
    """Raise ``ValueError`` listing the keys of ``data`` that are not fields of the dataclass
    ``cls`` (``what`` names them in the message), with the allowed ones except ``hidden``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; allowed: {sorted(known - hidden)}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Data-aware calibration: which algorithms run and on what data.

    Pass it (or a preset name: ``"default"``, ``"aware"``, ``"smoothquant"``, ``"gptq"``, ``"gptaq"``,
    ``"lwc"``, ``"omniquant"``) as ``PiecewiseQuantConfig(calibration=...)``; then
    ``piecewise_quant.calibrate(model, config, data)`` or ``from_pretrained(...,
    quantization_config=config)`` runs the model block by block on calibration data and applies,
    in this order: mixed-precision allocation, SmoothQuant or LET (channel scaling folded into the
    previous norm/linear), LWC (learned clipping), breakpoint refinement (piecewise grid), GPTQ
    (error compensation) or a plugin algorithm, scale tuning, the activation clip search, and static
    activation scales. Every choice of ranges weights each weight's error by the energy of its
    input channel (``activation_aware``).
    ``calibrate`` given no calibration config runs the ``"default"`` preset (GPTQ, the measured
    best); a config built from keywords runs only the algorithms it names, so ``CalibrationConfig()``
    is the fast ``"aware"`` recipe (use ``CalibrationConfig.preset("default", n_samples=...)``).

    The algorithms can be given two ways, which build equal configs:

    * flat keywords (below), e.g. ``CalibrationConfig(gptq=True, act_order=False, lwc=True)``;
    * ``modifiers``: a list of modifier configs from :mod:`piecewise_quant.calibration`, e.g.
      ``CalibrationConfig(modifiers=[GPTQ(act_order=False), LWC()], n_samples=128)``. They run in
      the pipeline order above whatever order they are listed in; the data fields (``n_samples``
      ... ``activation_aware``) stay keywords, and the flat algorithm keywords cannot be mixed in.

    ``modifiers`` is an init-only argument; ``config.recipe`` gives the recipe back as modifiers in
    pipeline order (``StaticActScales()`` always last: layers with static activations need it).
    The flat fields are what is stored (``to_dict``, checkpoints), so both forms save the same
    ``config.json``, and ``dataclasses.replace`` works on them as before.

    Attributes:
        n_samples, seq_len: calibration sequences and their length in tokens (text is tokenised,
            concatenated and cut into windows, a random subset chosen with ``seed``).
        dataset: path of a UTF-8 text file to calibrate on when no data is passed (e.g. through
            ``from_pretrained``); ``None`` uses the bundled ``pydoc_data.topics`` corpus.
        seed: makes sample selection and the learned algorithms deterministic.
        rotation_trials: with a ``rotation``, calibrate copies of the model with this many rotation
            seeds (the rotation's ``seed``, ``seed + 1``, ...) and keep the seed whose quantized
            model is closest to the float model on samples of the calibration data that the
            calibration does not use (up to ``max(n_samples, 256)`` further windows of the same
            draw; the calibration batches, with a warning, for data given as model-input dicts or
            with no window to spare), by the KL of the next-token distribution or the relative
            output error, then calibrate the model with it: the config and checkpoint record that
            seed (docs/rotation.md#rotation-trials). Costs ``rotation_trials + 1`` calibrations, a
            scoring pass per trial and one copy of the float model in memory; 1 (the
            default) calibrates once. Not written to ``to_dict`` while 1.
        batch_size: sequences per forward pass of a block.
        blocks: dotted path of the ``nn.ModuleList`` that holds the repeated blocks (e.g.
            ``"model.layers"``); ``None`` finds it (the longest list of identical modules).
        activation_aware: weight each weight's squared error by the mean squared input of its
            column when choosing scales, zero points and breakpoints.
        smoothquant: migration strength alpha in [0, 1] (SmoothQuant), or ``None``.
        let: learn per-channel scales (and shifts where a bias can absorb them) on activations,
            folded into the previous norm/linear (OmniQuant LET).
        lwc: learn per-group clipping strengths (OmniQuant LWC).
        epochs, lwc_lr, let_lr: optimisation of LWC/LET (AdamW, per block).
        gptq: GPTQ error compensation; ``act_order`` processes columns by decreasing Hessian
            diagonal, ``damp`` is the relative dampening (raised tenfold on a failed Cholesky),
            ``true_sequential`` quantizes the block's layers in call order (q/k/v, o, gate/up,
            down), each on the inputs the already-quantized layers produce.
        asymmetric: with ``gptq``, each layer is fitted to the float model's output of that layer
            on the float model's inputs (GPTAQ's asymmetric calibration), not to its own output on
            the quantized model's inputs, so it also corrects the error of the layers before it.
            Not written to ``to_dict`` while ``False``.
        tune_scales: after each block is quantized, learn its layers' stored group scales (codes
            fixed) against the float block's output, ``tune_epochs`` passes of AdamW at ``tune_lr``
            (relative change of each scale); undone where the block loss does not drop
            (docs/calibration.md#scale-tuning). The three fields are not written to ``to_dict``
            while ``tune_scales`` is ``False``.
        act_clip_search: once each block is quantized, give every block layer with dynamic
            integer activations the ``act_clip_ratio`` (among 1.0, 0.95, ..., 0.7 and the
            configured one) whose output on the calibration rows is closest to its output on
            unquantized inputs; the choices are saved as per-layer overrides
            (docs/calibration.md#activation-clip-search). Not written to ``to_dict`` while ``False``.
        refine_breakpoints: re-choose piecewise breakpoints against the layer output, kept only
            where the block output error drops (without GPTQ: GPTQ refits each group itself).
        mixed_precision_budget: average bits per weight (codes and metadata) over the quantized
            layers; ``None`` uses the config's bits everywhere. Candidates ``mixed_precision_bits``
            x ``mixed_precision_grids`` are ranked by each layer's sensitivity.
        mixed_precision_scope: where a candidate's sensitivity is measured: ``"block"`` (the
            output of the layer's own block) or ``"model"`` (the output of the last block, after
            the float blocks that follow; slower). Not written to ``to_dict`` while ``"block"``.
        algorithm: name of a calibration algorithm added by a plugin (hook
            ``piecewise_quant_register_calibration_algorithms``, see docs/plugins.md). It turns each
            calibrated layer's weight into stored tensors, given the fitted group parameters and
            the layer's input statistics, in place of the built-in encoding (and of GPTQ, which
            is itself such a step: the two do not combine).
    """

    n_samples: int = 64
    seq_len: int = 256
    dataset: str | None = None
    seed: int = 0
    rotation_trials: int = 1
    batch_size: int = 8
    blocks: str | None = None
    activation_aware: bool = True
    smoothquant: float | None = None
    let: bool = False
    lwc: bool = False
    epochs: int = 5
    lwc_lr: float = 5e-3
    let_lr: float = 2e-3
    gptq: bool = False
    act_order: bool = True
    true_sequential: bool = True
    damp: float = 0.01
    asymmetric: bool = False
    tune_scales: bool = False
    tune_epochs: int = 10
    tune_lr: float = 1e-3
    act_clip_search: bool = False
    refine_breakpoints: bool = False
    mixed_precision_budget: float | None = None
    mixed_precision_bits: tuple[int, ...] = (2, 3, 4, 8)
    mixed_precision_grids: tuple[str, ...] = ("uniform", "piecewise")
    mixed_precision_scope: str = "block"
    algorithm: str | None = None
    # init-only: the list form of the algorithm fields above (read it back as ``recipe``)
    modifiers: dataclasses.InitVar[Any] = None

    # the fields a modifier list replaces (the others describe the data and the fits); a class
    # attribute, not a field (no annotation)
    ALGORITHM_FIELDS = (
        "smoothquant", "let", "lwc", "epochs", "lwc_lr", "let_lr", "gptq", "act_order", "true_sequential", "damp",
        "asymmetric", "tune_scales", "tune_epochs", "tune_lr", "act_clip_search", "refine_breakpoints",
        "mixed_precision_budget", "mixed_precision_bits", "mixed_precision_grids", "mixed_precision_scope", "algorithm",
    )

    def __post_init__(self, modifiers: Any = None) -> None:
        if modifiers is not None:
            self._take_modifiers(modifiers)
        for name in ("n_samples", "seq_len", "batch_size", "rotation_trials"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"calibration.{name} must be a positive integer; got {v!r}")
        if self.seq_len < 2:
            raise ValueError(f"calibration.seq_len must be at least 2 tokens; got {self.seq_len}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"calibration.seed must be an integer; got {self.seed!r}")
        for name in ("epochs", "tune_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"calibration.{name} must be an integer >= 0; got {v!r}")
        for name in ("activation_aware", "let", "lwc", "gptq", "act_order", "true_sequential", "asymmetric",
                     "tune_scales", "act_clip_search", "refine_breakpoints"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"calibration.{name} must be True or False; got {getattr(self, name)!r}")
        a = self.smoothquant
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1):
            raise ValueError(f"calibration.smoothquant (migration strength alpha) must be in [0, 1] or None; got {a!r}")
        if self.refine_breakpoints and self.gptq:
            raise ValueError(
                "calibration: refine_breakpoints and gptq do not combine: GPTQ refits every group on its "
                "error-updated weights, and parameters fixed beforehand lose to those fits (docs/calibration.md); "
                "choose one"
            )
        if self.asymmetric and not self.gptq:
            raise ValueError(
                "calibration.asymmetric=True is an option of GPTQ (it changes the target GPTQ fits); set gptq=True "
                "too, or use the 'gptaq' preset"
            )
        if a is not None and self.let:
            raise ValueError("calibration: choose smoothquant or let, not both (LET starts from SmoothQuant's scales)")
        if self.algorithm is not None:
            if not isinstance(self.algorithm, str) or not self.algorithm:
                raise ValueError(
                    "calibration.algorithm must be the name of a registered calibration algorithm or None; "
                    f"got {self.algorithm!r}"
                )
            if self.gptq or self.refine_breakpoints:
                raise ValueError(
                    f"calibration.algorithm={self.algorithm!r} replaces the step that GPTQ and breakpoint refinement "
                    "perform (turning each layer's weight into stored tensors); set gptq=False and refine_breakpoints=False"
                )
            if self.tune_scales:
                raise ValueError(
                    f"calibration.algorithm={self.algorithm!r} chooses the stored tensors after tune_scales would have "
                    "tuned them; set tune_scales=False"
                )
        for name in ("lwc_lr", "let_lr", "damp", "tune_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"calibration.{name} must be a positive number; got {v!r}")
        if self.dataset is not None and (not isinstance(self.dataset, str) or not self.dataset):
            raise ValueError(f"calibration.dataset must be the path of a text file or None; got {self.dataset!r}")
        if self.blocks is not None and (not isinstance(self.blocks, str) or not self.blocks):
            raise ValueError(f"calibration.blocks must be a dotted module path such as 'model.layers'; got {self.blocks!r}")
        self._check_mixed_precision()

    def _check_mixed_precision(self) -> None:
        object.__setattr__(self, "mixed_precision_bits", tuple(self.mixed_precision_bits))
        object.__setattr__(self, "mixed_precision_grids", tuple(self.mixed_precision_grids))
        bad = [b for b in self.mixed_precision_bits if b not in (2, 3, 4, 8)]
        if bad or not self.mixed_precision_bits:
            raise ValueError(
                f"calibration.mixed_precision_bits must be a non-empty subset of 2, 3, 4, 8; got {self.mixed_precision_bits!r}"
            )
        badg = [g for g in self.mixed_precision_grids if g not in ("uniform", "piecewise")]
        if badg or not self.mixed_precision_grids:
            raise ValueError(
                "calibration.mixed_precision_grids must be a non-empty subset of 'uniform', 'piecewise'; "
                f"got {self.mixed_precision_grids!r}"
            )
        if self.mixed_precision_scope not in ("block", "model"):
            raise ValueError(
                f"calibration.mixed_precision_scope must be 'block' or 'model'; got {self.mixed_precision_scope!r}"
            )
        budget = self.mixed_precision_budget
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
                raise ValueError(f"calibration.mixed_precision_budget must be a number of bits per weight; got {budget!r}")
            if budget < min(self.mixed_precision_bits):
                raise ValueError(
                    f"calibration.mixed_precision_budget={budget} is below the smallest allowed bits "
                    f"({min(self.mixed_precision_bits)}); raise the budget or allow fewer bits in mixed_precision_bits"
                )

    def _take_modifiers(self, modifiers: Any) -> None:
        """Set the flat algorithm fields from a list of modifier configs (see the class docstring)."""
        from .calibration.modifier import flat_fields  # no torch: configs load without it

        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        mixed = [f for f in self.ALGORITHM_FIELDS if getattr(self, f) != defaults[f]]
        if mixed:
            raise ValueError(
                f"calibration: give the algorithms either as modifiers=[...] or as keywords, not both; "
                f"got modifiers and {', '.join(mixed)} (e.g. gptq=True is modifiers=[GPTQ()])"
            )
        for name, value in flat_fields(modifiers).items():
            object.__setattr__(self, name, value)

    @property
    def recipe(self) -> tuple[Any, ...]:
        """The algorithms as modifier configs, in pipeline order (``StaticActScales()`` last);
        ``CalibrationConfig(modifiers=config.recipe, ...)`` rebuilds them."""
        from .calibration.recipe import modifiers_of

        return modifiers_of(self)

    @classmethod
    def preset(cls, name: str, **changes: Any) -> "CalibrationConfig":
        """A named recipe (see the class docstring), with optional field changes."""
        if name not in CALIBRATION_PRESETS:
            raise ValueError(f"unknown calibration preset {name!r}; allowed: {_allowed(CALIBRATION_PRESETS)}")
        return cls(**{**CALIBRATION_PRESETS[name], **changes})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.asymmetric:  # added later: configs that do not use it keep their bytes
            del d["asymmetric"]
        if not self.tune_scales:  # likewise
            for name in ("tune_scales", "tune_epochs", "tune_lr"):
                del d[name]
        if not self.act_clip_search:  # likewise
            del d["act_clip_search"]
        if self.rotation_trials == 1:  # likewise
            del d["rotation_trials"]
        if self.mixed_precision_scope == "block":  # likewise
            del d["mixed_precision_scope"]
        d["mixed_precision_bits"] = list(self.mixed_precision_bits)
        d["mixed_precision_grids"] = list(self.mixed_precision_grids)
        return d

    @classmethod
    def coerce(cls, value: Any) -> "CalibrationConfig | None":
        if value is None or isinstance(value, CalibrationConfig):
            return value
        if isinstance(value, str):
            return cls.preset(value)
        if isinstance(value, Mapping):
            check_known_fields(cls, value, "calibration fields")
            return cls(**value)
        raise ValueError(
            f"calibration must be a CalibrationConfig, a dict of its fields or a preset name "
            f"({_allowed(CALIBRATION_PRESETS)}); got {value!r}"
        )


@dataclass(frozen=True)
class PiecewiseQuantConfig(QuantSpec):
    """How to quantize a model: the default :class:`QuantSpec` plus which modules to skip or treat
    differently.

    Example::

        PiecewiseQuantConfig(bits=4, group_size=128, grid="piecewise",
                             overrides={"*.down_proj": {"bits": 8, "grid": "uniform"}})

    Attributes (besides those of :class:`QuantSpec`):
        modules_to_not_convert: name patterns of Linear layers kept in float. ``None`` means the
            default, ``["lm_head"]`` (plus the model's output embeddings, found at quantize time).
            Pass ``[]`` to quantize everything.
        overrides: ``{pattern: {field: value}}`` (or a list of ``[pattern, {field: value}]``
            pairs); the first matching pattern (in insertion order) changes the listed fields for
            the matching layers. Used for mixed precision. Saved configs keep the order.
        version: schema version of the serialized config (checkpoints store it).
        calibration: ``None`` (data-free) or a :class:`CalibrationConfig` / preset name: the
            recipe ``piecewise_quant.calibrate`` and ``from_pretrained`` run. A saved checkpoint
            keeps it as a record; reloading it never calibrates again.
        strict: an ``overrides`` or ``modules_to_not_convert`` pattern that matches no Linear
            layer of the model raises ``ValueError`` instead of a :class:`PiecewiseQuantWarning`
            (a typo such as ``"*.down_prj"`` otherwise only warns).
        kv_cache: ``None`` (the KV cache stays in float) or a
            :class:`~piecewise_quant.args.KVArgs` (or a dict of its fields): how a transformers
            model loaded with this config quantizes its KV cache in ``generate()``
            (docs/kv-cache.md).
        kv_bits, kv_group_size, kv_residual_length: shortcuts that build ``kv_cache`` (or change
            those fields of the given one); they read back as ``None``, ``kv_cache`` holds the result.
        rotation: ``None`` or a :class:`~piecewise_quant.args.RotationArgs` (or a dict of its
            fields, or a preset name ``"quarot"`` / ``"quip"``): randomized Hadamard rotations
            applied by ``quantize``/``calibrate`` before any layer is quantized
            (docs/rotation.md). A checkpoint stores the rotations' description; the fused ones
            are in its weights, the online ones are rebuilt from the seed on load.

    Patterns are matched in linear time and limited in length and number
    (:mod:`piecewise_quant.patterns`): a checkpoint's config cannot hang or exhaust a loader.
    """

    modules_to_not_convert: tuple[str, ...] | None = None
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    calibration: CalibrationConfig | None = None
    strict: bool = False
    version: int = SCHEMA_VERSION
    quant_method: str = QUANT_METHOD
    kv_cache: "KVArgs | None" = None
    kv_bits: int | None = None
    kv_group_size: int | None = None
    kv_residual_length: int | None = None
    rotation: "RotationArgs | None" = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.quant_method, str) and self.quant_method.lower() == QUANT_METHOD:
            object.__setattr__(self, "quant_method", QUANT_METHOD)
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}; got {self.quant_method!r}")
        if not isinstance(self.strict, bool):
            raise ValueError(f"strict must be True or False; got {self.strict!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"version must be a positive integer schema version; got {self.version!r}")
        if self.version > SCHEMA_VERSION:
            raise ValueError(
                f"this config has schema version {self.version}, newer than the {SCHEMA_VERSION} this "
                "piecewise-quant understands; upgrade piecewise-quant to load it"
            )
        mods = self.modules_to_not_convert
        if mods is not None:
            if isinstance(mods, str) or not isinstance(mods, (list, tuple)) or not all(isinstance(m, str) for m in mods):
                raise ValueError(f"modules_to_not_convert must be a list of name patterns; got {mods!r}")
            for m in mods:
                check_pattern(m, "modules_to_not_convert")
            object.__setattr__(self, "modules_to_not_convert", tuple(mods))
        if isinstance(self.overrides, (list, tuple)):
            pairs: dict[str, Any] = {}
            for item in self.overrides:
                if not (isinstance(item, (list, tuple)) and len(item) == 2):
                    raise ValueError(f"overrides as a list must hold [pattern, {{field: value}}] pairs; got {item!r}")
                if item[0] in pairs:
                    raise ValueError(f"overrides lists pattern {item[0]!r} twice")
                pairs[item[0]] = item[1]
            object.__setattr__(self, "overrides", pairs)
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"overrides must be a mapping {{pattern: {{field: value}}}}; got {self.overrides!r}")
        clean: dict[str, dict[str, Any]] = {}
        for pattern, changes in self.overrides.items():
            if not isinstance(pattern, str) or not isinstance(changes, Mapping):
                raise ValueError(f"overrides entries must be {{pattern: {{field: value}}}}; got {pattern!r}: {changes!r}")
            unknown = sorted(set(changes) - set(SPEC_FIELDS))
            if unknown:
                raise ValueError(
                    f"overrides[{pattern!r}] has unknown fields {unknown}; allowed: {', '.join(SPEC_FIELDS)}"
                )
            check_pattern(pattern, "overrides")
            clean[pattern] = dict(changes)
            self._override_spec(pattern, clean[pattern])  # validate now, not at quantize time
        object.__setattr__(self, "overrides", clean)
        object.__setattr__(self, "calibration", CalibrationConfig.coerce(self.calibration))
        self._resolve_kv_cache()
        if self.rotation is not None:
            self._resolve_rotation()
        self._skip_set, self._override_set  # noqa: B018 - build (and check the limits of) the matchers now

    def _resolve_kv_cache(self) -> None:
        """``kv_cache`` as a :class:`KVArgs` built from itself and the flat ``kv_*`` shortcuts."""
        shortcuts = {"bits": self.kv_bits, "group_size": self.kv_group_size, "residual_length": self.kv_residual_length}
        shortcuts = {k: v for k, v in shortcuts.items() if v is not None}
        if self.kv_cache is None and not shortcuts:
            return
        from .args import KVArgs

        kv = KVArgs.coerce(self.kv_cache)
        if shortcuts:
            kv = KVArgs(**{**(kv.to_dict() if kv is not None else {}), **shortcuts})
        object.__setattr__(self, "kv_cache", kv)
        for name in ("kv_bits", "kv_group_size", "kv_residual_length"):
            object.__setattr__(self, name, None)

    def _resolve_rotation(self) -> None:
        """``rotation`` as :class:`RotationArgs`; ``"R3"`` turns on the KV cache's key rotation."""
        from .args import RotationArgs

        rot = RotationArgs.coerce(self.rotation)
        object.__setattr__(self, "rotation", rot)
        if "R3" in rot.rotations:
            if self.kv_cache is None:
                raise ValueError(
                    "rotation 'R3' rotates the keys of a quantized KV cache, but this config has no kv_cache; set "
                    "kv_cache (e.g. kv_bits=4) or drop 'R3'"
                )
            if not self.kv_cache.key_rotation:
                object.__setattr__(self, "kv_cache", dataclasses.replace(self.kv_cache, key_rotation=True))

    # ---- resolution -------------------------------------------------------------------------

    @property
    def default_spec(self) -> QuantSpec:
        return QuantSpec(**self.spec_dict())

    def _override_spec(self, pattern: str, changes: Mapping[str, Any]) -> QuantSpec:
        try:
            return self.default_spec.with_changes(changes)
        except ValueError as exc:
            raise ValueError(f"overrides[{pattern!r}]: {exc}") from None

    def skip_patterns(self) -> tuple[str, ...]:
        return DEFAULT_MODULES_TO_NOT_CONVERT if self.modules_to_not_convert is None else self.modules_to_not_convert

    # compiled once per config (cached_property writes the instance dict, which a frozen dataclass allows)
    @functools.cached_property
    def _skip_set(self) -> PatternSet:
        return PatternSet(self.skip_patterns(), "modules_to_not_convert")

    @functools.cached_property
    def _override_set(self) -> PatternSet:
        n = len(self.overrides) + len(self.skip_patterns())
        return PatternSet(tuple(self.overrides), f"overrides ({n} patterns with modules_to_not_convert)")

    @functools.cached_property
    def _override_specs(self) -> tuple[QuantSpec | None, ...]:
        return tuple(
            None if changes.get("grid") == "none" else self._override_spec(p, changes) for p, changes in self.overrides.items()
        )

    @property
    def override_schemes(self) -> dict[str, QuantSpec | None]:
        """Each ``overrides`` pattern with the full scheme it gives its layers (``None``: the
        pattern keeps them in float), in matching order; for validating a config before a model
        is loaded."""
        return dict(zip(self.overrides, self._override_specs))

    def online_rotation_for(self, name: str, spec: "QuantSpec | None" = None) -> "OnlineRotation | None":
        """The online rotations of layer ``name`` under :attr:`rotation` (``None``: none); ``spec``:
        the layer's scheme (looked up when not given; ``"balance"`` applies where it quantizes
        activations)."""
        if self.rotation is None:
            return None
        spec = spec if spec is not None else self.spec_for(name)
        act = spec is not None and spec.act_bits is not None
        return self.rotation.online_for(name, _pattern_matches, act)

    def is_skipped(self, name: str) -> bool:
        return self._skip_set.matches(name)

    def spec_for(self, name: str) -> QuantSpec | None:
        """The scheme for module ``name``, or ``None`` if it stays in float."""
        if self.is_skipped(name):
            return None
        i = self._override_set.first(name)
        if i is None:
            return self.default_spec
        return self._override_specs[i]

    def __getstate__(self) -> dict[str, Any]:
        # the compiled matchers (cached above) hold closures: pickle/deepcopy only the fields
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def unmatched_patterns(self, layer_names: Any) -> list[tuple[str, str]]:
        """``(field, pattern)`` for every user-given ``overrides`` / ``modules_to_not_convert``
        pattern that matches none of ``layer_names`` (the default skip list is not checked)."""
        names = list(layer_names)
        out: list[tuple[str, str]] = []
        if self.modules_to_not_convert is not None:
            hit = self._skip_set.matching(names)
            out += [("modules_to_not_convert", p) for i, p in enumerate(self.modules_to_not_convert) if i not in hit]
        hit = self._override_set.matching(names)
        out += [("overrides", p) for i, p in enumerate(self.overrides) if i not in hit]
        return out

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> "PiecewiseQuantConfig":
        """A copy whose overrides are ``overrides`` followed by this config's own."""
        merged = {**dict(overrides), **{k: v for k, v in self.overrides.items() if k not in overrides}}
        return dataclasses.replace(self, overrides=merged)

    # ---- serialization ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.spec_dict().items() if k not in OPTIONAL_SPEC_FIELDS or v != OPTIONAL_SPEC_FIELDS[k]}
        mods = self.modules_to_not_convert
        d["modules_to_not_convert"] = None if mods is None else list(mods)
        # a list keeps the order (first match wins) through hosts that sort JSON keys
        d["overrides"] = [[k, dict(sorted(v.items()))] for k, v in self.overrides.items()]
        if self.strict:  # written only when set, so existing configs serialise (and hash) as before
            d["strict"] = True
        d["version"] = SCHEMA_VERSION
        d["quant_method"] = QUANT_METHOD
        if self.calibration is not None:
            d["calibration"] = self.calibration.to_dict()
        if self.kv_cache is not None:  # written only when set: configs without one keep their plan hash
            d["kv_cache"] = self.kv_cache.to_dict()
        if self.rotation is not None:  # likewise
            d["rotation"] = self.rotation.to_dict()
        return dict(sorted(d.items()))

    def to_json_string(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PiecewiseQuantConfig":
        """Build from :meth:`to_dict` output (e.g. a checkpoint's ``quantization_config``)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a quantization config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("quant_method", QUANT_METHOD)
        if not isinstance(method, str) or method.lower() != QUANT_METHOD:
            raise ValueError(
                f"quantization_config has quant_method={method!r}; piecewise-quant reads only {QUANT_METHOD!r}"
            )
        check_known_fields(cls, data, "quantization_config fields", hidden=frozenset({"quant_method"}))
        if "modules_to_not_convert" in data and data["modules_to_not_convert"] is not None:
            data["modules_to_not_convert"] = tuple(data["modules_to_not_convert"])
        return cls(**data)

    @classmethod
    def from_json_string(cls, text: str) -> "PiecewiseQuantConfig":
        return cls.from_dict(json.loads(text))
