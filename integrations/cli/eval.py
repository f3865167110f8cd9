"""``piecewise-quant eval``: perplexity of a float or quantized checkpoint on a text file or the
bundled held-out text; with ``--grid``, the W x A x KV evaluation grid of a float checkpoint
(:mod:`piecewise_quant.integrations.transformers.kv_grid`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import grid
from .common import (
    CAUSAL_LM,
    DTYPES,
    MODEL_HELP,
    UserError,
    add_command,
    check_task,
    load,
    model_dir,
    perplexity,
    positive_int,
    text_token_ids,
)

EPILOG = """examples:
  piecewise-quant eval --model out/pw4
  piecewise-quant eval --model assets/tiny-llama-pydoc --text notes.txt --seq-len 128 --max-windows 20
  piecewise-quant eval --grid --plot grid.png --markdown grid.md
  piecewise-quant eval --grid float,W4,KV4,KIVI2,W4A8KV4 --max-windows 16

Perplexity over non-overlapping windows of --seq-len tokens (a trailing partial window is dropped).

--grid [SETTINGS] quantizes the float --model in turn by weights, activations and KV cache
(QLLM-Eval's axes) and prints one row per setting: perplexity, the repetition of greedy
generations (rep-4, rep-line), KV bytes per token and weight bytes (both measured), then the
perplexity of every W/A x KV combination. SETTINGS is a comma list of float, W<bits>[A<bits>]
and KV<bits> (QLLM-Eval fake quantization: per token, no residual window), KVfp8 or KIVI<bits>
(the real cache: keys per channel, G32, R128), e.g. W4A8KV4; the default is
float,W8,W4,W3,W8A8,W4A8,KV8,KV4,KIVI2,W8KV4,W4A8KV4."""


def add_parser(sub) -> None:
    e = add_command(sub, "eval", "perplexity of a float or quantized model on a text file or the bundled text",
                    "Perplexity of a float or quantized checkpoint.", EPILOG)
    e.add_argument("--model", help=MODEL_HELP)
    e.add_argument("--tokenizer", metavar="DIR", help="take the tokenizer from DIR (default: --model)")
    e.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load the model in (default float32)")
    e.add_argument("--text", metavar="FILE", help="UTF-8 text file (default: the bundled held-out pydoc text)")
    e.add_argument("--seq-len", type=positive_int, default=256, help="tokens per window (default 256)")
    e.add_argument("--max-windows", type=positive_int, default=None, help="evaluate at most this many windows")
    g = e.add_argument_group("W x A x KV grid (--grid)")
    g.add_argument("--grid", nargs="?", const=grid.DEFAULT, default=None, metavar="SETTINGS",
                   help="run the evaluation grid on the float --model (default settings: %(const)s)")
    g.add_argument("--weight-grid", choices=("piecewise", "uniform"), default="piecewise",
                   help="weight grid of the W settings (default piecewise)")
    g.add_argument("--prompts", type=positive_int, default=8, help="greedy generations per setting (default 8)")
    g.add_argument("--new-tokens", type=positive_int, default=96, help="tokens per generation (default 96)")
    g.add_argument("--kv-context", type=positive_int, default=1024,
                   help="prefill length for the KV bytes column (default 1024, capped by the text and the model's positions)")
    g.add_argument("--markdown", metavar="OUT.md", help="also write the tables to this file")
    g.add_argument("--json", metavar="OUT.json", help="also write every number to this file")
    g.add_argument("--plot", metavar="OUT.png", help="write a heat map of the perplexity increase, W/A x KV")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``piecewise-quant eval``."""
    import piecewise_quant as pq

    model_path = model_dir(args.model)
    check_task(model_path, CAUSAL_LM)
    if args.grid is None:
        stray = [o for o in ("markdown", "json", "plot") if getattr(args, o)]
        if stray:
            raise UserError(f"--{stray[0]} belongs to --grid; add --grid (or drop --{stray[0]})")
    else:
        warn_positions(model_path, args.seq_len)
        return grid.run(args, model_path)
    _, ids = text_token_ids(args, model_path)
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
