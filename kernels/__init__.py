"""piecewise_quant.kernels: quantized-matmul ops with a pure-torch reference and Triton kernels.

Importing this package registers the ``torch.library`` ops; it never touches a GPU and imports
Triton only when a CUDA tensor first reaches a Triton-backed op.
"""

if __name__ != "piecewise_quant.kernels":  # run from the repo root, the folder would shadow HF `kernels`
    raise ImportError(
        f"the folder 'kernels/' must be imported as 'piecewise_quant.kernels', not {__name__!r}; "
        "install the package (pip install -e .) and run pytest with --import-mode=importlib"
    )

from . import ops, reference
from .backends import KernelBackend, register_backend, registered_backends, select_backend, unregister_backend
from .grids import PIECEWISE_TABLES, piecewise_table
from .packing import pack_codes, packed_length, unpack_codes

__all__ = [
    "ops",
    "reference",
    "KernelBackend",
    "register_backend",
    "registered_backends",
    "select_backend",
    "unregister_backend",
    "PIECEWISE_TABLES",
    "piecewise_table",
    "pack_codes",
    "packed_length",
    "unpack_codes",
]
