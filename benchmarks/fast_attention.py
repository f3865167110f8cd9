"""Speed of DiTFastAttn's pieces on CPU: the block-local window kernel against dense SDPA, and a
random-weight PixArt-Sigma-shaped transformer forward under each attention method.

Speed does not depend on the weights' values, so the models are random (no download). Shapes:
PixArt-Sigma / DiT-XL width 1152 = 16 heads x 72, batch 2 (classifier-free guidance), 1,024 /
2,304 / 4,096 image tokens (latents 64x64 / 96x96 / 128x128, 2x2 patches).

* ``kernel``: one attention call, dense ``F.scaled_dot_product_attention`` vs
  ``window_attention`` with a 1-D window of N/8 tokens on each side (DiTFastAttn's PixArt
  setting: 512 at 4,096 tokens) and with a 2-D neighbourhood (tiles of side/4 patches, side/8
  patches around them). Reports time, the fraction of keys each query's block reads, and the
  speed-up.
* ``forward``: a PixArt-Sigma-shaped ``PixArtTransformer2DModel`` with ``--layers`` of the 28
  blocks (the blocks are identical, so the per-block ratio is the model's), 120 text tokens,
  under each method applied to every layer: full (plain diffusers processors), full with the
  window residual computed (what a full step before window steps costs), WA-RS, WA-RS+ASC,
  full+ASC and AST. Reports the forward time and the speed-up over plain full attention.

Usage::

    python benchmarks/fast_attention.py                 # both parts (~6 min on 2 shared cores)
    python benchmarks/fast_attention.py kernel --tokens 1024,4096
    python benchmarks/fast_attention.py --quick         # seconds: tiny shapes (the test runs it)

Writes ``docs/fast_attention.json`` (``--out``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent

HEADS, HEAD_DIM = 16, 72


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (index tables, allocator)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_kernel(tokens: list[int], repeats: int, heads: int = HEADS, head_dim: int = HEAD_DIM) -> list[dict]:
    from piecewise_quant.integrations.diffusers.window_attention import WindowSpec, keys_per_query, window_attention

    rows = []
    for n in tokens:
        side = math.isqrt(n)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, heads, n, head_dim, generator=g) for _ in range(3))
        with torch.no_grad():
            dense = _time(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
            rows.append(dict(tokens=n, kind="dense SDPA", window="-", keys_fraction=1.0, seconds=dense, speedup=1.0))
            specs = [("1-D", WindowSpec(max(1, n // 8)))]
            if side * side == n:
                specs.append(("2-D", WindowSpec(max(1, side // 8), "2d", block=max(1, side // 4))))
            for label, spec in specs:
                s = _time(lambda: window_attention(q, k, v, spec), repeats)
                desc = (f"{spec.window} tokens, blocks of {spec.query_block}" if spec.shape == "1d"
                        else f"{spec.window} patches around {spec.query_block}x{spec.query_block} tiles")
                rows.append(dict(
                    tokens=n, kind=f"window {label}", window=desc, keys_fraction=keys_per_query(n, spec) / n,
                    seconds=s, speedup=dense / s,
                ))
    return rows


def _pixart(layers: int, width_heads: int, head_dim: int, sample: int, caption: int):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=width_heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
        sample_size=sample, patch_size=2, cross_attention_dim=width_heads * head_dim, caption_channels=caption,
        norm_type="ada_norm_single", use_additional_conditions=False, interpolation_scale=max(1, sample // 64),
    ).eval()


METHOD_ROWS = [
    ("full (diffusers processors, no fast attention)", None),
    ("full, also caching the window residual", "full"),
    ("WA-RS (window + cached residual)", "wars"),
    ("full + ASC (one CFG branch)", "full+asc"),
    ("WA-RS + ASC", "wars+asc"),
    ("AST (reuse previous step's output)", "ast"),
]


def bench_forward(tokens: list[int], layers: int, repeats: int, heads: int = HEADS, head_dim: int = HEAD_DIM,
                  text_tokens: int = 120, caption: int = 4096) -> list[dict]:
    """Forward time under each method; the plan is driven by hand (state.step), as a pipeline would."""
    from piecewise_quant.integrations.diffusers.fast_attention import (
        FastAttentionPlan,
        FastAttnProcessor,
        FastAttnState,
        self_attention_layers,
    )
    from piecewise_quant.integrations.diffusers.window_attention import WindowSpec

    rows = []
    for n in tokens:
        side = math.isqrt(n)
        model = _pixart(layers, heads, head_dim, side * 2, caption)
        g = torch.Generator().manual_seed(1)
        x1 = torch.randn(1, 4, side * 2, side * 2, generator=g)
        x = torch.cat([x1, x1])
        emb = torch.cat([torch.zeros(1, text_tokens, caption), torch.randn(1, text_tokens, caption, generator=g)])
        kwargs = dict(encoder_hidden_states=emb, timestep=torch.tensor([500, 500]),
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
        attn = self_attention_layers(model)
        names = [a for a, _ in attn]
        spec = WindowSpec(max(1, n // 8))
        # steps: 0 full (+residual), 1 wars, 2 wars+asc, 3 full+asc, 4 ast ; the full-without-residual row uses
        # the original processors
        order = ["full", "wars", "wars+asc", "full+asc", "ast"]
        plan = FastAttentionPlan([[m] * len(names) for m in order], names, spec)
        state = FastAttnState(names, spec)
        state.plan = plan
        originals = {a: m.processor for a, m in attn}
        for i, (_, m) in enumerate(attn):
            m.processor = FastAttnProcessor(originals[names[i]], i, state)
        state.begin(len(order))
        state.cfg, state.cfg_how = "uncond_first", "zero embeddings in the first half"
        state.grid = (side, side)
        # interleaved rounds (base, then the five steps in order, each once per round) so that load from
        # other jobs on a shared machine falls on every method alike; the steps' caches stay valid
        # because each round replays the same step order
        samples: dict[str, list[float]] = {"base": [], **{m: [] for m in order}}
        with torch.no_grad():
            for rnd in range(repeats + 1):
                for key in ["base"] + order:
                    state.step = None if key == "base" else order.index(key)
                    t0 = time.perf_counter()
                    model(x, **kwargs)
                    if rnd:  # round 0 warms up and fills the caches
                        samples[key].append(time.perf_counter() - t0)
        state.end()
        for a, m in attn:
            m.processor = originals[a]
        base = statistics.median(samples["base"])
        times = {m: statistics.median(samples[m]) for m in order}
        rows.append(dict(tokens=n, layers=layers, method=METHOD_ROWS[0][0], seconds=base, speedup=1.0))
        for label, method in METHOD_ROWS[1:]:
            rows.append(dict(tokens=n, layers=layers, method=label, seconds=times[method], speedup=base / times[method]))
        del model
    return rows


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(c[1] for c in cols) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(format(r[c[0]], c[2]) if c[2] else str(r[c[0]]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", nargs="?", choices=["all", "kernel", "forward"], default="all")
    ap.add_argument("--tokens", default="1024,2304,4096", help="image tokens (square grids)")
    ap.add_argument("--forward-tokens", default="1024,4096")
    ap.add_argument("--layers", type=int, default=2, help="PixArt-Sigma blocks in the forward benchmark (of 28)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (seconds)")
    ap.add_argument("--out", default=str(REPO / "docs" / "fast_attention.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = {}
    if args.quick:
        args.tokens, args.forward_tokens, args.layers, args.repeats = "256,1024", "256", 1, 1
        kw = dict(heads=2, head_dim=32)
    previous = {}
    if args.part != "all" and args.out and Path(args.out).is_file():
        previous = json.loads(Path(args.out).read_text())  # keep the other part's results
    result = {
        **previous,
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": args.threads, "repeats": args.repeats, "quick": args.quick,
    }
    result[f"command_{args.part}"] = "python benchmarks/fast_attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.part in ("all", "kernel"):
        rows = bench_kernel([int(t) for t in args.tokens.split(",")], args.repeats, **kw)
        result["kernel"] = rows
        print("## attention kernel (batch 2, %d heads x %d)\n" % (kw.get("heads", HEADS), kw.get("head_dim", HEAD_DIM)))
        print(_table(rows, [("tokens", "tokens", ""), ("kind", "kernel", ""), ("window", "window", ""),
                            ("keys_fraction", "keys read", ".3f"), ("seconds", "seconds", ".4f"),
                            ("speedup", "vs dense", ".2f")]))
        print()
    if args.part in ("all", "forward"):
        fkw = dict(kw, caption=64, text_tokens=8) if args.quick else {}
        rows = bench_forward([int(t) for t in args.forward_tokens.split(",")], args.layers, args.repeats, **fkw)
        result["forward"] = rows
        print(f"## PixArt-Sigma-shaped transformer forward ({args.layers} blocks, batch 2)\n")
        print(_table(rows, [("tokens", "tokens", ""), ("method", "every layer", ""), ("seconds", "seconds", ".3f"),
                            ("speedup", "vs full", ".2f")]))
        print()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
