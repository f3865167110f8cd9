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
  ``--model sd3``: an SD3-medium-shaped ``SD3Transformer2DModel`` instead (width 1536 = 24 heads x 64,
  joint attention over the image tokens plus 333 text tokens (77 CLIP + 256 T5), batch 2);
  ``--model flux``: a Flux.1-shaped ``FluxTransformer2DModel`` (width 3072 = 24 heads x 128, 512 text
  tokens, RoPE, ``--layers`` dual-stream and ``--layers`` single-stream blocks, batch 1 as
  guidance-distilled Flux runs, so no ASC rows). For joint attention the window covers the image
  tokens (N/8 on each side) and the text tokens stay global. Each row also gives the attention FLOPs
  saved, from the processors' own counters (negative for the full step that also computes the window).

Usage::

    python benchmarks/fast_attention.py                 # both parts (~6 min on 2 shared cores)
    python benchmarks/fast_attention.py kernel --tokens 1024,4096
    python benchmarks/fast_attention.py --quick         # seconds: tiny shapes (the test runs it)
    python benchmarks/fast_attention.py forward --model sd3 --layers 2 --forward-tokens 1024 --threads 1

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


def _sd3(layers: int, heads: int, head_dim: int, sample: int, text_dim: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=sample, patch_size=2, in_channels=16, out_channels=16, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=text_dim, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2048, pos_embed_max_size=max(192, sample // 2),
    ).eval()


def _flux(layers: int, heads: int, head_dim: int, text_dim: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    rope = (16, 56, 56) if head_dim == 128 else (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=layers, num_single_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=text_dim, pooled_projection_dim=768, axes_dims_rope=rope,
    ).eval()


# (heads, head_dim, text tokens, text width) of the full-size models
MODEL_SHAPES = {"pixart": (16, 72, 120, 4096), "sd3": (24, 64, 333, 4096), "flux": (24, 128, 512, 4096)}


def _model_inputs(name: str, layers: int, heads: int, head_dim: int, n: int, text_tokens: int, text_dim: int):
    """(model, forward kwargs, batch) for ``n`` image tokens; the batch is CFG's [uncond, cond] except Flux's."""
    side = math.isqrt(n)
    g = torch.Generator().manual_seed(1)
    if name == "pixart":
        model = _pixart(layers, heads, head_dim, side * 2, text_dim)
        x1 = torch.randn(1, 4, side * 2, side * 2, generator=g)
        emb = torch.cat([torch.zeros(1, text_tokens, text_dim), torch.randn(1, text_tokens, text_dim, generator=g)])
        return model, dict(hidden_states=torch.cat([x1, x1]), encoder_hidden_states=emb, timestep=torch.tensor([500, 500]),
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False), 2
    if name == "sd3":
        model = _sd3(layers, heads, head_dim, side * 2, text_dim)
        x1 = torch.randn(1, 16, side * 2, side * 2, generator=g)
        emb = torch.cat([torch.zeros(1, text_tokens, text_dim), torch.randn(1, text_tokens, text_dim, generator=g)])
        pooled = torch.cat([torch.zeros(1, 2048), torch.randn(1, 2048, generator=g)])
        return model, dict(hidden_states=torch.cat([x1, x1]), encoder_hidden_states=emb, pooled_projections=pooled,
                           timestep=torch.tensor([500.0, 500.0]), return_dict=False), 2
    model = _flux(layers, heads, head_dim, text_dim)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros(n), rows.reshape(-1).float(), cols.reshape(-1).float()], -1)
    return model, dict(hidden_states=torch.randn(1, n, 64, generator=g), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=torch.randn(1, text_tokens, text_dim, generator=g),
                       pooled_projections=torch.randn(1, 768, generator=g), txt_ids=torch.zeros(text_tokens, 3),
                       img_ids=img_ids, return_dict=False), 1


METHOD_ROWS = [
    ("full (diffusers processors, no fast attention)", None),
    ("full, also caching the window residual", "full"),
    ("WA-RS (window + cached residual)", "wars"),
    ("full + ASC (one CFG branch)", "full+asc"),
    ("WA-RS + ASC", "wars+asc"),
    ("AST (reuse previous step's output)", "ast"),
]


def bench_forward(tokens: list[int], layers: int, repeats: int, heads: int = HEADS, head_dim: int = HEAD_DIM,
                  text_tokens: int = 120, caption: int = 4096, model_name: str = "pixart") -> list[dict]:
    """Forward time under each method; the plan is driven by hand (state.step), as a pipeline would."""
    from piecewise_quant.integrations.diffusers.fast_attention import (
        FastAttentionPlan,
        FastAttnState,
        make_processor,
        self_attention_layers,
    )
    from piecewise_quant.integrations.diffusers.window_attention import WindowSpec

    rows = []
    for n in tokens:
        side = math.isqrt(n)
        model, kwargs, batch = _model_inputs(model_name, layers, heads, head_dim, n, text_tokens, caption)
        attn = self_attention_layers(model)
        names = [a for a, _ in attn]
        spec = WindowSpec(max(1, n // 8))
        # steps: 0 full (+residual), 1 wars, 2 wars+asc, 3 full+asc, 4 ast ; the full-without-residual row uses
        # the original processors. Without a CFG batch (Flux) there is no ASC.
        order = ["full", "wars", "wars+asc", "full+asc", "ast"] if batch == 2 else ["full", "wars", "ast"]
        plan = FastAttentionPlan([[m] * len(names) for m in order], names, spec)
        state = FastAttnState(names, spec)
        state.plan = plan
        originals = {a: m.processor for a, m in attn}
        for i, (a, m) in enumerate(attn):
            m.processor = make_processor(m, originals[a], i, state)
        state.begin(len(order))
        if batch == 2:
            state.cfg, state.cfg_how = "uncond_first", "zero embeddings in the first half"
        state.grid = (side, side)
        state.image_tokens, state.text_tokens = n, text_tokens
        # interleaved rounds (base, then the steps in order, each once per round) so that load from
        # other jobs on a shared machine falls on every method alike; the steps' caches stay valid
        # because each round replays the same step order
        samples: dict[str, list[float]] = {"base": [], **{m: [] for m in order}}
        saved: dict[str, float] = {"base": 0.0}
        with torch.no_grad():
            for rnd in range(repeats + 1):
                for key in ["base"] + order:
                    state.step = None if key == "base" else order.index(key)
                    state.flops = type(state.flops)()
                    t0 = time.perf_counter()
                    model(**kwargs)
                    if rnd:  # round 0 warms up and fills the caches
                        samples[key].append(time.perf_counter() - t0)
                    if key != "base":
                        saved[key] = 1.0 - state.flops.done / state.flops.dense
        state.end()
        for a, m in attn:
            m.processor = originals[a]
        base = statistics.median(samples["base"])
        times = {m: statistics.median(samples[m]) for m in order}
        common = dict(model=model_name, tokens=n, text_tokens=text_tokens if model_name != "pixart" else 0, layers=layers,
                      batch=batch, attention_layers=len(names))
        rows.append(dict(common, method=METHOD_ROWS[0][0], seconds=base, speedup=1.0, flops_saved=0.0))
        for label, method in METHOD_ROWS[1:]:
            if method in times:
                rows.append(dict(common, method=label, seconds=times[method], speedup=base / times[method],
                                 flops_saved=saved[method]))
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
    ap.add_argument("--layers", type=int, default=2,
                    help="blocks in the forward benchmark (PixArt-Sigma has 28, SD3-medium 24; Flux: this many "
                         "dual-stream and this many single-stream blocks, of 19 and 38)")
    ap.add_argument("--model", choices=sorted(MODEL_SHAPES), default="pixart",
                    help="the transformer of the forward benchmark: PixArt-Sigma-, SD3-medium- or Flux.1-shaped")
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
    command_key = f"command_{args.part}" + ("" if args.model == "pixart" else f"_{args.model}")
    result[command_key] = "python benchmarks/fast_attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.part in ("all", "kernel"):
        rows = bench_kernel([int(t) for t in args.tokens.split(",")], args.repeats, **kw)
        result["kernel"] = rows
        print("## attention kernel (batch 2, %d heads x %d)\n" % (kw.get("heads", HEADS), kw.get("head_dim", HEAD_DIM)))
        print(_table(rows, [("tokens", "tokens", ""), ("kind", "kernel", ""), ("window", "window", ""),
                            ("keys_fraction", "keys read", ".3f"), ("seconds", "seconds", ".4f"),
                            ("speedup", "vs dense", ".2f")]))
        print()
    if args.part in ("all", "forward"):
        heads, head_dim, text_tokens, text_dim = MODEL_SHAPES[args.model]
        fkw = dict(heads=heads, head_dim=head_dim, text_tokens=text_tokens, caption=text_dim, model_name=args.model)
        if args.quick:
            fkw.update(kw, caption=64, text_tokens=8)
        rows = bench_forward([int(t) for t in args.forward_tokens.split(",")], args.layers, args.repeats, **fkw)
        key = "forward" if args.model == "pixart" else f"forward_{args.model}"
        result[key] = rows
        label = {"pixart": "PixArt-Sigma", "sd3": "SD3-medium", "flux": "Flux.1"}[args.model]
        print(f"## {label}-shaped transformer forward ({args.layers} blocks, batch {rows[0]['batch']}, "
              f"{rows[0]['attention_layers']} attention layers, {rows[0]['text_tokens']} text tokens)\n")
        print(_table(rows, [("tokens", "image tokens", ""), ("method", "every layer", ""), ("seconds", "seconds", ".3f"),
                            ("speedup", "vs full", ".2f"), ("flops_saved", "attention FLOPs saved", ".1%")]))
        print()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
