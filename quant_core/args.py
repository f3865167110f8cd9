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
