"""``piecewise-quant eval --grid``: the W x A x KV evaluation grid of a float causal LM
(:mod:`piecewise_quant.integrations.transformers.kv_grid` measures; this module checks the inputs
before any work, prepares the text and prints or writes the results)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .common import UserError, load, text_token_ids

DEFAULT = "float,W8,W4,W3,W8A8,W4A8,KV8,KV4,KIVI2,W8KV4,W4A8KV4"
PROMPT_TOKENS = 32


def check_output_file(value: str | None, option: str) -> Path | None:
    """``value`` can be written: not a directory, in an existing writable directory."""
    if value is None:
        return None
    path = Path(value)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"{option} {value}: is a directory; name a file")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UserError(f"{option} {value}: its folder {parent} {what}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{option} {value}: not writable by this user")
    return path


def _config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}/config.json cannot be read as JSON: {exc}") from None


def _windows(args: argparse.Namespace, model_path: Path, positions: int | None):
    """Held-out windows (``(n, --seq-len)``), greedy prompts and the KV-bytes prefill, from the text."""
    tok, ids = text_token_ids(args, model_path)
    n = ids.numel() // args.seq_len
    if n == 0:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one window of --seq-len {args.seq_len}")
    all_windows = ids[: n * args.seq_len].reshape(n, args.seq_len)
    windows = all_windows[: args.max_windows] if args.max_windows else all_windows
    step = max(1, n // args.prompts)
    prompts = all_windows[::step][: args.prompts, :PROMPT_TOKENS]
    ctx = min(args.kv_context, ids.numel(), positions or args.kv_context)
    return tok, windows, prompts, ids[:ctx].reshape(1, -1)


def run(args: argparse.Namespace, model_path: Path) -> int:
    """``piecewise-quant eval --grid``: everything a user named is checked before the model loads."""
    from piecewise_quant.integrations.transformers import kv_grid

    cfg = _config(model_path)
    if cfg.get("quantization_config"):
        raise UserError(f"--grid quantizes the float model itself, and {model_path} is already quantized "
                        f"(quant_method {cfg['quantization_config'].get('quant_method')!r}); pass the float checkpoint")
    paths = {o: check_output_file(getattr(args, o), f"--{o}") for o in ("markdown", "json", "plot")}
    if paths["plot"]:
        from .plotting import check_plot_backend

        check_plot_backend()
    try:  # checked now; parsed again below with the model's head size (the KV<bits> group)
        kv_grid.parse_settings(args.grid, 64, args.weight_grid)
    except ValueError as exc:
        raise UserError(f"--grid: {exc}") from None
    if args.seq_len <= PROMPT_TOKENS:
        raise UserError(f"--grid needs --seq-len above {PROMPT_TOKENS}: its prompts are the first "
                        f"{PROMPT_TOKENS} tokens of windows")
    positions = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    tok, windows, prompts, kv_ids = _windows(args, model_path, positions)
    model = load(model_path, dtype=args.dtype)
    settings = kv_grid.parse_settings(args.grid, kv_grid.head_dim_of(model.config), args.weight_grid)
    try:
        result = kv_grid.run_grid(model, tok, windows, prompts, settings, new_tokens=args.new_tokens, kv_context=kv_ids)
    except ValueError as exc:  # e.g. a model whose attention kv_fake_quant cannot find
        raise UserError(f"--grid on {model_path}: {exc}") from None
    result.meta.update(model=str(model_path), text=args.text or "bundled held-out text", weight_grid=args.weight_grid,
                       settings=args.grid, dtype=args.dtype)
    text = kv_grid.grid_markdown(result)
    print(text, end="")
    if paths["markdown"]:
        paths["markdown"].write_text(text)
    if paths["json"]:
        paths["json"].write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    if paths["plot"]:
        print(f"heat map    {kv_grid.plot_grid(result, paths['plot'])}")
    return 0
