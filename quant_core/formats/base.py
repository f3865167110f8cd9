"""The weight-format interface every grid implements (built-in or plugin)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import LayerSpec, QuantSpec
from .defaults import GENERIC_DEFAULTS

if TYPE_CHECKING:
    from ..kernels.ops import WeightOperand

__all__ = ["TensorLayout", "WeightFormat", "scale_dtype_of", "round_scale"]


@dataclass(frozen=True)
class TensorLayout:
    """Shape and dtype of one stored tensor of a quantized layer."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbits(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.finfo(self.dtype).bits if self.dtype.is_floating_point else n * torch.iinfo(self.dtype).bits


def scale_dtype_of(spec: QuantSpec) -> torch.dtype:
    return getattr(torch, spec.scale_dtype)


def round_scale(scale: torch.Tensor, dtype: torch.dtype, layer: str) -> torch.Tensor:
    """Cast scales to their storage ``dtype``, rounding to nearest (rounding always up would bias
    every weight's magnitude: +0.008 perplexity at 3 bits on the bundled model). A non-zero scale
    never becomes 0 (the smallest positive value instead), and one that overflows raises."""
    mag = scale.abs()
    info = torch.finfo(dtype)
    if bool((mag > info.max).any()):
        raise ValueError(
            f"layer {layer!r}: a weight scale of {float(mag.max()):.3g} overflows {dtype}; "
            "use PiecewiseQuantConfig(scale_dtype='float32') for weights this large"
        )
    cast = mag.to(dtype)
    tiny = torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype))
    cast = torch.where((mag > 0) & (cast == 0), tiny.expand_as(cast), cast)
    return torch.where(scale < 0, -cast, cast)


class WeightFormat(abc.ABC):
    """A way to store a Linear layer's weight.

    Subclasses set ``name`` (what ``PiecewiseQuantConfig(grid=...)`` and checkpoints use) and
    ``supported_bits``, and implement :meth:`layout`, :meth:`quantize` and :meth:`dequantize`.
    ``kernel_format`` names the ``piecewise_quant::linear`` weight format that runs the layer
    (``None``: :meth:`linear` dequantizes and calls ``F.linear``, which any plugin format gets
    for free).
    """

    name: ClassVar[str]
    supported_bits: ClassVar[tuple[int, ...]]
    supports_groups: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs) -> None:
        """Route ``layout``/``fit``/``encode``/``dequantize`` through :mod:`piecewise_quant.outliers`
        for layers with ``outliers`` set, so every format stores dense-and-sparse weights, and
        (innermost) ``layout``/``quantize``/``fit``/``encode``/``dequantize`` through
        :mod:`piecewise_quant.lowrank` for layers with ``low_rank`` set."""
        super().__init_subclass__(**kwargs)
        from .. import lowrank, outliers

        for name in lowrank.WRAPPED:
            if name in cls.__dict__:
                setattr(cls, name, lowrank.wrap(name, cls.__dict__[name]))
        for name in outliers.WRAPPED:
            if name in cls.__dict__:
                setattr(cls, name, outliers.wrap(name, cls.__dict__[name]))

    def validate(self, spec: QuantSpec) -> None:
        """Raise ``ValueError`` naming the field if this format cannot store ``spec``."""
        if spec.bits not in self.supported_bits:
            raise ValueError(
                f"bits={spec.bits} is not supported by grid {self.name!r}; allowed: "
                + ", ".join(str(b) for b in self.supported_bits)
            )
        if not self.supports_groups and spec.group_size != "channel":
            raise ValueError(f"grid {self.name!r} uses per-channel scales; set group_size='channel', not {spec.group_size!r}")

    def kernel_format(self, spec: QuantSpec) -> str | None:
        return None

    # ---- what the rest of the code asks a format instead of branching on its name ---------------

    #: the per-group tensor besides ``scales`` that the kernel reads (zero points, breakpoint ids)
    aux_tensor: ClassVar[str | None] = None
    #: what ``bits=None`` and ``group_size="auto"`` mean for this format (see ``QuantSpec``)
    default_bits: ClassVar[int] = GENERIC_DEFAULTS[0]
    default_group_size: ClassVar[int | str] = GENERIC_DEFAULTS[1]
    default_symmetric: ClassVar[bool | None] = GENERIC_DEFAULTS[2]

    def weight_operand(self, tensors: dict[str, torch.Tensor], layer: LayerSpec) -> "WeightOperand | None":
        """The stored tensors as the kernel op's weight operand; ``None`` for a format without a
        kernel (its :meth:`linear` runs instead)."""
        kernel = self.kernel_format(layer.spec)
        if kernel is None:
            return None
        from ..kernels.ops import WeightOperand

        aux = tensors.get(self.aux_tensor) if self.aux_tensor is not None else None
        return WeightOperand(tensors["qweight"], tensors["scales"], aux, kernel, layer.spec.bits,
                             layer.group_size, layer.in_features)

    def levels(self, tensors: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
        """Every value each group can represent, float32 ``(rows, n_groups, n_levels)`` (``rows``
        is 1 for per-tensor scales), for plots and grid checks."""
        raise NotImplementedError(f"grid {self.name!r} does not describe its levels")

    def breakpoints(self, tensors: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor | None:
        """Where each group's dense centre ends, float32 ``(rows, n_groups)``; ``None`` for a grid
        without a centre/tail split."""
        return None

    @abc.abstractmethod
    def layout(self, layer: LayerSpec) -> dict[str, TensorLayout]:
        """Every tensor the layer stores, by its stable name (``qweight`` first)."""

    @abc.abstractmethod
    def quantize(self, weight: torch.Tensor, layer: LayerSpec) -> dict[str, torch.Tensor]:
        """Quantize a float ``(out, in)`` weight; return tensors matching :meth:`layout` exactly."""

    @abc.abstractmethod
    def dequantize(self, tensors: dict[str, torch.Tensor], layer: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
        """The float ``(out, in)`` weight the stored tensors represent."""

    # ---- the calibration interface (GPTQ, LWC, breakpoint refinement) -------------------------
    #
    # A format that implements ``fit``/``fake_quantize``/``encode`` works with every calibration
    # algorithm; ``quantize`` is then ``encode(weight, fit(groups))``. Parameters are a dict of
    # per-group tensors, each of shape ``(n,)`` for ``n`` groups, already rounded to what is stored.

    @property
    def supports_calibration(self) -> bool:
        return type(self).fit is not WeightFormat.fit

    def fit(self, groups: torch.Tensor, layer: LayerSpec, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-group parameters for ``groups`` ``(n, g)`` (float32). ``importance`` ``(n, g)``
        (non-negative, e.g. the diagonal of the layer's input Hessian) weights each weight's squared
        error in the search, so ranges are chosen for the layer's output, not only its weights."""
        raise NotImplementedError(
            f"grid {self.name!r} does not implement fit()/fake_quantize()/encode(), which calibration "
            "algorithms (GPTQ, LWC, breakpoint refinement) need; calibrate with another grid or use "
            "the data-free piecewise_quant.quantize"
        )

    def fake_quantize(self, x: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec) -> torch.Tensor:
        """The grid value nearest to each entry of ``x`` ``(n, c)`` (any ``c`` columns of the
        groups), row ``i`` using the parameters of group ``i``."""
        raise NotImplementedError(f"grid {self.name!r} does not implement fake_quantize()")

    def encode(self, weight: torch.Tensor, params: dict[str, torch.Tensor], layer: LayerSpec) -> dict[str, torch.Tensor]:
        """The stored tensors of ``weight`` ``(out, in)`` on the grid given by ``params``."""
        raise NotImplementedError(f"grid {self.name!r} does not implement encode()")

    def bits_per_weight(self, layer: LayerSpec) -> float:
        """Exact storage cost: every stored bit (codes, scales, zero points, breakpoints, padding)
        divided by the number of weights."""
        total = sum(t.nbits for t in self.layout(layer).values())
        return total / (layer.out_features * layer.in_features)

    def linear(
        self,
        x: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        layer: LayerSpec,
        bias: torch.Tensor | None,
        act_args: tuple,
    ) -> torch.Tensor:
        """``y = x W^T + b`` with simulated activation quantization ``act_args``, a
        :class:`~piecewise_quant.kernels.ops.ActOperand` (a 5-tuple ``(act_scale, act_format,
        act_mode, clip_ratio, topk)``)."""
        from ..kernels.ops import ActOperand, quantize_input

        x = quantize_input(x, ActOperand(*act_args))
        w = self.dequantize(tensors, layer, x.dtype)
        return torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)
