"""Weight formats: the built-in grids and the interface plugin formats implement."""

from .base import TensorLayout, WeightFormat
from .fp8 import FP8Format
from .piecewise import PiecewiseFormat
from .uniform import UniformFormat

__all__ = ["TensorLayout", "WeightFormat", "UniformFormat", "PiecewiseFormat", "FP8Format"]
