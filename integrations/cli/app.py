"""The ``piecewise-quant`` parser and entry point: one subcommand per module of this package, in
the order ``--help`` lists them."""

from __future__ import annotations

import argparse
import os
import sys

from . import bench, demo, eval, export, inspect, quantize, serve
from .common import run_command

COMMANDS = (quantize, eval, inspect, bench, export, demo, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="piecewise-quant",
        description="piecewise-quant: post-training quantization of Hugging Face causal LMs.",
        epilog="run `piecewise-quant COMMAND --help` for a command's options and examples (docs/cli.md)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # everything after "serve" belongs to vLLM, --help included
        return run_command(serve.run, argparse.Namespace(vllm_args=argv[1:]))
    args = build_parser().parse_args(argv)
    # transformers' per-tensor "Loading weights" bars would bury the tables; set the variable to 0 to keep them
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return run_command(args.func, args)
