"""Evaluation helpers: the bundled text corpus and perplexity with the bundled model's protocol.

The corpus is CPython's ``pydoc_data.topics`` (ships with every Python). The held-out split is
every 4th topic, keys sorted (``i % 4 == 3``), joined with blank lines — the text the bundled
tiny-llama-pydoc model never saw; the other topics are the calibration split.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["heldout_text", "calibration_text", "perplexity", "default_model_path", "DEFAULT_MODEL_ENV"]

DEFAULT_MODEL_ENV = "PIECEWISE_QUANT_DEFAULT_MODEL"
_MODEL_DIRNAME = "tiny-llama-pydoc"


def _topics() -> list[tuple[str, str]]:
    import pydoc_data.topics as topics

    return sorted(topics.topics.items())


def heldout_text() -> str:
    """Every 4th ``pydoc_data.topics`` entry (keys sorted), joined with blank lines."""
    return "\n\n".join(v for i, (_, v) in enumerate(_topics()) if i % 4 == 3)


def calibration_text() -> str:
    """The other three quarters of ``pydoc_data.topics`` (never the held-out text)."""
    return "\n\n".join(v for i, (_, v) in enumerate(_topics()) if i % 4 != 3)


def default_model_path() -> Path:
    """The bundled tiny-llama-pydoc model: ``$PIECEWISE_QUANT_DEFAULT_MODEL``, else
    ``assets/tiny-llama-pydoc`` in the current directory or in the source checkout."""
    candidates = []
    if os.environ.get(DEFAULT_MODEL_ENV):
        candidates.append(Path(os.environ[DEFAULT_MODEL_ENV]))
    candidates.append(Path.cwd() / "assets" / _MODEL_DIRNAME)
    candidates.append(Path(__file__).resolve().parent.parent / "assets" / _MODEL_DIRNAME)
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise FileNotFoundError(
        "the bundled model assets/tiny-llama-pydoc was not found; run from the repository root or set "
        f"{DEFAULT_MODEL_ENV}=/path/to/a/model/dir"
    )


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any = None,
    text: str | None = None,
    input_ids: torch.Tensor | None = None,
    window: int = 256,
    batch_size: int = 16,
    progress: bool = False,
) -> float:
    """Perplexity over non-overlapping ``window``-token windows (a trailing partial window is
    dropped): each window's loss is averaged over its ``window - 1`` predicted tokens, and the
    exponent of the mean over windows is returned. Defaults to the held-out text."""
    if input_ids is None:
        if tokenizer is None:
            raise ValueError("perplexity needs a tokenizer or input_ids")
        text = heldout_text() if text is None else text
        input_ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = input_ids.reshape(-1)
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {window}")
    windows = ids[: n * window].reshape(n, window)
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    losses = []
    for i in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).reshape(batch.shape[0], -1)
        losses.append(loss.mean(dim=1))
    mean = float(torch.cat(losses).mean())
    if not math.isfinite(mean):
        raise FloatingPointError("the model produced non-finite logits; the quantized model is broken")
    return math.exp(mean)
