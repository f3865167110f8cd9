"""The built-in core plugin: registers the shipped formats, observers and kernel backends through
the same hooks third-party plugins use. (The framework integrations are a plugin of their own,
``piecewise_quant.integrations._plugin``, found through this distribution's entry point.)"""

from __future__ import annotations

from .plugins import hookimpl


@hookimpl
def piecewise_quant_register_formats(register):
    from .formats import FP8Format, MXFP4Format, NVFP4Format, PiecewiseFormat, UniformFormat

    register(PiecewiseFormat())
    register(UniformFormat())
    register(FP8Format())
    register(MXFP4Format())
    register(NVFP4Format())


@hookimpl
def piecewise_quant_register_observers(register):
    from .observers import minmax_observer, mse_observer, percentile_observer

    register("minmax", minmax_observer)
    register("mse", mse_observer)
    register("percentile", percentile_observer)


@hookimpl
def piecewise_quant_register_kernel_backends(register):
    from .kernels.cpu_backend import cpu_backend
    from .kernels.triton_backend import triton_backend

    register(triton_backend())
    register(cpu_backend())

