"""piecewise_quant.kernels: quantized-matmul ops with a pure-torch reference and Triton kernels.

Importing this package registers the ``torch.library`` ops; it never touches a GPU and imports
Triton only when a CUDA tensor first reaches a Triton-backed op.
"""

if __name__ != "piecewise_quant.kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path (``python -c`` run
    # there). Hugging Face's own ``kernels`` package owns that name and transformers probes it by
    # importing it, so instead of failing that probe this folder looks like an absent namespace
    # package (no ``__file__``, no version, no submodules) and none of its code runs.
    __path__ = []  # noqa: F811 - no submodule can be imported under the wrong name
    del __file__
else:
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
