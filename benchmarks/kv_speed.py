"""Decode speed with a quantized KV cache on CPU: ``generate()`` tokens/s against the full-precision cache.

For each model and context, greedy ``generate()`` of ``--new-tokens`` tokens after a prompt of
``ctx`` tokens (random ids; speed does not depend on the values), batch ``--batch``, timed from
the call to its return and converted to decode tokens/s with the prefill removed
(``B * (N - 1) / (t_N - t_1)``: each variant runs with N and with 1 new token). Variants:

* ``float cache``: transformers' ``DynamicCache`` (the anchor);
* ``<scheme>``: :class:`~piecewise_quant.integrations.transformers.QuantizedKVCache`, decode steps
  computed from the codes (the fused C kernel, the default);
* ``<scheme>, dense``: the same cache with ``PIECEWISE_QUANT_KV_FUSED=0``: the history is
  dequantized every step and handed to SDPA (the path before the kernel existed).

The variants run interleaved, ``--repeats`` rounds, median per variant, so that load from other
processes on a shared machine falls on all alike. Models: ``bundled`` (``assets/tiny-llama-pydoc``,
6 layers, 4 heads of 64, float32) and ``mid`` (random weights, Llama shapes: hidden 1024, 8 layers,
16 query and 4 KV heads of 64, vocab 32000, float32 or ``--dtype``).

Usage (repository root)::

    python benchmarks/kv_speed.py                                  # both models, ctx 1024 and 2048 (~6 min on 2 cores)
    python benchmarks/kv_speed.py --models bundled --contexts 1024 --repeats 3
    python benchmarks/kv_speed.py --markdown docs/results/kv_speed.md --json docs/results/kv_speed.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from piecewise_quant.args import KVArgs
from piecewise_quant.evaluate import default_model_path

SCHEMES = {
    "KIVI-4 G32 R128": KVArgs(bits=4, key_axis="channel", group_size=32, residual_length=128),
    "KIVI-2 G32 R128": KVArgs(bits=2, key_axis="channel", group_size=32, residual_length=128),
    "int4 per-token G64 R0": KVArgs(bits=4, key_axis="token", group_size=64, residual_length=0),
    "int8 per-token G64 R0": KVArgs(bits=8, key_axis="token", group_size=64, residual_length=0),
    # the piecewise grid: no fused kernel reads it, so it has one (dense) variant
    "KIVI-4 piecewise G32 R128": KVArgs(bits=4, key_axis="channel", group_size=32, residual_length=128, grid="piecewise"),
    "int4 piecewise per-token G64 R0": KVArgs(bits=4, key_axis="token", group_size=64, residual_length=0, grid="piecewise"),
}


def load_model(name: str, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "bundled":
        return AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=dtype).eval()
    if name == "mid":
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=8192)
        return LlamaForCausalLM(cfg).to(dtype).eval()
    raise ValueError(f"unknown model {name!r}; use bundled or mid")


def _cache(model: Any, kv: KVArgs | None) -> Any:
    from transformers import DynamicCache

    from piecewise_quant.integrations.transformers import QuantizedKVCache

    return DynamicCache(config=model.config) if kv is None else QuantizedKVCache(kv, model.config)


@torch.no_grad()
def _generate_s(model: Any, prompt: torch.Tensor, kv: KVArgs | None, fused: bool, new: int) -> float:
    os.environ["PIECEWISE_QUANT_KV_FUSED"] = "1" if fused else "0"
    t = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, pad_token_id=0, past_key_values=_cache(model, kv))
    return time.perf_counter() - t


def measure(model: Any, ctx: int, batch: int, new: int, repeats: int, schemes: list[str]) -> dict[str, float]:
    """Decode tokens/s per variant (median of interleaved rounds, prefill removed)."""
    g = torch.Generator().manual_seed(ctx)
    prompt = torch.randint(3, model.config.vocab_size, (batch, ctx), generator=g)
    variants: list[tuple[str, KVArgs | None, bool]] = [("float cache", None, False)]
    for name in schemes:
        kv = SCHEMES[name]
        variants += [(name, kv, True)] if kv.grid == "piecewise" else [(name, kv, True), (f"{name}, dense", kv, False)]
    _generate_s(model, prompt[:, :64], None, False, 2)  # warm-up
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    for _ in range(repeats):
        for name, kv, fused in variants:
            t_n = _generate_s(model, prompt, kv, fused, new)
            t_1 = _generate_s(model, prompt, kv, fused, 1)
            times[name].append(t_n - t_1)
    os.environ.pop("PIECEWISE_QUANT_KV_FUSED", None)
    return {k: batch * (new - 1) / statistics.median(v) for k, v in times.items()}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [f"Command: `{meta['command']}`; {meta['date']}; {meta['processor']}; torch {meta['torch']}, "
           f"{meta['threads']} torch thread(s); {meta['repeats']} interleaved rounds, median; "
           f"{meta['new_tokens']} new tokens, batch {meta['batch']}.", "",
           "| model | context | variant | decode tok/s | x float cache |", "|---|---:|---|---:|---:|"]
    for r in rows:
        for name, tps in r["tokens_per_s"].items():
            out.append(f"| {r['model']} | {r['ctx']} | {name} | {tps:.1f} | {tps / r['tokens_per_s']['float cache']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="bundled,mid")
    p.add_argument("--contexts", default="1024,2048")
    p.add_argument("--schemes", default="KIVI-4 G32 R128,int4 per-token G64 R0",
                   help=f"comma-separated, from: {', '.join(SCHEMES)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        p.error(f"unknown schemes {unknown}; choose from {list(SCHEMES)}")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the prefill is removed by timing 1 and N tokens)")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    for name in args.models.split(","):
        model = load_model(name.strip(), dtype)
        for ctx in (int(c) for c in args.contexts.split(",")):
            tps = measure(model, ctx, args.batch, args.new_tokens, args.repeats, schemes)
            rows.append(dict(model=name.strip(), ctx=ctx, tokens_per_s=tps))
            print(f"[kv_speed] {name} ctx {ctx}: " + ", ".join(f"{k} {v:.1f}" for k, v in tps.items()), file=sys.stderr)
        del model
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=platform.platform(),
                processor=platform.processor() or platform.machine(), torch=torch.__version__, threads=args.threads,
                repeats=args.repeats, new_tokens=args.new_tokens, batch=args.batch, dtype=args.dtype,
                command="python benchmarks/kv_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    text = markdown(rows, meta)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
