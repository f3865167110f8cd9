"""piecewise-quant: post-training quantization (piecewise, uniform, FP8 grids) for LLMs and DiTs.

Quick start::

    import piecewise_quant as pq
    pq.quantize(model, pq.PiecewiseQuantConfig(bits=4, group_size=128))   # any torch model, in place

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=pq.PiecewiseQuantConfig())

Importing this package is cheap: torch-heavy parts load on first use, and it never imports
transformers, diffusers, vLLM or PEFT.
"""

from __future__ import annotations

if __name__ != "piecewise_quant":
    raise ImportError(
        f"the folder 'quant_core/' must be imported as 'piecewise_quant', not {__name__!r}; "
        "install the package (pip install -e .) and run pytest with --import-mode=importlib"
    )

from typing import TYPE_CHECKING

from . import _autoload  # noqa: F401  (the import hook and load guard: also where no .pth file ran)
from ._lazy import lazy_exports

__version__ = "0.1.0"

# Everything is imported on first use: the wheel's import hook imports this package at every
# interpreter start, so ``import piecewise_quant`` must cost next to nothing.
_LAZY = {
    "PiecewiseQuantConfig": ".config",
    "QuantSpec": ".config",
    "CalibrationConfig": ".config",
    "calibrate": ".calibration.engine",
    "CalibrationReport": ".calibration.engine",
    "LayerCalibration": ".calibration.engine",
    "hookimpl": ".plugins",
    "quantize": ".quantization",
    "plan_layers": ".quantization",
    "calibrate_activation_scales": ".quantization",
    "quantized_layers": ".quantization",
    "QuantLinear": ".qlinear",
    "WeightFormat": ".formats",
    "TensorLayout": ".formats",
    "get_format": ".registry",
    "available_formats": ".registry",
    "save_quantized": ".serialization",
    "load_quantized": ".serialization",
    "save_pretrained": ".saving",
    "model_size_report": ".report",
    "PiecewiseQuantWarning": ".errors",
    "CheckpointMismatchError": ".errors",
    "KVArgs": ".args",
    "calibrate_kv_scales": ".kv_static",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from .args import KVArgs
    from .calibration.engine import CalibrationReport, LayerCalibration, calibrate
    from .config import CalibrationConfig, PiecewiseQuantConfig, QuantSpec
    from .errors import CheckpointMismatchError, PiecewiseQuantWarning
    from .formats import TensorLayout, WeightFormat
    from .kv_static import calibrate_kv_scales
    from .plugins import hookimpl
    from .qlinear import QuantLinear
    from .quantization import calibrate_activation_scales, plan_layers, quantize, quantized_layers
    from .registry import available_formats, get_format
    from .report import model_size_report
    from .saving import save_pretrained
    from .serialization import load_quantized, save_quantized


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
