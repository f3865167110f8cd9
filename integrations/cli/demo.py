"""``piecewise-quant demo``, the README's main job: quantize the bundled model on load with
transformers (uniform and piecewise, 4 and 3 bits), save it, reload it with plain
``from_pretrained``, and print what each configuration costs and keeps."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .common import DEMO_DECODE_TOKENS, decode_tokens_per_second, dir_bytes

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
    decode_tps: float | None = None


def run_demo(model_path: Path, output_dir: Path, group_size: int = 128, configs=None, progress: bool = True) -> list[DemoRow]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import piecewise_quant as pq
    from piecewise_quant.evaluate import heldout_text, perplexity

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = torch.tensor(tokenizer(heldout_text(), add_special_tokens=False)["input_ids"])
    float_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prompt = ids[:16].unsqueeze(0)
    rows = [DemoRow("float32", 32.0, dir_bytes(Path(model_path)), perplexity(float_model, input_ids=ids), None, None,
                    decode_tokens_per_second(float_model, prompt))]
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
        rows.append(DemoRow(name, report.bits_per_weight, dir_bytes(target), perplexity(reloaded, input_ids=ids), seconds, exact,
                            decode_tokens_per_second(reloaded, prompt)))
        del model, reloaded
    return rows


def format_table(rows: list[DemoRow]) -> str:
    base = rows[0].perplexity
    base_tps = rows[0].decode_tps
    lines = [
        "| model | bits/weight (quantized layers) | bytes on disk | held-out perplexity | vs float | quantize time "
        "| reload exact | decode tokens/s | vs float |",
        "|---|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in rows:
        delta = "" if r is rows[0] else f"{r.perplexity - base:+.3f}"
        qt = "" if r.quantize_seconds is None else f"{r.quantize_seconds:.1f} s"
        exact = "" if r.reload_exact is None else ("yes" if r.reload_exact else "NO")
        tps = "" if r.decode_tps is None else f"{r.decode_tps:.0f}"
        speed = "" if r.decode_tps is None or not base_tps else f"{r.decode_tps / base_tps:.2f}x"
        lines.append(
            f"| {r.name} | {r.bits_per_weight:.3f} | {r.disk_bytes:,} | {r.perplexity:.3f} | {delta} | {qt} | {exact} "
            f"| {tps} | {speed} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``piecewise-quant demo``."""
    from piecewise_quant.evaluate import default_model_path

    try:
        model_path = Path(args.model) if args.model else default_model_path()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (model_path / "config.json").is_file():
        print(f"error: {model_path} has no config.json (not a Hugging Face model directory)", file=sys.stderr)
        return 2
    import torch

    from piecewise_quant.kernels import cpu_backend

    kernels = cpu_backend.status()
    print(f"piecewise-quant demo: {model_path}, group size {args.group_size}; held-out text: pydoc_data.topics (every 4th topic)")
    isa = kernels["isa"] or f"unavailable ({kernels['reason']})"
    print(f"CPU kernels: {isa}; {torch.get_num_threads()} thread(s); "
          f"decode: greedy, batch 1, {DEMO_DECODE_TOKENS} tokens after a 16-token prompt")
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


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="quantize the bundled model (uniform vs piecewise, 4 and 3 bits), save, reload, compare")
    demo.add_argument("--model", help="a Hugging Face causal-LM directory (default: the bundled tiny-llama-pydoc)")
    demo.add_argument("--group-size", type=int, default=128)
    demo.add_argument("--output-dir", help="keep the quantized checkpoints here (default: a temporary directory)")
    demo.set_defaults(func=run)
