"""NF4 (4-bit NormalFloat) weight format for piecewise-quant, as a plugin package."""

from .format import NF4_LEVELS, NF4Format

__all__ = ["NF4Format", "NF4_LEVELS"]
__version__ = "0.1.0"
