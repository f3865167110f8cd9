"""Weight formats: the built-in grids and the interface plugin formats implement.

Names load on first use (PEP 562), so a config can read :mod:`.defaults` without importing torch."""

from .._lazy import lazy_exports

__all__ = ["TensorLayout", "WeightFormat", "UniformFormat", "PiecewiseFormat", "FP8Format", "MXFP4Format", "NVFP4Format"]

_LAZY = {
    "TensorLayout": ".base",
    "WeightFormat": ".base",
    "UniformFormat": ".uniform",
    "PiecewiseFormat": ".piecewise",
    "FP8Format": ".fp8",
    "MXFP4Format": ".fp4",
    "NVFP4Format": ".fp4",
}

__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
