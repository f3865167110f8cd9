"""The built-in plugin: registers the shipped formats, observers and kernel backends through the
same hooks third-party plugins use."""

from __future__ import annotations

from .plugins import hookimpl


@hookimpl
def piecewise_quant_register_formats(register):
    from .formats import FP8Format, PiecewiseFormat, UniformFormat

    register(PiecewiseFormat())
    register(UniformFormat())
    register(FP8Format())


@hookimpl
def piecewise_quant_register_observers(register):
    from .observers import minmax_observer, mse_observer

    register("minmax", minmax_observer)
    register("mse", mse_observer)


@hookimpl
def piecewise_quant_register_kernel_backends(register):
    from .kernels.triton_backend import triton_backend

    register(triton_backend())


@hookimpl
def piecewise_quant_register_integrations(register):
    def activate_transformers() -> None:
        from .integrations.transformers import register_with_transformers

        register_with_transformers()

    register("transformers", activate_transformers)
