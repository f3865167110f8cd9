"""Calibration data: turn what the user passes into a fixed list of model-input batches.

Accepted forms:

* ``None``: samples cut from the bundled corpus (``pydoc_data.topics``, the calibration split of
  :func:`piecewise_quant.evaluate.calibration_text`), tokenised with the model's tokenizer;
* a string or a list of strings: tokenised (no special tokens), concatenated with blank lines,
  cut into non-overlapping ``seq_len``-token windows of which ``n_samples`` are drawn with ``seed``;
* a tensor of token ids: 1-D (a token stream, cut into windows like text) or 2-D ``(n, length)``
  (each row one sample, used as given);
* an iterable of dicts of model inputs (``{"input_ids": ..., "attention_mask": ...}``), each one
  batch, used as given.

Too little text raises a ``ValueError`` saying how many tokens there are; fewer windows than
``n_samples`` uses every window there is and logs a warning (the documented fallback).

:func:`held_aside_batches` gives samples of the same data that calibration does not use (the next
windows of the same draw, or the next rows of a 2-D tensor), for scoring a calibrated model on
text its fit did not see (rotation trials).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Iterable, Mapping

import torch

__all__ = ["prepare_batches", "held_aside_batches", "check_batches", "resolve_tokenizer"]

logger = logging.getLogger(__name__)


def resolve_tokenizer(model: Any, tokenizer: Any) -> Any:
    """``tokenizer``; text needs one (the core never imports a host framework to find it:
    ``from_pretrained(..., quantization_config=...)`` passes the tokenizer saved with the model)."""
    if tokenizer is not None:
        return tokenizer
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    hint = f" (e.g. AutoTokenizer.from_pretrained({str(path)!r}))" if path else ""
    raise ValueError(f"calibration text needs a tokenizer: pass tokenizer=...{hint}, or give token ids / model-input dicts")


def _windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int, skip: int = 0) -> torch.Tensor:
    ids = ids.reshape(-1).to(torch.long)
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise ValueError(
            f"calibration data has {ids.numel()} tokens, fewer than one sample of seq_len={seq_len}; "
            "give more text or lower calibration.seq_len"
        )
    if n_windows < n_samples and not skip:
        logger.warning(
            "calibration data has %d tokens: only %d windows of %d tokens instead of n_samples=%d; using all of them",
            ids.numel(), n_windows, seq_len, n_samples,
        )
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=g)[skip: skip + n_samples]
    return windows[pick if skip else pick.sort().values]  # held aside: in draw order, so fewer are a prefix


def _is_texts(data: Any) -> bool:
    """A non-empty list or tuple of strings (tokenised, joined and cut into windows)."""
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(t, str) for t in data)


def _check_ids(ids: torch.Tensor) -> None:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"calibration token ids must be an integer tensor, got {ids.dtype}")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("calibration token ids contain negative values")


def _vocab_size(model: Any) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        return None
    try:
        emb = get()
    except Exception:  # models without token embeddings raise NotImplementedError and the like
        return None
    n = getattr(emb, "num_embeddings", None)
    return int(n) if isinstance(n, int) else None


def _forward_inputs(model: Any) -> tuple[set[str], bool] | None:
    """The named inputs of ``model.forward`` and whether it also takes ``**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return None
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def _as_tensor(i: int, key: str, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        try:
            return torch.tensor(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"calibration batch {i}: input {key!r} is a {type(value).__name__} that is not a rectangular array of "
                f"numbers ({exc}); give a tensor (pad the sequences and pass an attention_mask)"
            ) from None
    return value


def check_batches(batches: list[dict[str, Any]], model: Any) -> list[dict[str, Any]]:
    """Check calibration batches against ``model`` before any work: input names its ``forward``
    accepts, token ids inside its vocabulary; lists of numbers become tensors."""
    vocab = _vocab_size(model)
    inputs = _forward_inputs(model)
    out = []
    for i, batch in enumerate(batches):
        batch = {k: _as_tensor(i, k, v) for k, v in batch.items()}
        if inputs is not None:
            named, var_kw = inputs
            unknown = sorted(set(batch) - named)
            if unknown and (not var_kw or not set(batch) & named):
                shown = ", ".join(sorted(n for n in named if n in {"input_ids", "attention_mask", "inputs_embeds",
                                                                   "pixel_values", "token_type_ids", "position_ids",
                                                                   "hidden_states", "timestep"})) or ", ".join(sorted(named)[:8])
                raise ValueError(
                    f"calibration batch {i} has input(s) {unknown} that {type(model).__name__}.forward does not take "
                    f"(it takes e.g. {shown}); rename the keys"
                )
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            _check_ids(ids)
            if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
                raise ValueError(
                    f"calibration batch {i} holds token id {int(ids.max())}, but the model's vocabulary has {vocab} "
                    f"entries (ids 0..{vocab - 1}): the data was tokenized with another model's tokenizer; tokenize "
                    "it with this model's own tokenizer"
                )
        out.append(batch)
    return out


def prepare_batches(
    data: Any,
    *,
    model: Any = None,
    tokenizer: Any = None,
    n_samples: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """A list of model-input dicts (batches of at most ``batch_size`` samples), checked against
    ``model`` when given (:func:`check_batches`)."""
    batches = _prepare(data, model=model, tokenizer=tokenizer, n_samples=n_samples, seq_len=seq_len,
                       batch_size=batch_size, seed=seed)
    return check_batches(batches, model) if model is not None else batches


def held_aside_batches(
    data: Any,
    *,
    model: Any = None,
    tokenizer: Any = None,
    n_samples: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    n_aside: int | None = None,
) -> list[dict[str, torch.Tensor]] | None:
    """Up to ``n_aside`` (default ``n_samples``) samples of ``data`` that :func:`prepare_batches`
    with the same arguments does not use: for text and 1-D token ids the next windows of the same
    seeded draw (never overlapping a calibration window; in draw order, so a smaller ``n_aside``
    gives a prefix of a larger one), for a 2-D id tensor the rows after the first ``n_samples``.
    ``None`` when there are none: ``data`` is model-input dicts (used as given, nothing to hold
    aside) or has no window or row beyond the calibration ones."""
    if not (data is None or isinstance(data, (str, torch.Tensor)) or _is_texts(data)):
        return None
    batches = _prepare(data, model=model, tokenizer=tokenizer, n_samples=n_aside or n_samples, seq_len=seq_len,
                       batch_size=batch_size, seed=seed, skip=n_samples)
    if not batches:
        return None
    return check_batches(batches, model) if model is not None else batches


def _prepare(data: Any, *, model: Any, tokenizer: Any, n_samples: int, seq_len: int, batch_size: int,
             seed: int, skip: int = 0) -> list[dict[str, Any]]:
    if data is None:
        from ..evaluate import calibration_text

        data = calibration_text()
    if isinstance(data, str):
        data = [data]
    if isinstance(data, torch.Tensor):
        _check_ids(data)
        if data.dim() == 2:
            if data.shape[0] == 0 or data.shape[1] == 0:
                raise ValueError("calibration data is empty (a tensor with no samples or no tokens)")
            samples = data[skip: skip + n_samples].to(torch.long)
        elif data.dim() == 1:
            samples = _windows(data, n_samples, seq_len, seed, skip)
        else:
            raise ValueError(f"calibration token ids must be 1-D or 2-D, got shape {tuple(data.shape)}")
        return [{"input_ids": b} for b in samples.split(batch_size) if b.shape[0]]
    if _is_texts(data):
        tok = resolve_tokenizer(model, tokenizer)
        text = "\n\n".join(t for t in data if t)
        if not text.strip():
            raise ValueError("calibration data is empty (only empty strings)")
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        samples = _windows(ids, n_samples, seq_len, seed, skip)
        return [{"input_ids": b} for b in samples.split(batch_size) if b.shape[0]]
    if isinstance(data, Mapping):
        data = [data]
    if isinstance(data, Iterable) and not isinstance(data, (bytes, str)):
        batches = []
        for i, item in enumerate(data):
            if isinstance(item, (list, tuple)) and item and all(isinstance(t, int) for t in item):
                item = torch.tensor(item, dtype=torch.long)  # one sequence of token ids
            if isinstance(item, torch.Tensor):
                _check_ids(item)
                item = {"input_ids": item if item.dim() == 2 else item.reshape(1, -1)}
            if isinstance(item, Mapping) and not isinstance(item, dict):
                item = dict(item)  # e.g. a tokenizer's BatchEncoding
            if not isinstance(item, dict) or not item:
                raise ValueError(
                    f"calibration batch {i} is a {type(item).__name__}; give strings, token-id tensors or "
                    "dicts of model inputs"
                )
            for k, v in item.items():
                if isinstance(v, torch.Tensor) and v.dtype.is_floating_point and not bool(torch.isfinite(v).all()):
                    raise ValueError(f"calibration batch {i}: input {k!r} contains NaN or Inf")
            batches.append(item)
        if not batches:
            raise ValueError(
                "calibration data is empty; give text, token ids or model-input dicts (None uses the bundled corpus)"
            )
        return batches
    raise ValueError(f"unsupported calibration data of type {type(data).__name__}; give text, token ids or model-input dicts")
