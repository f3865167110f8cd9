"""Warning category of piecewise-quant (filter it with ``warnings.filterwarnings``)."""

from __future__ import annotations

__all__ = ["PiecewiseQuantWarning"]


class PiecewiseQuantWarning(UserWarning):
    """Something the user asked for did not happen as written: a pattern that matches no layer,
    layers left in float because their type is not supported, a tied layer kept in float."""
