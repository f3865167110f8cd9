"""What ``bits=None``, ``group_size="auto"`` and ``symmetric=None`` mean for each built-in format.

Torch-free on purpose: every ``QuantSpec`` reads it when it is built, and building a config must not
import torch. The format classes take their ``default_*`` attributes from here, so this table is
the one place the defaults are written.
"""

from __future__ import annotations

__all__ = ["BUILTIN_DEFAULTS", "GENERIC_DEFAULTS"]

#: ``grid -> (bits, group_size, symmetric)``
BUILTIN_DEFAULTS: dict[str, tuple[int, int | str, bool | None]] = {
    "piecewise": (4, 128, None),
    "uniform": (4, 128, False),
    "fp8": (8, "channel", None),  # E4M3 with per-channel scales
    "mxfp4": (4, 32, None),  # E2M1, one E8M0 scale per 32 weights (the block is fixed)
    "nvfp4": (4, 16, None),  # E2M1, one E4M3 scale per 16 weights and a float32 one per tensor
}
#: a plugin format's, unless its class says otherwise (a spec never loads plugins to find out)
GENERIC_DEFAULTS: tuple[int, int | str, bool | None] = (4, 128, None)
