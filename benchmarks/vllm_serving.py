"""Serve the bundled model with ``vllm serve`` (float and piecewise-quantized) and put it under load
through the OpenAI-compatible API: throughput and latency, quantized vs float.

    python benchmarks/vllm_serving.py                 # 8 clients x 20 requests, 32 tokens each
    python benchmarks/vllm_serving.py --quick         # 4 x 4 x 8 tokens (what the test runs)
    python benchmarks/vllm_serving.py --json out.json --markdown table.md

Each server runs on 127.0.0.1 with ``--enforce-eager`` (CPU), is checked with ``/health``, loaded
by ``--clients`` threads each sending ``--requests`` completions one after another, and stopped
with SIGINT. Every answer must be HTTP 200 with a well-formed completion of exactly
``--max-tokens`` tokens (``ignore_eos``); the script exits non-zero otherwise. The test suite
imports :func:`serve`, :func:`run_load` and :func:`stop` from this file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "assets" / "tiny-llama-pydoc"
PROMPTS = [
    "The Python language",
    "A list is a mutable sequence",
    "Exceptions are raised when",
    "The for statement is used to",
    "A dictionary maps",
    "Modules can import other modules",
    "The with statement",
    "Generators are functions that",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: str | Path, port: int, extra: list[str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start ``vllm serve`` on 127.0.0.1:``port`` (returns at once; see :func:`wait_ready`)."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    # `piecewise-quant serve` is `vllm serve` (the vllm-cpu 0.32.0 `vllm` command cannot start)
    cmd = [sys.executable, "-m", "piecewise_quant.integrations.cli", "serve", str(model),
           "--host", "127.0.0.1", "--port", str(port),
           "--enforce-eager", "--max-model-len", "256", "--served-model-name", "model", *(extra or [])]
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 300.0) -> float:
    """Seconds until ``/health`` answers 200; raises if the server exits or the time runs out."""
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - start
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"vllm serve was not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGINT (what Ctrl-C sends), then SIGKILL to the whole process group if it hangs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"vllm serve did not stop within {timeout:.0f} s of SIGINT; killed") from exc
    return proc.returncode


@dataclass
class Answer:
    ok: bool
    latency_s: float
    tokens: int
    problem: str = ""


def _complete(port: int, prompt: str, max_tokens: int) -> Answer:
    body = json.dumps({"model": "model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            status, data = r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return Answer(False, time.perf_counter() - t0, 0, f"HTTP {exc.code}: {exc.read()[:200]!r}")
    except Exception as exc:  # connection reset, timeout, bad JSON: all count as failures
        return Answer(False, time.perf_counter() - t0, 0, f"{type(exc).__name__}: {exc}")
    dt = time.perf_counter() - t0
    try:
        text = data["choices"][0]["text"]
        n = int(data["usage"]["completion_tokens"])
    except (KeyError, IndexError, TypeError, ValueError):
        return Answer(False, dt, 0, f"malformed answer {str(data)[:200]}")
    if status != 200 or not isinstance(text, str) or n != max_tokens:
        return Answer(False, dt, n, f"status {status}, {n} tokens, text {text!r:.80}")
    return Answer(True, dt, n)


def run_load(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads, each sending ``requests`` completions back to back."""
    answers: list[Answer] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            a = _complete(port, PROMPTS[(c + r) % len(PROMPTS)], max_tokens)
            with lock:
                answers.append(a)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(a.latency_s for a in answers if a.ok)
    ok = [a for a in answers if a.ok]
    return {
        "requests": len(answers),
        "ok": len(ok),
        "failures": [a.problem for a in answers if not a.ok][:5],
        "wall_s": wall,
        "req_per_s": len(ok) / wall,
        "tokens_per_s": sum(a.tokens for a in ok) / wall,
        "latency_p50_s": statistics.median(lat) if lat else float("nan"),
        "latency_p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan"),
    }


def _quantized_checkpoint(out: Path) -> Path:
    """The bundled model quantized with piecewise W4 g128 by transformers, saved to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from piecewise_quant import PiecewiseQuantConfig
    from piecewise_quant.integrations.transformers import register_with_transformers

    register_with_transformers()
    model = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32,
                                                 quantization_config=PiecewiseQuantConfig(bits=4, group_size=128))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(BUNDLED).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 clients x 4 requests x 8 tokens")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=20, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", help="vLLM --dtype (CPU default: bfloat16)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.max_tokens = 4, 4, 8
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        quant = _quantized_checkpoint(Path(tmp) / "w4")
        setups = [
            ("float", BUNDLED, []),
            ("piecewise W4A16 g128 (pre-quantized)", quant, ["--quantization", "piecewise"]),
            ("piecewise W4A16 (online, default config)", BUNDLED, ["--quantization", "piecewise"]),
        ]
        for label, model, extra in setups:
            port = free_port()
            log = Path(tmp) / f"server-{port}.log"
            proc = serve(model, port, ["--dtype", args.dtype, *extra], log=log)
            try:
                ready = wait_ready(proc, port)
                run_load(port, 2, 1, 4)  # warm-up
                res = run_load(port, args.clients, args.requests, args.max_tokens)
            except Exception:
                print(log.read_text()[-4000:], file=sys.stderr)
                raise
            finally:
                code = stop(proc)
            rows.append({"setup": label, "startup_s": ready, "exit_code": code, **res})
            print(f"{label}: {res['ok']}/{res['requests']} ok, {res['tokens_per_s']:.1f} tok/s", flush=True)
    header = ("| setup | ok | output tok/s | req/s | p50 latency (s) | p95 latency (s) | start-up (s) |\n"
              "|---|---|---|---|---|---|---|")
    lines = [header] + [
        f"| {r['setup']} | {r['ok']}/{r['requests']} | {r['tokens_per_s']:.1f} | {r['req_per_s']:.2f} | "
        f"{r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | {r['startup_s']:.0f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    print(f"\n{args.clients} clients x {args.requests} requests x {args.max_tokens} tokens, --dtype {args.dtype}, "
          f"{os.cpu_count()} CPU cores\n\n{table}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None, "markdown": None}, "rows": rows}, indent=2,
                                        default=str))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    failed = [r for r in rows if r["ok"] != r["requests"] or r["exit_code"] not in (0, -2, 130)]
    for r in failed:
        print(f"FAILED: {r['setup']}: {r['failures']} exit code {r['exit_code']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
