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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .kernels.reference import ACT_QMAX

if TYPE_CHECKING:
    from .config import QuantSpec

__all__ = ["WeightArgs", "ActArgs", "ACT_STRATEGIES"]

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
        format: ``"int"`` (symmetric integer) or ``"fp8"`` (E4M3).
        bits: 8 or 4 (fp8: 8).
        strategy: ``"token"`` (a scale per token), ``"tensor"`` (one scale), ``"group"`` (a scale per
            token and per ``group_size`` channels) or ``"timestep"`` (one static scale per calibrated
            diffusion timestep).
        dynamic: scales computed at run time (``True``) or set once from calibration statistics.
        group_size: channels per scale for the ``"group"`` strategy, else ``None``.
        clip_ratio: the observed range is multiplied by this, in (0, 1].
        topk: the range is the (k+1)-th largest magnitude, so the k largest are clipped.
    """

    format: str
    bits: int
    strategy: str = "token"
    dynamic: bool = True
    group_size: int | None = None
    clip_ratio: float = 1.0
    topk: int = 0

    def __post_init__(self) -> None:
        if self.format not in ("int", "fp8"):
            raise ValueError(f"activation format must be 'int' or 'fp8'; got {self.format!r}")
        if self.bits not in ((8,) if self.format == "fp8" else (4, 8)):
            raise ValueError(f"{self.format} activations cannot be {self.bits} bits wide; use 8 (or 4 for int)")
        if self.strategy not in ACT_STRATEGIES:
            raise ValueError(f"activation strategy must be one of {', '.join(ACT_STRATEGIES)}; got {self.strategy!r}")
        if (self.strategy == "group") != (self.group_size is not None):
            raise ValueError("an activation group_size goes with strategy='group' and only with it")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size <= 0):
            raise ValueError(f"activation group_size must be a positive integer; got {self.group_size!r}")
        if self.dynamic != (self.strategy in ("token", "group")):
            raise ValueError(f"strategy {self.strategy!r} is {'static' if self.dynamic else 'dynamic'}-only")

    @classmethod
    def from_spec(cls, spec: "QuantSpec", **changes: Any) -> "ActArgs | None":
        """The activation half of ``spec`` (``None`` when the layer is weight-only); ``changes``
        replace fields (a diffusers layer's ``strategy="group"`` or ``"timestep"``)."""
        if spec.act_bits is None:
            return None
        static = spec.act_mode == "static_per_tensor"
        fields = dict(format=spec.act_format, bits=spec.act_bits, strategy="tensor" if static else "token",
                      dynamic=not static, clip_ratio=float(spec.act_clip_ratio), topk=int(spec.act_topk))
        fields.update(changes)
        return cls(**fields)

    @property
    def kernel_format(self) -> str:
        """The kernels' activation format name: ``"int8"``, ``"int4"`` or ``"fp8_e4m3"``."""
        return "fp8_e4m3" if self.format == "fp8" else f"int{self.bits}"

    @property
    def kernel_mode(self) -> str:
        """The kernels' activation mode: dynamic strategies quantize per token (a group is a
        token of ``group_size`` channels), static ones with one given scale."""
        return "dynamic_per_token" if self.dynamic else "static_per_tensor"

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
        return f"{self.format}{self.bits if self.format == 'int' else ''}/{strategy}"


# ---- the KV cache (appended here so that it merges cleanly with other edits of this module) ----

__all__ += ["KVArgs", "KV_BITS", "KV_AXES"]

KV_BITS = (2, 3, 4, 8)
KV_AXES = ("channel", "token")
KV_FORMATS = ("int", "fp8")
KV_GRIDS = ("uniform",)
KV_METADATA_BITS = 16  # scale (and zero point) per group, stored as float16


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"kv_cache.{name} must be an integer >= {minimum}; got {value!r}")


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
        grid: ``"uniform"``. (The project's piecewise grid was measured on K/V: lower error
            and perplexity at 3-4 bits, worse at 2; not offered yet, it would run a breakpoint
            search at every cache write; see docs/kv-cache.md.)
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

    def __post_init__(self) -> None:
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
            raise ValueError(
                f"kv_cache.grid must be 'uniform'; got {self.grid!r} (the piecewise grid is not offered for the KV "
                "cache yet, see docs/kv-cache.md)"
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
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @property
    def qmax(self) -> float:
        """The largest code magnitude: 448 (fp8), ``2**(bits-1) - 1`` (symmetric int) or
        ``2**bits - 1`` (asymmetric int, codes from 0)."""
        if self.format == "fp8":
            return ACT_QMAX["fp8_e4m3"]
        return float(2 ** (self.bits - 1) - 1) if self.symmetric else float(2**self.bits - 1)

    def bits_per_value(self, axis: str) -> float:
        """Stored bits per quantized value along ``axis`` (codes plus float16 scale and zero point)."""
        meta = KV_METADATA_BITS * (1 if self.symmetric else 2)
        return self.bits + meta / self.group_size

    def for_axis(self, which: str) -> str:
        """The quantization axis of ``"key"`` or ``"value"``."""
        return self.key_axis if which == "key" else self.value_axis

    def describe(self) -> str:
        """``int4 K/channel V/token g32 r128``..."""
        sink = f" sink{self.sink_tokens}" if self.sink_tokens else ""
        name = "fp8" if self.format == "fp8" else f"int{self.bits}"
        sym = " sym" if self.symmetric and self.format == "int" else ""
        return f"{name}{sym} K/{self.key_axis} V/{self.value_axis} g{self.group_size} r{self.residual_length}{sink}"
