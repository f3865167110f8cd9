"""What the Triton kernel families share: the interpreter switch, autotuning keyed on a bucketed
row count, and launching on the input's GPU. Imports Triton, so import it lazily (only the
``triton_*`` kernel modules do)."""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager

import torch
import triton

__all__ = ["INTERPRET", "MAX_M_BUCKET", "bucket_m", "prune_by_m_bucket", "on_device"]

# triton decides interpretation when a kernel is decorated; under the interpreter every autotuned
# kernel gets exactly one config
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_M_BUCKET = 256


def bucket_m(m: int) -> int:
    """The autotuning key for ``m`` rows: the next power of two, capped, so a new batch size
    reuses the tuning of its bucket instead of retuning."""
    return min(triton.next_power_of_2(m), MAX_M_BUCKET)


def prune_by_m_bucket(configs, named_args, **kwargs):
    """Drop configs whose M tile is much larger than the (bucketed) number of rows."""
    limit = max(16, named_args["M_BUCKET"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= limit]
    return kept or configs[:1]


def on_device(x: torch.Tensor) -> ContextManager:
    """Launch on ``x``'s GPU (a no-op on CPU, under the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
