"""Typed internal arguments: what one layer's weights and input activations are quantized with.

The user-facing config stays flat (:class:`~piecewise_quant.QuantSpec`'s ``grid``, ``bits``,
``act_bits``, ``act_mode``... fields). Internally every component reads these frozen objects
instead, built once from a spec:

* :class:`WeightArgs`: grid/format name, bits, group size, symmetry, observer, scale dtype;
* :class:`ActArgs`: activation format and bits, strategy (``token``, ``tensor``, ``group`` or
  ``timestep``), group size, static or dynamic, clip ratio, top-k.

They are the vocabulary later extensions add to (a KV-cache or rotation argument object follows
the same pattern). Kernel names (``"int8"``, ``"fp8_e4m3"``) and the representable maxima are
derived here and nowhere else above :mod:`piecewise_quant.kernels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .kernels.reference import ACT_QMAX

if TYPE_CHECKING:
    from .config import QuantSpec

__all__ = ["WeightArgs", "ActArgs", "ACT_STRATEGIES", "RotationArgs", "OnlineRotation", "ROTATION_PRESETS"]

ACT_STRATEGIES = ("token", "tensor", "group", "timestep")


@dataclass(frozen=True)
class WeightArgs:
    """How a layer's weight is stored (the weight half of a :class:`~piecewise_quant.QuantSpec`)."""

    grid: str
    bits: int
    group_size: int | str
    symmetric: bool | None
    observer: str
    scale_dtype: str

    @classmethod
    def from_spec(cls, spec: "QuantSpec") -> "WeightArgs":
        return cls(spec.grid, spec.bits, spec.group_size, spec.symmetric, spec.observer, spec.scale_dtype)


@dataclass(frozen=True)
class ActArgs:
    """How a layer's input activations are quantized.

    Attributes:
        format: ``"int"`` (integer), ``"fp8"`` (E4M3) or ``"mxfp4"`` / ``"nvfp4"`` (E2M1
            with block scales along the channels; dynamic only).
        bits: 8 or 4 (fp8: 8; mxfp4/nvfp4: 4).
        strategy: ``"token"`` (a scale per token), ``"tensor"`` (one scale), ``"group"`` (a scale per
            token and per ``group_size`` channels) or ``"timestep"`` (one static scale per calibrated
            diffusion timestep).
        dynamic: scales computed at run time (``True``) or set once from calibration statistics.
        group_size: channels per scale for the ``"group"`` strategy, else ``None``.
        clip_ratio: the observed range is multiplied by this, in (0, 1].
        topk: the range is the (k+1)-th largest magnitude, so the k largest are clipped.
        symmetric: ``False`` for a scale and an offset per token (or group) from its minimum and
            maximum (``act_mode="dynamic_per_token_asym"``; dynamic integer activations only).
    """

    format: str
    bits: int
    strategy: str = "token"
    dynamic: bool = True
    group_size: int | None = None
    clip_ratio: float = 1.0
    topk: int = 0
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.format not in ("int", "fp8", "mxfp4", "nvfp4"):
            raise ValueError(f"activation format must be 'int', 'fp8', 'mxfp4' or 'nvfp4'; got {self.format!r}")
        fp4 = self.format in ("mxfp4", "nvfp4")
        if self.bits not in ((8,) if self.format == "fp8" else (4,) if fp4 else (4, 8)):
            raise ValueError(f"{self.format} activations cannot be {self.bits} bits wide; use 8 (or 4 for int; "
                             "mxfp4/nvfp4: 4)")
        if fp4 and not self.dynamic:
            raise ValueError(f"{self.format} activations are dynamic only (block scales computed at run time)")
        if self.strategy not in ACT_STRATEGIES:
            raise ValueError(f"activation strategy must be one of {', '.join(ACT_STRATEGIES)}; got {self.strategy!r}")
        if (self.strategy == "group") != (self.group_size is not None):
            raise ValueError("an activation group_size goes with strategy='group' and only with it")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size <= 0):
            raise ValueError(f"activation group_size must be a positive integer; got {self.group_size!r}")
        if self.dynamic != (self.strategy in ("token", "group")):
            raise ValueError(f"strategy {self.strategy!r} is {'static' if self.dynamic else 'dynamic'}-only")
        if not self.symmetric and (self.format != "int" or not self.dynamic or self.topk != 0):
            raise ValueError("asymmetric activations are dynamic integer ones without top-k clipping; got "
                             f"format={self.format!r}, dynamic={self.dynamic}, topk={self.topk}")

    @classmethod
    def from_spec(cls, spec: "QuantSpec", **changes: Any) -> "ActArgs | None":
        """The activation half of ``spec`` (``None`` when the layer is weight-only); ``changes``
        replace fields (a diffusers layer's ``strategy="group"`` or ``"timestep"``)."""
        if spec.act_bits is None:
            return None
        static = spec.act_mode == "static_per_tensor"
        fields = dict(format=spec.act_format, bits=spec.act_bits, strategy="tensor" if static else "token",
                      dynamic=not static, clip_ratio=float(spec.act_clip_ratio), topk=int(spec.act_topk),
                      symmetric=spec.act_mode != "dynamic_per_token_asym")
        fields.update(changes)
        return cls(**fields)

    @property
    def kernel_format(self) -> str:
        """The kernels' activation format name: ``"int8"``, ``"int4"``, ``"fp8_e4m3"``, ``"mxfp4"``
        or ``"nvfp4"``."""
        if self.format in ("mxfp4", "nvfp4"):
            return self.format
        return "fp8_e4m3" if self.format == "fp8" else f"int{self.bits}"

    @property
    def kernel_mode(self) -> str:
        """The kernels' activation mode: dynamic strategies quantize per token (a group is a
        token of ``group_size`` channels), static ones with one given scale."""
        if not self.dynamic:
            return "static_per_tensor"
        return "dynamic_per_token" if self.symmetric else "dynamic_per_token_asym"

    @property
    def qmax(self) -> float:
        """The largest representable magnitude (127, 7 or 448)."""
        return ACT_QMAX[self.kernel_format]

    def scale_for(self, magnitude: float) -> float:
        """The static scale that maps an observed range ``magnitude`` (already clipped) to ``qmax``."""
        return magnitude / self.qmax if magnitude > 0 else 1.0 / self.qmax

    def describe(self) -> str:
        """``int8/token``, ``fp8/tensor``, ``int4/group(32)``..."""
        strategy = f"group({self.group_size})" if self.strategy == "group" else self.strategy
        asym = "" if self.symmetric else " asym"
        return f"{self.format}{self.bits if self.format == 'int' else ''}/{strategy}{asym}"


# ---- the KV cache (appended here so that it merges cleanly with other edits of this module) ----

__all__ += ["KVArgs", "KV_BITS", "KV_AXES"]

KV_BITS = (2, 3, 4, 8)
KV_AXES = ("channel", "token")
KV_FORMATS = ("int", "fp8")
KV_GRIDS = ("uniform", "piecewise")
KV_METADATA_BITS = 16  # scale (and zero point) per group, stored as float16


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"kv_cache.{name} must be an integer >= {minimum}; got {value!r}")


def _check_static(kv: "KVArgs") -> None:
    """``static_scales=True`` is per-tensor FP8 over every token: refuse the fields it cannot honour."""
    if not isinstance(kv.static_scales, bool):
        raise ValueError(f"kv_cache.static_scales must be True or False; got {kv.static_scales!r}")
    if not kv.static_scales:
        return
    need = {"format": "fp8", "residual_length": 0, "sink_tokens": 0, "key_rotation": False}
    wrong = {k: getattr(kv, k) for k, v in need.items() if getattr(kv, k) != v}
    if wrong:
        raise ValueError(
            f"kv_cache.static_scales=True is one FP8 E4M3 scale per layer for every cached token; it needs "
            f"format='fp8', residual_length=0, sink_tokens=0 and no key rotation, got {wrong}; e.g. "
            "KVArgs(bits=8, format='fp8', static_scales=True, residual_length=0)"
        )


@dataclass(frozen=True)
class KVArgs:
    """How the KV cache (attention keys and values) is quantized.

    Attributes:
        bits: bits per stored code: 2, 3, 4 or 8 (``format="fp8"``: 8).
        format: ``"int"`` (uniform integer codes) or ``"fp8"`` (E4M3 codes, symmetric).
        key_axis: ``"channel"`` (KIVI: one scale per channel for each block of ``group_size``
            tokens; keys have outlier channels) or ``"token"`` (a scale per token and per
            ``group_size`` channels, the QLLM-Eval protocol).
        value_axis: ``"token"`` (the only choice: values are mixed per token by attention).
        group_size: channels per scale (token axis) or tokens per block (channel axis).
        residual_length: the most recent tokens kept in full precision (KIVI's R; 0: none).
        sink_tokens: the first tokens kept in full precision ("attention sinks").
        symmetric: ``False`` (default for int): a zero point per group; ``True``: a signed scale
            only. fp8 is always symmetric.
        grid: ``"uniform"`` (default) or ``"piecewise"``: the project's weight grid (a dense
            centre and sparse tails, one signed float16 scale and a breakpoint id per group,
            chosen by an MSE breakpoint search at every write), int codes only. Lower error
            than uniform at every width and fewer stored bits; slower writes, so slower decode
            at short contexts (docs/kv-cache.md).
        key_rotation: rotate each head's keys by a randomized Hadamard matrix before quantizing
            them and back after (QuaRot/SpinQuant's R3: the same attention scores as rotating
            queries and keys, and key outlier channels spread out). Set by ``rotation`` with
            ``"R3"``; the head size must have a Hadamard matrix (docs/rotation.md).
        static_scales: ``True``: one FP8 E4M3 scale per attention layer for keys and one for
            values (``k_scale``/``v_scale``, set by calibration, what vLLM's ``--kv-cache-dtype
            fp8`` serves; :mod:`piecewise_quant.kv_static`); needs ``format="fp8"``,
            ``residual_length=0`` and ``sink_tokens=0`` (``group_size`` and the axes are unused).
            ``False`` (default): scales per group, computed as the cache is written.
    """

    bits: int = 4
    format: str = "int"
    key_axis: str = "channel"
    value_axis: str = "token"
    group_size: int = 32
    residual_length: int = 128
    sink_tokens: int = 0
    symmetric: bool | None = None
    grid: str = "uniform"
    key_rotation: bool = False
    static_scales: bool = False

    def __post_init__(self) -> None:
        _check_static(self)
        if not isinstance(self.key_rotation, bool):
            raise ValueError(f"kv_cache.key_rotation must be True or False; got {self.key_rotation!r}")
        if self.format not in KV_FORMATS:
            raise ValueError(f"kv_cache.format must be one of {KV_FORMATS}; got {self.format!r}")
        allowed = (8,) if self.format == "fp8" else KV_BITS
        if isinstance(self.bits, bool) or self.bits not in allowed:
            raise ValueError(f"kv_cache.bits must be one of {allowed} for format {self.format!r}; got {self.bits!r}")
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", self.format == "fp8")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"kv_cache.symmetric must be True, False or None; got {self.symmetric!r}")
        if self.format == "fp8" and not self.symmetric:
            raise ValueError("fp8 KV codes are symmetric (a scale, no zero point); set symmetric=True or format='int'")
        if self.key_axis not in KV_AXES:
            raise ValueError(f"kv_cache.key_axis must be 'channel' (KIVI) or 'token'; got {self.key_axis!r}")
        if self.value_axis != "token":
            raise ValueError(f"kv_cache.value_axis must be 'token' (values are quantized per token); got {self.value_axis!r}")
        _check_count("group_size", self.group_size, 1)
        _check_count("residual_length", self.residual_length, 0)
        _check_count("sink_tokens", self.sink_tokens, 0)
        if self.grid not in KV_GRIDS:
            raise ValueError(f"kv_cache.grid must be one of {KV_GRIDS}; got {self.grid!r}")
        if self.grid == "piecewise" and (self.format != "int" or self.symmetric):
            raise ValueError(
                "kv_cache.grid='piecewise' needs format='int' and symmetric=False/None: the grid stores a signed "
                "scale and a breakpoint per group (no zero point), so symmetric does not apply to it"
            )

    @classmethod
    def coerce(cls, value: Any) -> "KVArgs | None":
        """``None``, a :class:`KVArgs`, or a dict of its fields (never modified)."""
        if value is None or isinstance(value, KVArgs):
            return value
        if isinstance(value, dict) or hasattr(value, "keys"):
            known = {f for f in cls.__dataclass_fields__}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"unknown kv_cache fields {unknown}; allowed: {sorted(known)}")
            return cls(**dict(value))
        raise ValueError(f"kv_cache must be a KVArgs, a dict of its fields or None; got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        # static_scales is written only when set: configs without it serialise (and hash) as before
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "static_scales" or self.static_scales}

    @property
    def qmax(self) -> float:
        """The largest code magnitude: 448 (fp8), ``2**(bits-1) - 1`` (symmetric int) or
        ``2**bits - 1`` (asymmetric int, codes from 0)."""
        if self.format == "fp8":
            return ACT_QMAX["fp8_e4m3"]
        return float(2 ** (self.bits - 1) - 1) if self.symmetric else float(2**self.bits - 1)

    def bits_per_value(self, axis: str) -> float:
        """Stored bits per quantized value along ``axis`` (codes plus float16 scale and zero point)."""
        if self.grid == "piecewise":  # float16 signed scale + one uint8 breakpoint id per group
            return self.bits + (KV_METADATA_BITS + 8) / self.group_size
        meta = KV_METADATA_BITS * (1 if self.symmetric else 2)
        return self.bits + meta / self.group_size

    def for_axis(self, which: str) -> str:
        """The quantization axis of ``"key"`` or ``"value"``."""
        return self.key_axis if which == "key" else self.value_axis

    def describe(self) -> str:
        """``int4 K/channel V/token g32 r128``..."""
        sink = f" sink{self.sink_tokens}" if self.sink_tokens else ""
        name = "fp8" if self.format == "fp8" else f"int{self.bits}" + (" piecewise" if self.grid == "piecewise" else "")
        sym = " sym" if self.symmetric and self.format == "int" else ""
        rot = " R3" if self.key_rotation else ""
        if self.static_scales:
            return "fp8 static per-tensor k_scale/v_scale"
        return f"{name}{sym} K/{self.key_axis} V/{self.value_axis} g{self.group_size} r{self.residual_length}{sink}{rot}"


LEARN_LR = 2e-3  # Adam on the skew-symmetric parameter of the learned rotations
ROTATIONS = ("R1", "R2", "R3", "R4", "input", "output", "balance")
ROTATION_DEFAULT_ONLINE_TARGETS = ("*down_proj", "*o_proj")
ROTATION_PRESETS: dict[str, dict[str, Any]] = {
    # QuaRot-style (random Hadamard, not learned): residual stream and per-head rotations fused into
    # the weights, online rotations of the down_proj input and (across heads) the o_proj input
    "quarot": {"rotations": ("R1", "R2", "R4"), "online_targets": ROTATION_DEFAULT_ONLINE_TARGETS},
    # QuIP#-style incoherence for low-bit weights: every quantized layer's input and output rotated
    # online, the inverse rotations fused into its weight
    "quip": {"rotations": ("input", "output")},
    # SpinQuant-style: QuaRot's rotations with R1 and R2 learned (Cayley optimisation of the
    # fake-quantized model's loss on the calibration data, starting from the random Hadamard)
    "spinquant": {"rotations": ("R1", "R2", "R4"), "online_targets": ROTATION_DEFAULT_ONLINE_TARGETS, "learn": True},
    # ViDiT-Q's channel balance: every layer that quantizes its activations divides its input by a
    # smoothing scale measured on the calibration data and rotates it online (works on any model;
    # the lowest W4A4 / W4A4KV4 error measured on the bundled Llama, docs/rotation.md)
    "viditq": {"rotations": ("balance",)},
}
LEARNABLE_ROTATIONS = ("R1", "R2")  # the fused ones: a learned matrix lives in the weights, nothing else to store


@dataclass(frozen=True)
class OnlineRotation:
    """The rotations one quantized layer applies at run time: ``input`` rotates ``x`` before the
    (rotated) weight multiplies it, ``output`` rotates the result back. Rebuilt from ``seed`` and
    the layer's sizes, never stored."""

    input: bool = False
    output: bool = False
    seed: int = 0
    balance: bool = False  # the input rotation is preceded by a per-channel smoothing scale (ViDiT-Q)

    def __post_init__(self) -> None:
        if self.balance and not self.input:
            raise ValueError("OnlineRotation(balance=True) smooths the rotated input: it needs input=True")

    def describe(self) -> str:
        names = (("balance" if self.balance else "in", self.input), ("out", self.output))
        return "+".join(n for n, on in names if on) + f"/seed{self.seed}"


@dataclass(frozen=True)
class RotationArgs:
    """Randomized Hadamard rotations applied before quantization (QuaRot, QuIP#).

    Each rotation ``R`` is orthogonal, so inserting ``R R^T`` between two linear maps changes
    nothing in float; it spreads outlier channels over all channels, which makes weights and
    activations far easier to quantize. The matrices are rebuilt from ``seed`` and the layer sizes
    (``kernels/hadamard.py``), so a checkpoint stores only this object.

    Attributes:
        rotations: any of
            ``"R1"``: the residual stream (embeddings, every block's q/k/v/gate/up inputs and
            o/down outputs, ``lm_head``'s input), fused into the weights; RMSNorm weights are
            folded into the following layers first and tied embeddings are untied (Llama-family
            decoders);
            ``"R2"``: per attention head between ``v_proj`` and ``o_proj``, fused;
            ``"R3"``: each head's keys in the quantized KV cache (needs ``kv_cache``; sets its
            ``key_rotation``), the same scores as rotating queries and keys after RoPE;
            ``"R4"``: online on the input of the layers matching ``online_targets`` (default
            ``down_proj`` and ``o_proj``, QuaRot's choice), the inverse fused into their weight;
            ``"input"`` / ``"output"``: online on every quantized layer's input / output (QuIP#
            incoherence for 2-3 bit weights);
            ``"balance"``: ViDiT-Q's static-dynamic channel balance on every layer that quantizes its
            activations: a per-input-channel smoothing scale ``s`` (SmoothQuant's
            ``max|X|^alpha / max|W|^(1 - alpha)``, from the calibration data: for diffusion models
            over every timestep and guidance branch), then a random Hadamard rotation, online:
            ``x -> (x / s) R``, ``W -> W diag(s) R``. ``s`` is stored per layer
            (``balance_scale``, float16); it needs calibration data (``calibrate()`` or a pipeline's
            ``enable_quant``), so ``quantize()`` refuses it.
        seed: seed of the random signs (each rotation draws from ``(seed, size, which)``).
        online_targets: layer name patterns that ``"R4"`` rotates online.
        balance_alpha: the smoothing exponent of ``"balance"`` (0: no smoothing, only the rotation;
            1: all of the activation range moved into the weights), or ``"auto"`` (default): per
            layer, the one of 0, 0.25, 0.5 and 0.75 whose quantized layer (weights rounded to
            nearest, activations quantized) best reproduces the float layer's output on the
            calibration inputs.
        learn: learn the fused rotations (``R1``, and ``R2`` per block) instead of keeping the
            random Hadamard (SpinQuant): starting from it, an orthogonal correction ``Q = cayley(A)``
            of a skew-symmetric ``A`` is optimised with Adam to minimise the next-token cross-entropy
            of the fake-quantized model (weights rounded to nearest on a uniform grid of the layer's
            bits and group size, activations quantized as the layer says, both with a
            straight-through gradient) on the calibration data. Needs ``"R1"`` or ``"R2"`` and
            calibration data (``calibrate()``); the result is fused into the weights in float64, so
            a checkpoint needs nothing else to reload or serve it (it cannot be rebuilt from
            ``seed``).
        learn_steps: optimisation steps (one calibration batch each, cycling through them).
        learn_lr: Adam's learning rate on ``A``.
        learn_kv: also fake-quantize the keys and values as the config's ``kv_cache`` stores
            them (straight-through) in the learning loss, as SpinQuant does for its KV4 rows.
            Off by default: on the bundled model it measured worse than learning without the
            cache (docs/rotation.md). Needs ``learn=True``; ignored without a ``kv_cache`` or
            with static (calibrated) KV scales, which do not exist yet while learning.

    Presets: ``"quarot"`` (R1, R2, R4; add ``"R3"`` with a quantized KV cache), ``"spinquant"``
    (the same with R1/R2 learned), ``"quip"`` (input, output) and ``"viditq"`` (balance); pass the
    name as ``PiecewiseQuantConfig(rotation="quarot")``.
    """

    rotations: tuple[str, ...] = ("R1", "R2", "R4")
    seed: int = 0
    online_targets: tuple[str, ...] = ROTATION_DEFAULT_ONLINE_TARGETS
    balance_alpha: float | str = "auto"
    learn: bool = False
    learn_steps: int = 100
    learn_lr: float = LEARN_LR
    learn_kv: bool = False

    def __post_init__(self) -> None:
        rots = self.rotations
        if isinstance(rots, str) or not isinstance(rots, (tuple, list)) or not rots:
            raise ValueError(f"rotation.rotations must be a non-empty list of {list(ROTATIONS)}; got {rots!r}")
        unknown = [r for r in rots if r not in ROTATIONS]
        if unknown:
            raise ValueError(f"rotation.rotations has unknown entries {unknown}; allowed: {list(ROTATIONS)}")
        if len(set(rots)) != len(rots):
            raise ValueError(f"rotation.rotations lists an entry twice: {list(rots)}")
        object.__setattr__(self, "rotations", tuple(r for r in ROTATIONS if r in rots))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"rotation.seed must be an integer >= 0; got {self.seed!r}")
        targets = self.online_targets
        if isinstance(targets, str) or not isinstance(targets, (tuple, list)) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"rotation.online_targets must be a list of layer name patterns; got {targets!r}")
        object.__setattr__(self, "online_targets", tuple(targets))
        a = self.balance_alpha
        if a != "auto":
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
                raise ValueError(f"rotation.balance_alpha must be 'auto' or a number in [0, 1] (e.g. 0.5); got {a!r}")
            object.__setattr__(self, "balance_alpha", float(a))
        if "balance" in self.rotations and "input" in self.rotations:
            raise ValueError(
                "rotation: 'balance' already rotates the input of every layer that quantizes activations; with 'input' "
                "as well the two would overlap. Use one of them ('balance' for activation quantization)"
            )
        self._check_learn()

    def _check_learn(self) -> None:
        if not isinstance(self.learn, bool):
            raise ValueError(f"rotation.learn must be True or False; got {self.learn!r}")
        steps, lr = self.learn_steps, self.learn_lr
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"rotation.learn_steps must be an integer > 0 (e.g. 100); got {steps!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"rotation.learn_lr must be a number > 0 (e.g. {LEARN_LR}); got {lr!r}")
        object.__setattr__(self, "learn_lr", float(lr))
        if not isinstance(self.learn_kv, bool):
            raise ValueError(f"rotation.learn_kv must be True or False; got {self.learn_kv!r}")
        if self.learn_kv and not self.learn:
            raise ValueError("rotation.learn_kv=True models the KV cache while rotations are learned; set learn=True "
                             "as well (or drop learn_kv)")
        if not self.learn:
            return
        if not any(r in LEARNABLE_ROTATIONS for r in self.rotations):
            raise ValueError(
                f"rotation.learn=True learns the fused rotations {list(LEARNABLE_ROTATIONS)}, and rotations="
                f"{list(self.rotations)} has neither (online rotations stay random Hadamard matrices rebuilt from the "
                "seed); add 'R1' and/or 'R2' (e.g. rotation='spinquant') or set learn=False"
            )
        other = [r for r in self.rotations if r in ("input", "output", "balance")]
        if other:
            raise ValueError(
                f"rotation.learn=True optimises R1/R2 with R3/R4 held fixed; it does not support {other} (QuIP / "
                "ViDiT-Q rotations). Use rotations from ['R1', 'R2', 'R3', 'R4'] or set learn=False"
            )

    @classmethod
    def coerce(cls, value: Any) -> "RotationArgs | None":
        """``None``, a :class:`RotationArgs`, a preset name (``"quarot"``, ``"quip"``) or a dict of its fields."""
        if value is None or isinstance(value, RotationArgs):
            return value
        if isinstance(value, str):
            if value not in ROTATION_PRESETS:
                raise ValueError(f"unknown rotation preset {value!r}; allowed: {sorted(ROTATION_PRESETS)}")
            return cls(**ROTATION_PRESETS[value])
        if isinstance(value, dict) or hasattr(value, "keys"):
            known = set(cls.__dataclass_fields__)
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"unknown rotation fields {unknown}; allowed: {sorted(known)}")
            data = dict(value)
            for key in ("rotations", "online_targets"):
                if isinstance(data.get(key), list):
                    data[key] = tuple(data[key])
            return cls(**data)
        raise ValueError(
            f"rotation must be a RotationArgs, a preset name {sorted(ROTATION_PRESETS)}, a dict or None; got {value!r}"
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rotations": list(self.rotations), "seed": self.seed,
                             "online_targets": list(self.online_targets)}
        if "balance" in self.rotations:  # only then: configs without it keep their bytes (and plan hash)
            d["balance_alpha"] = self.balance_alpha
        if self.learn:  # likewise
            d.update(learn=True, learn_steps=self.learn_steps, learn_lr=self.learn_lr)
        if self.learn_kv:
            d["learn_kv"] = True
        return d

    @property
    def fused(self) -> tuple[str, ...]:
        """The rotations folded into the model's weights (``R1``, ``R2``)."""
        return tuple(r for r in self.rotations if r in ("R1", "R2"))

    def online_for(self, name: str, matches: Any, act_quantized: bool = False) -> OnlineRotation | None:
        """The online rotations of layer ``name`` (``matches(pattern, name)`` tests a pattern;
        ``act_quantized``: whether the layer quantizes its activations, which ``"balance"`` needs)."""
        balance = "balance" in self.rotations and act_quantized
        inp = balance or "input" in self.rotations or (
            "R4" in self.rotations and any(matches(p, name) for p in self.online_targets))
        out = "output" in self.rotations
        return OnlineRotation(inp, out, self.seed, balance) if (inp or out) else None

    def describe(self) -> str:
        learned = f" learned({self.learn_steps} steps{', KV in the loss' if self.learn_kv else ''})" if self.learn else ""
        return "+".join(self.rotations) + f" seed{self.seed}" + learned
