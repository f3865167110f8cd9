"""CPU kernel benchmark: every built-in format through ``piecewise_quant::linear`` on CPU, against
anchors measured in the same run: fp32 and bf16 ``F.linear`` and torch's own quantized CPU kernels.

    python benchmarks/cpu_kernels.py --output docs/results/cpu_kernels.md           # ~10 min, 2 cores
    python benchmarks/cpu_kernels.py --cold --m 1 --output docs/results/cpu_kernels_cold.md
    python benchmarks/cpu_kernels.py --dry-run                                      # seconds, checks the path

Layers (N x K = out x in): 4096x4096 (a 7B model's q/o projection), 11008x4096 (up/gate) and
4096x11008 (down), each at M in {1, 4, 16, 64, 256} activation rows.

Rows:
  * anchors: ``F.linear`` with an fp32 weight and with a bf16 weight; ``aten._weight_int4pack_mm_for_cpu``
    (torch's int4 g128 kernel, bf16 activations); ``aten._weight_int8pack_mm`` (int8 per-channel
    weights, bf16 activations); ``torch._int_mm`` (int8 x int8, no activation quantization included);
    oneDNN's u8 x s8 ``qlinear_pointwise`` on a prepacked weight (likewise);
  * piecewise-quant formats, each with fp32 and with bf16 activations: W4 g128 uniform (symmetric and
    asymmetric) and piecewise; W3 g128 uniform and piecewise; W2 g128 uniform; W8 per-channel uniform
    (W8A16); W8A8 (per-channel 8-bit weights, dynamic per-token int8 activations, quantization in the
    timed call), also with the weight prepacked for oneDNN (``cpu_backend.prepack_int8``); W4A8 (W4 g128
    uniform with int8 activations); FP8 E4M3 weights; piecewise W8 g128;
    W4 g32 uniform symmetric; MXFP4 and NVFP4 (E2M1 codes with block scales, run by the
    C kernels as symmetric layers whose one level table is E2M1).

Columns: median ms; speed-up over fp32 ``F.linear`` and over bf16 ``F.linear`` on the same layer and
M; effective GB/s (stored weight bytes + x + y over the time); and that as a fraction of the read
bandwidth this run measured with a streaming read (``_pq_cpu.read``) of the same working-set size.
``--cold`` rotates every row through copies of its weights totalling at least ``--cold-bytes`` (by
default 2 GiB, beyond any L3), as a model's decode does; without it the one layer stays in cache.
Weights are random codes and scales: speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Callable

import torch

LAYERS = {"qo_proj": (4096, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
DRY_LAYERS = {"tiny": (64, 256)}
M_VALUES = (1, 4, 16, 64, 256)


@dataclass(frozen=True)
class Case:
    name: str
    grid: str = ""
    bits: int = 4
    group: int | str = 128
    symmetric: bool | None = None
    act_bits: int | None = None
    act_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    prepack: bool = False  # W8A8: cpu_backend.prepack_int8 (a oneDNN-packed copy of the weight, opt-in)


CASES = (
    Case("W4 g128 uniform sym", "uniform", 4, 128, True),
    Case("W4 g128 uniform asym", "uniform", 4, 128, False),
    Case("W4 g128 piecewise", "piecewise", 4, 128),
    Case("W3 g128 uniform", "uniform", 3, 128, False),
    Case("W3 g128 piecewise", "piecewise", 3, 128),
    Case("W2 g128 uniform", "uniform", 2, 128, False),
    Case("W8A16 channel uniform", "uniform", 8, "channel", True),
    Case("W8A8 int8 dynamic", "uniform", 8, "channel", True, act_bits=8),
    Case("W8A8 int8 dynamic, prepacked (oneDNN)", "uniform", 8, "channel", True, act_bits=8, prepack=True),
    Case("W4A8 g128 uniform", "uniform", 4, 128, False, act_bits=8),
    Case("FP8 weights channel", "fp8", 8, "channel"),
    Case("W8 g128 piecewise", "piecewise", 8, 128),
    Case("W4 g32 uniform sym", "uniform", 4, 32, True),  # FP4's block size with integer codes
    Case("MXFP4 (E2M1 g32, E8M0 scales)", "mxfp4", 4, 32),
    Case("NVFP4 (E2M1 g16, E4M3 scales)", "nvfp4", 4, 16),
)
ANCHORS = ("fp32 F.linear", "bf16 F.linear", "aten int4 g128 (bf16)", "aten int8pack (bf16)", "torch._int_mm (int8)",
           "oneDNN qlinear u8s8 (int8, prepacked)")


@dataclass
class Row:
    case: str
    act: str
    layer: str
    n: int
    k: int
    m: int
    ms: float
    x_fp32: float = 0.0
    x_bf16: float = 0.0
    gbps: float = 0.0
    bw_fraction: float = 0.0
    backend: str = ""


@dataclass
class Result:
    date: str
    cpu: str
    torch: str
    threads: int
    cold: bool
    dry_run: bool
    read_gbps: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timeit(fn: Callable[[int], object], copies: int, min_time: float, min_reps: int) -> float:
    """Median seconds of ``fn(i)``, cycling ``i`` over ``copies`` (each call uses the next copy)."""
    for i in range(min(3, copies) if copies > 1 else 2):
        fn(i % copies)
    times: list[float] = []
    i = 0
    end = time.perf_counter() + min_time
    while time.perf_counter() < end or len(times) < min_reps:
        t0 = time.perf_counter()
        fn(i % copies)
        times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times)


def read_gbps(ext, nbytes: int, threads: int, min_time: float) -> float:
    buf = torch.ones(max(nbytes, 1 << 20) // 4, dtype=torch.float32)
    t = timeit(lambda i: ext.read(buf.data_ptr(), buf.numel() * 4, threads), 1, min_time, 5)
    return buf.numel() * 4 / t / 1e9


def random_layer(case: Case, n: int, k: int):
    """A QuantLinear with random stored tensors of the case's layout."""
    import piecewise_quant as pq
    from piecewise_quant.qlinear import QuantLinear
    from piecewise_quant.quantization import layer_spec_for
    from piecewise_quant.registry import get_format

    kw = dict(grid=case.grid, bits=case.bits, group_size=case.group)
    if case.symmetric is not None:
        kw["symmetric"] = case.symmetric
    if case.act_bits:
        kw["act_bits"] = case.act_bits
    spec = pq.PiecewiseQuantConfig(**kw).spec_for("layer")
    layer = layer_spec_for("layer", spec, k, n)
    fmt = get_format(spec.grid)
    tensors = {}
    for name, lay in fmt.layout(layer).items():
        if lay.dtype == torch.uint8 and name == "scales":  # MXFP4's E8M0 exponents: near 2**0 (255 is NaN)
            tensors[name] = torch.randint(118, 128, lay.shape, dtype=torch.uint8)
        elif lay.dtype == torch.uint8:
            tensors[name] = torch.randint(0, 256, lay.shape, dtype=torch.uint8)  # any b-bit field is valid
        elif lay.dtype == torch.float8_e4m3fn:
            tensors[name] = (torch.randn(lay.shape) * 50).to(torch.float8_e4m3fn)
        elif name == "global_scale":
            tensors[name] = torch.full(lay.shape, 1e-4, dtype=lay.dtype)
        else:
            tensors[name] = (torch.rand(lay.shape) * 0.01 + 0.001).to(lay.dtype)
    q = QuantLinear.empty(layer, fmt, bias=False)
    q.load_quantized(tensors)
    return q


def stored_bytes(q) -> int:
    return sum(t.numel() * t.element_size() for t in q.quantized_tensors().values())


def bench_layer(name: str, n: int, k: int, m: int, args, ext, result: Result, progress) -> None:
    from piecewise_quant.kernels import cpu_backend

    min_time, min_reps = (0.02, 3) if args.dry_run else (args.min_time, 5)
    act_bytes = {"float32": 4, "bfloat16": 2}
    rows: list[Row] = []

    def copies_for(nbytes: int) -> int:
        return max(1, -(-args.cold_bytes // nbytes)) if args.cold else 1

    def bw_for(nbytes: int) -> float:
        key = "cold" if args.cold else str(nbytes)
        if key not in result.read_gbps:
            result.read_gbps[key] = read_gbps(ext, args.cold_bytes if args.cold else nbytes, torch.get_num_threads(),
                                              min_time * 4)
        return result.read_gbps[key]

    def record(case: str, act: str, fn_for_copy, weight_bytes: int, backend: str) -> None:
        copies = copies_for(weight_bytes)
        fns = [fn_for_copy() for _ in range(copies)]
        t = timeit(lambda i: fns[i](), copies, min_time, min_reps)  # noqa: F821 (called inside timeit, before `del fns`)
        del fns
        nbytes = weight_bytes + m * k * act_bytes.get(act, 1) + m * n * act_bytes.get(act, 4)
        gbps = nbytes / t / 1e9
        rows.append(Row(case, act, name, n, k, m, t * 1e3, gbps=gbps, bw_fraction=gbps / bw_for(weight_bytes), backend=backend))
        progress.update(1)

    # anchors
    def dense(dtype):
        def make():
            w = torch.randn(n, k).to(dtype)
            x = torch.randn(m, k).to(dtype)
            return lambda: torch.nn.functional.linear(x, w)
        return make

    record("fp32 F.linear", "float32", dense(torch.float32), n * k * 4, "torch")
    record("bf16 F.linear", "bfloat16", dense(torch.bfloat16), n * k * 2, "torch")

    def int4():
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        sz = (torch.rand(k // 128, n, 2) * 0.01).to(torch.bfloat16)
        x = torch.randn(m, k).to(torch.bfloat16)
        return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz)

    record("aten int4 g128 (bf16)", "bfloat16", int4, n * k // 2 + (k // 128) * n * 4, "torch")

    def int8pack():
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        s = torch.rand(n).to(torch.bfloat16)
        x = torch.randn(m, k).to(torch.bfloat16)
        return lambda: torch._weight_int8pack_mm(x, w, s)

    record("aten int8pack (bf16)", "bfloat16", int8pack, n * k + 2 * n, "torch")

    def int_mm():
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        x = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        return lambda: torch._int_mm(x, w.t())

    record("torch._int_mm (int8)", "int8", int_mm, n * k, "torch")

    def onednn():
        w = torch.ops.onednn.qlinear_prepack(torch.randint(-127, 128, (n, k), dtype=torch.int8), None)
        x = torch.randint(0, 256, (m, k), dtype=torch.uint8)
        ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.int64)
        return lambda: torch.ops.onednn.qlinear_pointwise(x, 1.0, 128, w, ones, zeros, None, 1.0, 0, torch.float32,
                                                          "none", [], "")

    if cpu_backend.onednn_int8_status()[0]:
        record("oneDNN qlinear u8s8 (int8, prepacked)", "int8", onednn, n * k, "torch")
    else:
        progress.update(1)

    for case in args.case_list:
        for act in case.act_dtypes:
            dtype = getattr(torch, act)

            if case.prepack and not cpu_backend.onednn_int8_status()[0]:
                progress.update(1)
                continue

            def make(case=case, dtype=dtype):
                q = random_layer(case, n, k)
                if case.prepack:
                    cpu_backend.prepack_int8(q)
                x = torch.randn(m, k).to(dtype)

                def run():
                    with torch.no_grad():
                        return q(x)

                return run

            probe = random_layer(case, n, k)
            spec = probe.spec
            act_format = "none" if spec.act_bits is None else "int8"
            backend = cpu_backend.explain(probe.fmt.kernel_format(spec), spec.bits, probe.layer_spec.group_size, k, dtype,
                                          act_format, rows=m, prepacked=case.prepack)
            record(case.name, act, make, stored_bytes(probe), backend)
            del probe

    base = {(r.m): r.ms for r in rows if r.case == "fp32 F.linear"}
    base16 = {(r.m): r.ms for r in rows if r.case == "bf16 F.linear"}
    for r in rows:
        r.x_fp32 = base[r.m] / r.ms
        r.x_bf16 = base16[r.m] / r.ms
    result.rows.extend(rows)


def _mb(key: str) -> str:
    return key if key == "cold" else f"{int(key) / 1e6:.1f}"


def _mb_sort(key: str) -> float:
    return float("inf") if key == "cold" else int(key)


def markdown(result: Result) -> str:
    head = (
        f"{result.date}, {result.cpu}, torch {result.torch}, {result.threads} threads, "
        f"{'cold weights (rotated copies beyond the L3)' if result.cold else 'hot weights (one layer, in cache)'}"
        f"{', dry run: timings meaningless' if result.dry_run else ''}\n\n"
        f"Read bandwidth measured in this run with a streaming read of the same working-set size "
        f"(MB: GB/s): "
        + ", ".join(f"{_mb(k)}: {v:.1f}" for k, v in sorted(result.read_gbps.items(), key=lambda kv: _mb_sort(kv[0])))
        + "\n\n"
    )
    lines = ["| case | activations | layer (N x K) | M | ms | x fp32 | x bf16 | GB/s | % of read bw | kernel |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result.rows:
        lines.append(
            f"| {r.case} | {r.act} | {r.layer} ({r.n}x{r.k}) | {r.m} | {r.ms:.3f} | {r.x_fp32:.2f} | {r.x_bf16:.2f} | "
            f"{r.gbps:.1f} | {100 * r.bw_fraction:.0f}% | {r.backend} |"
        )
    return head + "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated subset of {', '.join(LAYERS)}")
    p.add_argument("--m", default=",".join(map(str, M_VALUES)), help="activation rows, comma-separated")
    p.add_argument("--cases", default="", help="comma-separated case-name prefixes (default: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--cold", action="store_true", help="rotate through weight copies beyond the L3")
    p.add_argument("--cold-bytes", type=int, default=2 << 30, help="working set per row with --cold")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of repetitions per row")
    p.add_argument("--output", type=Path, help="write the markdown table here (and .json beside it)")
    p.add_argument("--dry-run", action="store_true", help="tiny layer, few repetitions: checks the script path")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--from-json", type=Path, help=argparse.SUPPRESS)  # re-render a saved run
    args = p.parse_args(argv)
    layers = DRY_LAYERS if args.dry_run else LAYERS
    if args.dry_run:
        args.layer_list = dict(layers)
        args.cold = False
    else:
        names = [s for s in args.layers.split(",") if s]
        unknown = [s for s in names if s not in LAYERS]
        if unknown:
            p.error(f"unknown layers {unknown}; choose from {list(LAYERS)}")
        args.layer_list = {s: LAYERS[s] for s in names}
    try:
        args.m_list = [int(v) for v in args.m.split(",") if v]
    except ValueError:
        p.error(f"--m must be comma-separated integers, got {args.m!r}")
    if not args.m_list or min(args.m_list) < 1:
        p.error("--m needs positive integers")
    prefixes = [s.strip() for s in args.cases.split(",") if s.strip()]
    args.case_list = [c for c in CASES if not prefixes or any(c.name.startswith(pfx) for pfx in prefixes)]
    if not args.case_list:
        p.error(f"--cases matched nothing; case names: {[c.name for c in CASES]}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        rows = [Row(**r) for r in data.pop("rows")]
        text = markdown(Result(**data, rows=rows))
        print(text)
        if args.output:
            args.output.write_text(text)
        return 0
    from tqdm import tqdm

    from piecewise_quant.kernels import cpu_backend

    if args.threads:
        torch.set_num_threads(args.threads)
    st = cpu_backend.status()
    if not st["available"]:
        print(f"error: the CPU kernels are unavailable: {st['reason']}", file=sys.stderr)
        return 2
    from piecewise_quant.kernels import _pq_cpu as ext

    result = Result(date.today().isoformat(), cpu_name(), torch.__version__, torch.get_num_threads(), args.cold, args.dry_run)
    per_layer = len(ANCHORS) + sum(len(c.act_dtypes) for c in args.case_list)
    total = per_layer * len(args.layer_list) * len(args.m_list)
    with tqdm(total=total, disable=args.no_progress, desc="cpu kernels") as progress:
        for name, (n, k) in args.layer_list.items():
            for m in args.m_list:
                bench_layer(name, n, k, m, args, ext, result, progress)
    text = markdown(result)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps(asdict(result), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
