"""A/B timing of two builds of the CPU kernel extension in one process.

Speed changes inside ``kernels/csrc/pq_cpu.c`` are often 10-50%, less than the spread between
two runs on a shared machine. This script loads two compiled ``_pq_cpu`` files side by side and
times the same layers through each, interleaved (best of ``--reps`` rounds), so both see the same
machine state. ``--copies`` rotates through that many copies of each layer so the weights come
from memory, as in a decode step, rather than from the cache.

    gcc -O3 ... kernels/csrc/pq_cpu.c -o /tmp/new.so        # the flags setup.py uses
    python benchmarks/cpu_kernel_ab.py --a kernels/_pq_cpu*.so --b /tmp/new.so --m 8,16 --copies 6
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import time
from pathlib import Path

import torch

import piecewise_quant as pq
from piecewise_quant.kernels import cpu_backend as cb

CASES = {  # name -> (config fields, activation mode for ext.gemv: 0 float, 1 int8 dynamic per token)
    "W8A8": (dict(grid="uniform", bits=8, group_size="channel", symmetric=True), 1),
    "W4 g128 uniform sym": (dict(grid="uniform", bits=4, group_size=128, symmetric=True), 0),
    "W4 g128 uniform asym": (dict(grid="uniform", bits=4, group_size=128, symmetric=False), 0),
    "W3 g128 uniform asym": (dict(grid="uniform", bits=3, group_size=128, symmetric=False), 0),
    "W4 g128 piecewise": (dict(grid="piecewise", bits=4, group_size=128), 0),
    "W3 g128 piecewise": (dict(grid="piecewise", bits=3, group_size=128), 0),
    "W2 g128 piecewise": (dict(grid="piecewise", bits=2, group_size=128), 0),
    "W4 g32 uniform sym": (dict(grid="uniform", bits=4, group_size=32, symmetric=True), 0),
    "MXFP4": (dict(grid="mxfp4", bits=4, group_size=32), 0),
}


def load(path: Path):
    """A compiled ``_pq_cpu`` file as its own module object (two builds can live in one process)."""
    loader = importlib.machinery.ExtensionFileLoader("_pq_cpu", str(path))
    spec = importlib.util.spec_from_file_location("_pq_cpu", str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def operands(fields: dict, k: int, n: int, copies: int) -> list:
    ops = []
    for c in range(copies):
        torch.manual_seed(c)
        q = pq.quantize(torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)),
                        pq.PiecewiseQuantConfig(observer="minmax", **fields), progress=False)[0]
        ops.append(q.fmt.weight_operand(q.quantized_tensors(), q.layer_spec))
    return ops


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=Path, required=True, help="compiled extension A (the baseline)")
    ap.add_argument("--b", type=Path, required=True, help="compiled extension B")
    ap.add_argument("--cases", default="W8A8,W4 g128 uniform sym", help=f"comma-separated: {', '.join(CASES)}")
    ap.add_argument("--m", default="1,8,16", help="activation rows, comma-separated")
    ap.add_argument("--size", type=int, default=4096, help="the layer is size x size")
    ap.add_argument("--copies", type=int, default=6, help="copies of each layer timed in turn (cold weights)")
    ap.add_argument("--reps", type=int, default=6, help="interleaved rounds; the best of each is kept")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    torch.set_num_threads(args.threads)
    exts = {"A": load(args.a), "B": load(args.b)}
    k = n = args.size
    print(f"A = {args.a}, B = {args.b}; {k}x{n}, {args.copies} copies, {args.threads} thread(s), best of {args.reps}")
    print("| case | activations | M | A ms | B ms | A / B |")
    print("|---|---|---:|---:|---:|---:|")
    for name in names:
        fields, amode = CASES[name]
        ws = operands(fields, k, n, args.copies)
        # the backend's own layer descriptor, made by each build
        descs = {lab: [cb._describe(ext, w.qweight, w.scales, w.aux, w.format, w.bits, w.group_size, k) for w in ws]
                 for lab, ext in exts.items()}
        for dt in (torch.float32, torch.bfloat16):
            for m in [int(v) for v in args.m.split(",")]:
                x = torch.randn(m, k).to(dt)
                y = torch.empty(m, n, dtype=dt)
                best = {}
                for _ in range(args.reps):
                    for lab, ext in exts.items():
                        start = time.perf_counter()
                        for d in descs[lab]:
                            ext.gemv(d, x.data_ptr(), cb._DTYPES[dt], m, k, y.data_ptr(), cb._DTYPES[dt], n, 0, 0,
                                     args.threads, -1, amode, 127.0, 1.0, 0, 0, -1)
                        best[lab] = min(best.get(lab, float("inf")), (time.perf_counter() - start) / len(descs[lab]) * 1e3)
                print(f"| {name} | {str(dt).removeprefix('torch.')} | {m} | {best['A']:.3f} | {best['B']:.3f} | "
                      f"{best['A'] / best['B']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
