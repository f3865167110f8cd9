"""``piecewise-quant eval``: perplexity of a float or quantized checkpoint on a text file or the
bundled held-out text."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (
    CAUSAL_LM,
    DTYPES,
    MODEL_HELP,
    add_command,
    check_task,
    load,
    model_dir,
    perplexity,
    positive_int,
    read_text,
    token_ids,
    tokenizer,
)

EPILOG = """examples:
  piecewise-quant eval --model out/pw4
  piecewise-quant eval --model assets/tiny-llama-pydoc --text notes.txt --seq-len 128 --max-windows 20

Perplexity over non-overlapping windows of --seq-len tokens (a trailing partial window is dropped)."""


def add_parser(sub) -> None:
    e = add_command(sub, "eval", "perplexity of a float or quantized model on a text file or the bundled text",
                    "Perplexity of a float or quantized checkpoint.", EPILOG)
    e.add_argument("--model", help=MODEL_HELP)
    e.add_argument("--tokenizer", metavar="DIR", help="take the tokenizer from DIR (default: --model)")
    e.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load the model in (default float32)")
    e.add_argument("--text", metavar="FILE", help="UTF-8 text file (default: the bundled held-out pydoc text)")
    e.add_argument("--seq-len", type=positive_int, default=256, help="tokens per window (default 256)")
    e.add_argument("--max-windows", type=positive_int, default=None, help="evaluate at most this many windows")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``piecewise-quant eval``."""
    import piecewise_quant as pq
    from piecewise_quant.evaluate import heldout_text

    model_path = model_dir(args.model)
    check_task(model_path, CAUSAL_LM)
    text = read_text(args.text, "--text") if args.text else heldout_text()
    tok_path = model_dir(args.tokenizer, "--tokenizer") if args.tokenizer else model_path
    tok = tokenizer(tok_path, "--tokenizer" if args.tokenizer else None)
    ids = token_ids(tok, text)
    warn_positions(model_path, args.seq_len)
    model = load(model_path, dtype=args.dtype)
    layers = pq.quantized_layers(model)
    kind = "float" if not layers else f"quantized, {pq.model_size_report(model).bits_per_weight:.3f} bits/weight"
    ppl, n = perplexity(model, ids, args.seq_len, args.max_windows, progress=True)
    source = args.text or "bundled held-out text (pydoc_data.topics, every 4th topic)"
    print(f"model       {model_path} ({kind})")
    print(f"text        {source}: {ids.numel():,} tokens, {n} windows of {args.seq_len}")
    print(f"perplexity  {ppl:.3f}")
    return 0


def warn_positions(path: Path, seq_len: int) -> None:
    """A warning on stderr when ``--seq-len`` exceeds the positions the model was trained on."""
    import json

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return
    limit = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    if isinstance(limit, int) and seq_len > limit:
        print(f"warning: --seq-len {seq_len} is longer than the model's {limit} positions "
              f"(max_position_embeddings); perplexity past them measures extrapolation, not the model",
              file=sys.stderr)
