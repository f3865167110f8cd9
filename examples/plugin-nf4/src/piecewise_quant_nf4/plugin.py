"""The module named by this package's ``piecewise_quant`` entry point: its hook implementations."""

from piecewise_quant import hookimpl

from .format import NF4Format


@hookimpl
def piecewise_quant_register_formats(register):
    register(NF4Format())
