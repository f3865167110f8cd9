"""Operand order of the W8A8 GEMM on CPU (many rows): ``x W^T`` against ``(W x^T)^T`` in
``torch._int_mm``, alone and inside a W8A8 layer (per-channel 8-bit weights, dynamic per-token int8
activations), on the 4096 x 4096, 11008 x 4096 and 4096 x 11008 layers of a 7B model.

The W8A8 path above 16 rows hands the stored codes (as signed levels) to torch's int8 GEMM. With the
weight as the right operand, oneDNN packs the transposed weight on every call; with the weight on the
left it packs the small ``x^T`` instead. ``kernels/cpu_backend.py`` chooses the order by shape
(``INT8_GEMM_WEIGHT_LEFT``); this script measures both orders so the rule can be checked on any CPU.

Usage (repository root; a few minutes)::

    python benchmarks/int8_gemm_order.py [--threads 2] [--m 17,32,64,256] [--output out.md]

Prints a markdown table of median milliseconds per call, the two orders interleaved in every round,
after checking that both give the same output bit for bit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import piecewise_quant as pq
from piecewise_quant.kernels import cpu_backend
from piecewise_quant.qlinear import ensure_runtime
from piecewise_quant.quantization import layer_spec_for

LAYERS = {"qo_proj": (4096, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def _interleaved_ms(fns, rounds: int, calls: int) -> list[float]:
    """Median ms per call of each of ``fns``, all timed in every round (a slow stretch hits all)."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[i].append((time.perf_counter() - t0) / calls)
    return [statistics.median(t) * 1e3 for t in times]


def measure(shapes: dict[str, tuple[int, int]], rows, rounds: int = 5, calls: int = 3) -> list[dict]:
    """One row per layer, M and activation dtype: both orders of the raw GEMM and of the layer."""
    ensure_runtime()
    out = []
    spec = pq.QuantSpec(grid="uniform", bits=8, group_size="channel", symmetric=True, act_bits=8)
    for name, (n, k) in shapes.items():
        lin = torch.nn.Linear(k, n, bias=False)
        q = pq.QuantLinear.from_linear(lin, layer_spec_for(name, spec, k, n), pq.get_format("uniform"))
        levels = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
        for m in rows:
            qx = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=torch.Generator().manual_seed(m))
            right, left = torch._int_mm(qx, levels.t()), torch._int_mm(levels, qx.t().contiguous()).t()
            if not torch.equal(right, left):
                raise AssertionError(f"{name} M={m}: the two orders of torch._int_mm disagree")
            gemm = _interleaved_ms([lambda: torch._int_mm(qx, levels.t()),
                                    lambda: torch._int_mm(levels, qx.t().contiguous()).t()], rounds, calls)
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)

                def layer(order):
                    def run():
                        cpu_backend.INT8_GEMM_WEIGHT_LEFT = order
                        try:
                            with torch.no_grad():
                                return q(x)
                        finally:
                            cpu_backend.INT8_GEMM_WEIGHT_LEFT = None
                    return run

                if not torch.equal(layer(False)(), layer(True)()):
                    raise AssertionError(f"{name} M={m} {dtype}: the layer's two orders disagree")
                right_ms, left_ms = _interleaved_ms([layer(False), layer(True)], rounds, calls)
                chosen = "weight left" if n >= k else "weight right"
                row = {"layer": name, "n": n, "k": k, "m": m, "dtype": str(dtype).removeprefix("torch."),
                       "gemm_right_ms": gemm[0], "gemm_left_ms": gemm[1],
                       "layer_right_ms": right_ms, "layer_left_ms": left_ms, "chosen": chosen}
                out.append(row)
                print(f"{name} M={m} {row['dtype']}: GEMM {gemm[0]:.2f} / {gemm[1]:.2f} ms, layer {right_ms:.2f} / "
                      f"{left_ms:.2f} ms (weight right / left; the backend picks {chosen})", file=sys.stderr,
                      flush=True)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| layer (N x K) | M | activations | GEMM x W^T (ms) | GEMM (W x^T)^T (ms) | layer, weight right (ms) "
             "| layer, weight left (ms) | left / right speed-up | order chosen |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} ({r['n']}x{r['k']}) | {r['m']} | {r['dtype']} | {r['gemm_right_ms']:.2f} | "
                     f"{r['gemm_left_ms']:.2f} | {r['layer_right_ms']:.2f} | {r['layer_left_ms']:.2f} | "
                     f"{r['layer_right_ms'] / r['layer_left_ms']:.2f}x | {r['chosen']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated subset of " + ", ".join(LAYERS))
    ap.add_argument("--m", default="17,32,64,256", help="activation rows (above 16: the int8 GEMM path)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--output", default=None, help="write the markdown table here (and .json beside it)")
    ap.add_argument("--dry-run", action="store_true", help="one small layer, few repetitions")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    unknown = set(args.layers.split(",")) - set(LAYERS)
    if unknown:
        ap.error(f"--layers: unknown {sorted(unknown)}; choose from {', '.join(LAYERS)}")
    shapes = {"small": (256, 128)} if args.dry_run else {k: LAYERS[k] for k in args.layers.split(",")}
    rows = measure(shapes, [int(v) for v in args.m.split(",")], rounds=2 if args.dry_run else args.rounds,
                   calls=1 if args.dry_run else 3)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpu_kernels import cpu_name

    head = (f"{time.strftime('%Y-%m-%d')}, {cpu_name()}, torch {torch.__version__}, "
            f"{args.threads} thread(s); W8A8 (8-bit per-channel weights, dynamic per-token int8 activations)")
    text = head + "\n\n" + table(rows)
    print("\n" + text)
    if args.output:
        Path(args.output).write_text(text + "\n")
        Path(args.output).with_suffix(".json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
