"""Kernel benchmark: the Triton quantized GEMMs against ``torch.matmul`` with an fp16 weight, on
Llama-shaped layers, with effective bandwidth and the fraction of the memory-bound ideal.

    python benchmarks/kernels.py --output benchmarks/results/kernels_h100.md      # on a CUDA GPU
    python benchmarks/kernels.py --dry-run                                         # CPU, interpreter

Layers (N x K = out x in): 4096x4096 (attention q/o projection of a 7B model), 11008x4096
(up/gate projection: out=11008, in=4096), 4096x11008 (down projection: out=4096, in=11008) and
8192x8192 (a 70B-class square projection), each at M in {1, 4, 16, 64, 256, 1024} rows.
Cases: W4A16 and W3A16 with group 128 (uniform_sym and piecewise), W8A16 (uniform_sym, group 128),
W8A8 int8 (per-channel weights, dynamic per-token activations, quantization included in the time)
and, on GPUs of compute capability 8.9+, W8A8 FP8 E4M3.

Timing: CUDA events through ``triton.testing.do_bench`` (median of the repetitions, L2 flushed
between them). Bytes moved = packed weight + scales + aux (zero points / breakpoint ids) + x + y;
the fp16 baseline moves the fp16 weight + x + y. Ideal time = bytes / peak bandwidth, the peak
taken from ``--peak-gbps`` or looked up from the device name (H100 SXM 3350 GB/s, H100 PCIe
2000 GB/s, H200 4800 GB/s). ``--dry-run`` re-executes itself under ``TRITON_INTERPRET=1`` on CPU
with tiny shapes and ``time.perf_counter``: it exercises every code path, its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

LAYERS = {  # name -> (N = out_features, K = in_features)
    "qo_proj": (4096, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
    "square_8k": (8192, 8192),
}
DRY_LAYERS = {"tiny": (64, 128)}
M_VALUES = (1, 4, 16, 64, 256, 1024)
DRY_M_VALUES = (1, 4, 16, 64)
PEAK_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0))  # first match wins


@dataclass(frozen=True)
class Case:
    """One quantization scheme: weight format, bits, group size and activation format."""

    name: str
    weight_format: str
    bits: int
    group_size: int  # -1: per-channel for the W8A8 cases
    act_format: str = "none"


CASES = (
    Case("W4A16 g128 uniform", "uniform_sym", 4, 128),
    Case("W4A16 g128 piecewise", "piecewise", 4, 128),
    Case("W3A16 g128 uniform", "uniform_sym", 3, 128),
    Case("W3A16 g128 piecewise", "piecewise", 3, 128),
    Case("W8A16 g128 uniform", "uniform_sym", 8, 128),
    Case("W8A8 int8", "uniform_sym", 8, -1, "int8"),
    Case("W8A8 fp8", "fp8_e4m3", 8, -1, "fp8_e4m3"),
)


@dataclass
class Row:
    case: str
    layer: str
    n: int
    k: int
    m: int
    ms: float
    fp16_ms: float
    speedup: float
    gbps: float
    tflops: float
    ideal_fraction: float | None
    rel_err: float


def peak_for(device_name: str) -> float | None:
    """Peak DRAM bandwidth (GB/s) of a known GPU from its name, else ``None``."""
    for key, gbps in PEAK_GBPS:
        if key.lower() in device_name.lower():
            return gbps
    return None


def _weights(torch, case: Case, n: int, k: int, device: str):
    """Random packed weights of ``case``: codes, scales (never zero) and the aux field."""
    from piecewise_quant.kernels import pack_codes
    from piecewise_quant.kernels import reference as ref

    g = torch.Generator().manual_seed(n * 31 + k)
    if case.weight_format == "fp8_e4m3":
        q = (torch.randn(n, k, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        scales = (torch.rand(n, 1, generator=g) * 1e-3 + 1e-4).to(torch.float16)
        return q.to(device), scales.to(device), None, k
    gs = k if case.group_size == -1 else case.group_size
    n_groups = k // gs
    q = pack_codes(torch.randint(0, 1 << case.bits, (n, k), generator=g), case.bits)
    scales = (torch.rand(n, n_groups, generator=g) * 0.01 + 1e-3).to(torch.float16)
    aux = None
    if case.weight_format == "piecewise":
        scales = scales * torch.where(torch.rand(n, n_groups, generator=g) < 0.5, -1.0, 1.0).to(torch.float16)
        aux = ref.pack_group_field(torch.randint(0, 1 << case.bits, (n, n_groups), generator=g), case.bits)
    elif case.weight_format == "uniform_asym":
        aux = ref.pack_group_field(torch.randint(0, 1 << case.bits, (n, n_groups), generator=g), case.bits)
    return q.to(device), scales.to(device), aux.to(device) if aux is not None else None, gs


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _timer(dry: bool, warmup: int, rep: int):
    if dry:
        def bench(fn) -> float:
            fn()
            times = []
            for _ in range(rep):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)
        return bench
    import triton.testing

    def bench(fn) -> float:
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    return bench


def run(cases, layers, m_values, device: str, dry: bool, peak_gbps: float | None, warmup: int, rep: int,
        progress: bool = True) -> list[Row]:
    """Time every (case, layer, M) and return one :class:`Row` each."""
    import torch
    from tqdm import tqdm

    from piecewise_quant.kernels import reference as ref
    from piecewise_quant.kernels.triton_dequant_matmul import triton_linear
    from piecewise_quant.kernels.triton_w8a8 import w8a8_linear

    bench = _timer(dry, warmup, rep)
    jobs = [(c, lname, nk) for c in cases for lname, nk in layers.items()]
    rows: list[Row] = []
    for case, lname, (n, k) in tqdm(jobs, desc="kernels", unit="case", disable=not progress, file=sys.stderr):
        qweight, scales, aux, gs = _weights(torch, case, n, k, device)
        w16 = ref.dequantize(qweight, scales, aux, case.weight_format, case.bits, gs, k, torch.float16)
        for m in m_values:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            if case.act_format == "none":
                def fn():
                    return triton_linear(x, qweight, scales, aux, None, case.weight_format, case.bits, gs, k)
            else:
                def fn():
                    return w8a8_linear(x, qweight, scales, None, case.weight_format, gs, k, case.act_format)
            y = fn()
            y_ref = ref.linear(x, qweight, scales, aux, None, None, case.weight_format, case.bits, gs, k,
                               case.act_format)
            rel_err = ((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max()).item()
            ms = bench(fn)
            fp16_ms = bench(lambda: torch.matmul(x, w16.t()))
            moved = _nbytes(qweight, scales, aux, x, y)
            ideal = None if peak_gbps is None else (moved / (peak_gbps * 1e9) * 1e3) / ms
            rows.append(Row(case.name, lname, n, k, m, ms, fp16_ms, fp16_ms / ms, moved / (ms * 1e-3) / 1e9,
                            2.0 * m * n * k / (ms * 1e-3) / 1e12, ideal, rel_err))
    return rows


def table(rows: list[Row], header: str) -> str:
    """The rows as a markdown table under ``header``."""
    lines = [header, "",
             "| case | layer (N x K) | M | ms | fp16 ms | speedup vs fp16 | GB/s | TFLOP/s | % of ideal | max rel err |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ideal = "n/a" if r.ideal_fraction is None else f"{100 * r.ideal_fraction:.1f}"
        lines.append(f"| {r.case} | {r.layer} ({r.n}x{r.k}) | {r.m} | {r.ms:.4g} | {r.fp16_ms:.4g} | "
                     f"{r.speedup:.3g} | {r.gbps:.4g} | {r.tflops:.3g} | {ideal} | {r.rel_err:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, TRITON_INTERPRET=1, tiny shapes: exercises the code path; timings are meaningless")
    p.add_argument("--peak-gbps", type=float, default=None, help="peak DRAM bandwidth for the ideal (GB/s)")
    p.add_argument("--output", type=Path, default=None, help="write the markdown table here and a .json next to it")
    p.add_argument("--layers", default=None, help=f"comma-separated subset of {','.join(LAYERS)}")
    p.add_argument("--m", default=None, help="comma-separated M values")
    p.add_argument("--cases", default=None, help="comma-separated substrings selecting cases, e.g. 'W4A16,W8A8'")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms); dry run: call count")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton decides interpretation when kernels are decorated: restart with the variable set
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)

    import torch

    if args.dry_run:
        device, device_name = "cpu", "CPU (Triton interpreter)"
        layers, m_values, rep = DRY_LAYERS, DRY_M_VALUES, min(args.rep, 3)
    else:
        if not torch.cuda.is_available():
            print("kernels.py: no CUDA device; use --dry-run to exercise the script on CPU", file=sys.stderr)
            return 2
        device, device_name = "cuda", torch.cuda.get_device_name()
        layers, m_values, rep = LAYERS, M_VALUES, args.rep
    if args.layers:
        pool = {**LAYERS, **DRY_LAYERS}
        layers = {name: pool[name] for name in args.layers.split(",")}
    if args.m:
        m_values = tuple(int(v) for v in args.m.split(","))
    cases = [c for c in CASES if not args.cases or any(s in c.name for s in args.cases.split(","))]
    fp8_ok = args.dry_run or torch.cuda.get_device_capability() >= (8, 9)
    cases = [c for c in cases if c.act_format != "fp8_e4m3" or fp8_ok]

    peak = args.peak_gbps if args.peak_gbps is not None else (None if args.dry_run else peak_for(device_name))
    source = "--peak-gbps" if args.peak_gbps is not None else ("device name" if peak else "unknown")
    rows = run(cases, layers, m_values, device, args.dry_run, peak, args.warmup, rep, not args.no_progress)

    label = "dry run, interpreter, timings meaningless" if args.dry_run else "CUDA events, median"
    peak_txt = f"{peak:.0f} GB/s ({source})" if peak else "none (no ideal computed)"
    header = (f"### Kernel benchmark on {device_name} ({label})\n\n"
              f"{date.today().isoformat()}, torch {torch.__version__}, activations float16, "
              f"peak bandwidth {peak_txt}")
    text = table(rows, header)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        meta = {"device": device_name, "dry_run": args.dry_run, "peak_gbps": peak, "peak_source": source,
                "date": date.today().isoformat(), "torch": torch.__version__}
        args.output.with_suffix(".json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
