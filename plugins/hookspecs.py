"""The extension points of piecewise-quant.

Every hook is callback style: the plugin receives a ``register`` function and calls it once per
thing it adds, so plugins never touch the project's globals. Built-in formats, observers, kernel
backends and integrations are registered through these same hooks.

A third-party plugin is a module with ``@hookimpl`` functions, published under the entry-point
group ``piecewise_quant``::

    [project.entry-points.piecewise_quant]
    my_format = "my_package.plugin"
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "piecewise_quant"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def piecewise_quant_register_formats(register: Callable[[Any], None]) -> None:
    """Register weight formats: call ``register(fmt)`` with an instance of
    :class:`piecewise_quant.formats.WeightFormat` (unique ``fmt.name``). The name is what users
    put in ``PiecewiseQuantConfig(grid=...)`` and what checkpoints store."""


@hookspec
def piecewise_quant_register_observers(register: Callable[[str, Any], None]) -> None:
    """Register weight-range observers: ``register(name, fn)`` where
    ``fn(groups: Tensor[n, g], bits: int, symmetric: bool) -> (lo, hi)`` returns per-group ranges.
    Usable as ``PiecewiseQuantConfig(observer=name)`` with the uniform grid."""


@hookspec
def piecewise_quant_register_calibration_algorithms(register: Callable[[str, Any], None]) -> None:
    """Register calibration algorithms: ``register(name, algorithm)``. An algorithm is a callable
    ``algorithm(weight: Tensor[out, in], ctx: piecewise_quant.LayerCalibration) -> dict[str, Tensor]``
    that returns the layer's stored tensors (exactly the format's ``layout``). The calibration
    engine calls it for every calibrated layer when ``CalibrationConfig(algorithm=name)``, after
    SmoothQuant/LET folding and LWC, with the fitted group parameters and the layer's input
    statistics in ``ctx``."""


@hookspec
def piecewise_quant_register_kernel_backends(register: Callable[[Any], None]) -> None:
    """Register kernel backends: ``register(backend)`` with a
    :class:`piecewise_quant.kernels.KernelBackend`; the highest-priority backend that supports a
    call runs it, the pure-torch reference runs otherwise."""


@hookspec
def piecewise_quant_register_integrations(register: Callable[[str, Callable[[], None]], None]) -> None:
    """Register framework integrations: ``register(framework_name, activate)`` where ``activate()``
    imports the framework and registers piecewise-quant with it (idempotently)."""


@hookspec
def piecewise_quant_prepare_host_model(model: Any, config: Any) -> None:
    """Called after ``piecewise_quant.quantize`` / ``calibrate`` replaced a model's layers (``config``
    is the :class:`piecewise_quant.PiecewiseQuantConfig` it records): an integration attaches what
    its host needs to save the model as a piecewise checkpoint (transformers: an ``hf_quantizer``,
    so ``save_pretrained`` writes the checkpoint marker). Must not raise for models of other hosts."""
