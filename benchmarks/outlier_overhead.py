"""Cost of the sparse add of a dense-and-sparse layer on CPU: ``QuantLinear`` forward with
outliers against the same layer without them (the same dense codes), 4096 x 4096, W3 and W4 g128,
at M = 1 (decode) and M = 64 tokens. In-run anchor: the same dense call followed by the
``torch.sparse`` CSR product (MKL), the path the CPU kernel replaced.

Usage (repository root; about a minute)::

    nice -n 10 python benchmarks/outlier_overhead.py [--threads 2] [--json out.json]
    python benchmarks/outlier_overhead.py --sweep [--threads 1]

Prints a markdown table: median milliseconds per call (of ``--repeat`` calls after warm-up).
``--sweep`` times the sparse add alone (the kernel against ``torch.sparse``, one outlier per group
of 128) at 1 to 256 activation rows, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import piecewise_quant as pq
from piecewise_quant import outliers
from piecewise_quant.kernels.sparse_add import OutlierMatrix
from piecewise_quant.quantization import layer_spec_for
from piecewise_quant.registry import get_format


def _median_ms(fn, x: torch.Tensor, repeat: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(bits: int, k: int, size: int, repeat: int) -> list[dict]:
    torch.manual_seed(0)
    w = torch.randn(size, size) * 0.02
    layer = layer_spec_for("bench", pq.QuantSpec(bits=bits, group_size=128, outliers=k, observer="minmax"), size, size)
    fmt = get_format("piecewise")
    tensors = fmt.quantize(w, layer)
    sparse = pq.QuantLinear.empty(layer, fmt, bias=False)
    sparse.load_quantized(tensors)
    dense_layer = outliers.dense_layer(layer)
    dense = pq.QuantLinear.empty(dense_layer, fmt, bias=False)
    dense.load_quantized(outliers.split_tensors(tensors))
    # float32 values take the torch.sparse path (the kernel reads the stored float16)
    csr = OutlierMatrix(tensors["outlier_idx"], tensors["outlier_vals"].float(), size, outliers.per_group(layer),
                        outliers.group_width(layer))
    rows = []
    for m in (1, 64):
        x = torch.randn(m, size)
        with torch.no_grad():
            got, want = sparse(x), csr.add_to(dense(x), x)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), "the kernel and torch.sparse disagree"
        d = _median_ms(dense, x, repeat)
        s = _median_ms(sparse, x, repeat)
        c = _median_ms(lambda t: csr.add_to(dense(t), t), x, repeat)
        rows.append({"bits": bits, "outliers_per_group": k, "share": k / 128, "m": m, "dense_ms": d, "with_outliers_ms": s,
                     "overhead": s / d - 1, "torch_sparse_ms": c, "torch_sparse_overhead": c / d - 1,
                     "bpw_dense": fmt.bits_per_weight(dense_layer), "bpw": fmt.bits_per_weight(layer)})
    return rows


def sweep(size: int, repeat: int, rows=(1, 2, 4, 8, 16, 64, 256)) -> list[dict]:
    """The sparse add alone: microseconds per call of the kernel and of ``torch.sparse``."""
    from piecewise_quant.qlinear import ensure_runtime

    ensure_runtime()
    g = torch.Generator().manual_seed(0)
    groups = size // 128
    idx = torch.stack([torch.randint(0, 128, (groups,), generator=g) for _ in range(size)]).to(torch.uint8)
    vals = torch.randn(size, groups, generator=g).half()
    kernel = OutlierMatrix(idx, vals, size, 1, 128)
    csr = OutlierMatrix(idx, vals.float(), size, 1, 128)
    out = []
    for m in rows:
        x, y = torch.randn(m, size, generator=g), torch.randn(m, size, generator=g)
        out.append({"m": m, "kernel_us": _median_ms(lambda t: kernel.add_to(y, t), x, repeat) * 1e3,
                    "torch_sparse_us": _median_ms(lambda t: csr.add_to(y, t), x, repeat) * 1e3})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="time the sparse add alone at 1-256 rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.sweep:
        rows = sweep(args.size, max(args.repeat, 50))
        print("| rows | " + " | ".join(str(r["m"]) for r in rows) + " |")
        print("|---|" + "---|" * len(rows))
        print("| the kernel (µs) | " + " | ".join(f"{r['kernel_us']:,.0f}" for r in rows) + " |")
        print("| `torch.sparse` (µs) | " + " | ".join(f"{r['torch_sparse_us']:,.0f}" for r in rows) + " |")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return 0
    rows = [r for bits in (3, 4) for k in (1, 2) for r in measure(bits, k, args.size, args.repeat)]
    print("| bits | outliers/group (share) | M | dense (ms) | + outliers (ms) | overhead | "
          "torch.sparse instead (ms) | its overhead | bits/weight |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bits']} | {r['outliers_per_group']} ({r['share']:.2%}) | {r['m']} | {r['dense_ms']:.3f} | "
              f"{r['with_outliers_ms']:.3f} | {r['overhead']:+.0%} | {r['torch_sparse_ms']:.3f} | "
              f"{r['torch_sparse_overhead']:+.0%} | {r['bpw_dense']:.3f} -> {r['bpw']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
