"""Which positions of the running calibration batch are real tokens (not padding).

Calibration runs a block on stored batches (``calibration/blocks.py``). For a padded batch it
sets the batch's ``(batch, tokens)`` boolean mask here for the duration of the block call, and
every statistic taken from layer inputs (ranges, mean squares, GPTQ Hessians, static activation
scales) drops the padding rows with :func:`real_tokens`, so that padding never shapes a scale.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

__all__ = ["current_token_mask", "real_tokens", "token_mask"]

_TOKEN_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("pq_token_mask", default=None)


def current_token_mask() -> torch.Tensor | None:
    """The running batch's boolean mask of real tokens, or ``None`` (every position is real)."""
    return _TOKEN_MASK.get()


@contextlib.contextmanager
def token_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, :func:`current_token_mask` is ``mask``."""
    token = _TOKEN_MASK.set(mask)
    try:
        yield
    finally:
        _TOKEN_MASK.reset(token)


def real_tokens(x: torch.Tensor) -> torch.Tensor:
    """``x`` (``(batch, tokens, ..., features)``) as rows of its last dimension, with the padding
    positions of the running batch removed when its mask lines up with ``x``'s first two dimensions."""
    mask = current_token_mask()
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])
