"""Local-window attention that actually skips the work outside the window (CPU and GPU, pure torch).

A banded mask on dense ``scaled_dot_product_attention`` still computes every query-key product.
Here the queries are cut into blocks and each block attends only to the keys of its own window,
gathered into a dense ``(block, keys)`` problem: the cost is ``N * keys`` instead of ``N * N`` and
each block is one ordinary (fast, unmasked) SDPA call, batched over all blocks at once.

Two window shapes:

* ``"1d"`` (DiTFastAttn's): the token sequence, flattened row-major, is cut into blocks of
  ``block`` queries; block ``i`` attends to the ``block + 2 * window`` keys centred on it
  (``[i*block - window, (i+1)*block + window)``, shifted inwards at the two ends so every block
  sees the same number of keys). Every query therefore sees at least ``window`` keys on each side
  (flash-attn's ``window_size=(window, window)``) plus the rest of its block's span.
* ``"2d"``: the patch grid is cut into ``tile x tile`` squares; each square attends to the
  ``(tile + 2 * window)^2`` patches around it (clamped at the borders): a 2-D neighbourhood.

The exact key set per query is the block's, so the result is *block-local* attention; DiTFastAttn's
residual caching (``R = full - window`` stored at full steps) corrects for whatever the window
misses, as long as the same window is used at both steps, which :class:`WindowSpec` guarantees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["WindowSpec", "window_attention", "window_indices", "keys_per_query"]

WINDOW_SHAPES = ("1d", "2d")


@dataclass(frozen=True)
class WindowSpec:
    """How window attention is cut.

    ``window``: keys on each side of a block (1-D, in tokens) or patches around a tile (2-D).
    ``block``: queries per block (1-D; default ``window``) or tile side in patches (2-D; default
    ``window``)."""

    window: int
    shape: str = "1d"
    block: int | None = None

    def __post_init__(self) -> None:
        if self.shape not in WINDOW_SHAPES:
            raise ValueError(f"window shape {self.shape!r} is not one of {WINDOW_SHAPES}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive integer (tokens or patches), got {self.window!r}")
        if self.block is not None and (not isinstance(self.block, int) or self.block < 1):
            raise ValueError(f"block must be a positive integer, got {self.block!r}")

    @property
    def query_block(self) -> int:
        return self.block if self.block is not None else self.window

    def to_dict(self) -> dict:
        return {"window": self.window, "shape": self.shape, "block": self.block}


_INDEX_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = {}


def _grid(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None:
        if grid[0] * grid[1] != n:
            raise ValueError(f"2-D window: patch grid {grid} does not hold {n} tokens")
        return grid
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"2-D window: {n} tokens is not a square grid; pass the patch grid (height, width)")
    return side, side


def _starts(n: int, block: int, span: int) -> list[int]:
    """Block starts covering ``range(n)`` with blocks of ``block`` (the last one shifted inwards)."""
    starts = list(range(0, n, block))
    if starts and starts[-1] + block > n:
        starts[-1] = n - block
    return starts


def window_indices(n: int, spec: WindowSpec, grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(query_index (blocks, q), key_index (blocks, k))`` for ``n`` tokens, or ``None`` when the
    window covers everything (then dense attention is both exact and cheapest)."""
    key = (n, spec, grid)
    if key in _INDEX_CACHE:
        return _INDEX_CACHE[key]
    result: tuple[torch.Tensor, torch.Tensor] | None
    if spec.shape == "1d":
        block = min(spec.query_block, n)
        span = block + 2 * spec.window
        if span >= n:
            result = None
        else:
            q_idx, k_idx = [], []
            for s in _starts(n, block, span):
                k0 = min(max(s - spec.window, 0), n - span)
                q_idx.append(torch.arange(s, s + block))
                k_idx.append(torch.arange(k0, k0 + span))
            result = torch.stack(q_idx), torch.stack(k_idx)
    else:
        h, w = _grid(n, grid)
        th, tw = min(spec.query_block, h), min(spec.query_block, w)
        sh, sw = min(th + 2 * spec.window, h), min(tw + 2 * spec.window, w)
        if sh * sw >= n:
            result = None
        else:
            rows = torch.arange(h * w).view(h, w)
            q_idx, k_idx = [], []
            for r in _starts(h, th, sh):
                for c in _starts(w, tw, sw):
                    kr = min(max(r - spec.window, 0), h - sh)
                    kc = min(max(c - spec.window, 0), w - sw)
                    q_idx.append(rows[r:r + th, c:c + tw].reshape(-1))
                    k_idx.append(rows[kr:kr + sh, kc:kc + sw].reshape(-1))
            result = torch.stack(q_idx), torch.stack(k_idx)
    if len(_INDEX_CACHE) > 64:
        _INDEX_CACHE.clear()
    _INDEX_CACHE[key] = result
    return result


def keys_per_query(n: int, spec: WindowSpec, grid: tuple[int, int] | None = None) -> int:
    """How many keys each query's block attends to (``n`` when the window covers everything)."""
    idx = window_indices(n, spec, grid)
    return n if idx is None else idx[1].shape[1]


_LAYOUT_CACHE: dict[tuple, torch.Tensor | None] = {}


def _gather_back(q_idx: torch.Tensor, n: int) -> torch.Tensor | None:
    """For each token, its position in the flattened block outputs (the last block that holds it);
    ``None`` when the blocks are simply the tokens in order (a reshape suffices)."""
    key = (n, tuple(q_idx.shape), int(q_idx.sum()), int(q_idx[-1, 0]))
    if key not in _LAYOUT_CACHE:
        flat = q_idx.reshape(-1)
        if flat.numel() == n and bool((flat == torch.arange(n)).all()):
            _LAYOUT_CACHE[key] = None
        else:
            pos = torch.empty(n, dtype=torch.long)
            pos[flat] = torch.arange(flat.numel())  # CPU index_put is sequential: the last block wins
            _LAYOUT_CACHE[key] = pos
    return _LAYOUT_CACHE[key]


def window_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: WindowSpec, grid: tuple[int, int] | None = None,
    global_key: torch.Tensor | None = None, global_value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-local attention of ``query``/``key``/``value`` shaped ``(batch, heads, tokens, head_dim)``.

    Same layout and scale as ``F.scaled_dot_product_attention``; falls back to it when the window
    covers all tokens.

    ``global_key``/``global_value`` (``(batch, heads, g, head_dim)``, both or neither): keys every
    query attends to in addition to its window (joint attention's text tokens): each query's softmax
    runs over its window plus all ``g`` global keys, exactly as a mask allowing those keys would. On
    CPU the window part and the global part are computed apart and merged by their log-sum-exp;
    elsewhere the global keys are appended to every block's gathered keys."""
    b, h, n, d = query.shape
    if (global_key is None) != (global_value is None):
        raise ValueError("window_attention: pass both global_key and global_value, or neither")
    idx = window_indices(n, spec, grid)
    if idx is None:
        if global_key is not None:
            key, value = torch.cat([key, global_key], dim=2), torch.cat([value, global_value], dim=2)
        return F.scaled_dot_product_attention(query, key, value)
    q_idx, k_idx = (t.to(query.device) for t in idx)
    nb, qb = q_idx.shape
    kb = k_idx.shape[1]
    back = _gather_back(idx[0], n)
    if back is None:
        qg = query.reshape(b, h, nb, qb, d)
    else:
        qg = query[:, :, q_idx]
    kg = key[:, :, k_idx]  # (b, h, nb, kb, d): the only copy, ~kb/qb times the keys
    vg = value[:, :, k_idx]
    merge = global_key is not None and _lse_merge_applies(query)
    if global_key is not None and not merge:
        g = global_key.shape[2]
        kg = torch.cat([kg, global_key.unsqueeze(2).expand(b, h, nb, g, d)], dim=3)
        vg = torch.cat([vg, global_value.unsqueeze(2).expand(b, h, nb, g, d)], dim=3)
        kb += g
    args = (qg.reshape(b, h * nb, qb, d), kg.reshape(b, h * nb, kb, d), vg.reshape(b, h * nb, kb, d))
    if merge:
        out, lse = _attention_with_lse(*args)
        out, lse = out.view(b, h, nb, qb, d), lse.view(b, h, nb, qb)
    else:
        out = F.scaled_dot_product_attention(*args).view(b, h, nb, qb, d)
    if back is None:
        out = out.reshape(b, h, n, d)
        lse = lse.reshape(b, h, n) if merge else None
    else:
        pos = back.to(query.device)
        out = out.reshape(b, h, nb * qb, d)[:, :, pos]
        lse = lse.reshape(b, h, nb * qb)[:, :, pos] if merge else None
    if not merge:
        return out
    # the global keys once for all queries, merged by log-sum-exp: the same softmax over window +
    # global keys as the concatenation above, without a copy of the global keys per block
    out_g, lse_g = _attention_with_lse(query, global_key, global_value)
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    lse, lse_g = lse.to(work), lse_g.to(work)
    top = torch.maximum(lse, lse_g)
    wa, wg = (lse - top).exp().unsqueeze(-1), (lse_g - top).exp().unsqueeze(-1)
    return ((out.to(work) * wa + out_g.to(work) * wg) / (wa + wg)).to(query.dtype)


def _lse_merge_applies(query: torch.Tensor) -> bool:
    """Whether torch's CPU flash attention (which also returns the log-sum-exp) takes ``query``."""
    return query.device.type == "cpu" and query.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.scaled_dot_product_attention(q, k, v)`` and the log-sum-exp of each query's scores."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q.contiguous(), k.contiguous(), v.contiguous())
