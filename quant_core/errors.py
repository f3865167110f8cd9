"""Error and warning categories of piecewise-quant (catch or filter them by class)."""

from __future__ import annotations

__all__ = ["PiecewiseQuantWarning", "CheckpointMismatchError"]


class PiecewiseQuantWarning(UserWarning):
    """Something the user asked for did not happen as written: a pattern that matches no layer,
    layers left in float because their type is not supported, a tied layer kept in float."""


class CheckpointMismatchError(ValueError):
    """A piecewise checkpoint's tensors do not match its ``quantization_config`` (a tensor missing,
    unexpected, of another shape or dtype, or holding NaN/Inf; a plan hash that differs).

    The one class every loader raises (the core checks, transformers, diffusers, vLLM), so
    ``except piecewise_quant.CheckpointMismatchError`` catches them all."""
