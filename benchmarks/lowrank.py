"""Low-rank branch (``QuantSpec(low_rank=...)``, SVDQuant): quality and CPU cost in one run.

* ``quality``: the bundled ``assets/tiny-llama-pydoc`` (held-out perplexity, the model card's
  protocol) at W4A4 (int4 dynamic per-token activations, clip 0.9) and W4A8 (int8 dynamic
  per-token), weights uniform W4 g128 with GPTQ (32 windows of 256 tokens of the calibration split
  of ``pydoc_data.topics``), with the low-rank branch at rank 0 (none), 8, 16 and 32, without a
  rotation and with ``rotation="quip"``; bits per weight of the quantized layers (codes, scales,
  zero points and the float16 factors) from ``model_size_report``.
* ``cost``: one ``QuantLinear`` of 4096 x 4096 (uniform W4 g128, weight-only) on CPU at M = 1
  (decoding) and M = 64 tokens, with a low-rank branch of rank 16, 32 and 64 against the same
  layer without it (the same residual codes), and the branch ``(x B^T) A^T`` alone; medians of
  repeated calls, the three interleaved in every repetition (the machine is shared). The factors
  are random float16 tensors of the right shapes (the add costs the same whatever their values,
  and a float64 SVD of a 4096 x 4096 weight would dominate the run).

Usage (from the repository root)::

    python benchmarks/lowrank.py                       # both parts (~10 min on one thread)
    python benchmarks/lowrank.py --part cost --threads 1
    python benchmarks/lowrank.py --part quality --json out.json
    python benchmarks/lowrank.py --part quality --equal-bits   # rank 0 at g32: the bits spent on groups
    python benchmarks/lowrank.py --part quality --energy 0.5   # W4A4, per-layer ranks by energy (<= 32)
    python benchmarks/lowrank.py --part svd                    # full against randomized SVD, 4096 x 4096

Results are in ``docs/low-rank.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import piecewise_quant as pq  # noqa: E402

ACTS = {
    "W4A4": {"act_bits": 4, "act_mode": "dynamic_per_token", "act_clip_ratio": 0.9},
    "W4A8": {"act_bits": 8, "act_mode": "dynamic_per_token"},
}
RANKS = (None, 8, 16, 32)
ROTATIONS = (None, "quip")


def run_quality(out: list[dict], ranks=RANKS, rotations=ROTATIONS, settings=tuple(ACTS), group_size: int = 128,
                energy: float | None = None) -> None:
    """Calibrate and evaluate every (setting, rotation, rank); with ``energy``, each layer's rank
    is ``lowrank.choose_ranks``'s (the smallest holding that share of the weight's energy, capped
    by the rank given)."""
    from quality import LlamaBench

    from piecewise_quant.evaluate import calibration_text, perplexity

    bench = LlamaBench(None)
    f_ppl = perplexity(bench.model, input_ids=bench.input_ids)
    out.append({"setting": "float", "rotation": None, "rank": None, "ppl": f_ppl, "bpw": 32.0})
    print(f"float: held-out {f_ppl:.3f}", file=sys.stderr, flush=True)
    text = calibration_text()
    for setting in settings:
        for rotation in rotations:
            for r in ranks:
                model = copy.deepcopy(bench.model)
                cfg = pq.PiecewiseQuantConfig(
                    grid="uniform", bits=4, group_size=group_size, low_rank=r, rotation=rotation, **ACTS[setting],
                    calibration=pq.CalibrationConfig.preset("gptq", n_samples=32, seq_len=256),
                )
                if energy is not None:
                    from piecewise_quant.lowrank import choose_ranks

                    cfg = choose_ranks(model, cfg, energy)
                t0 = time.perf_counter()
                pq.calibrate(model, cfg, text, tokenizer=bench.tokenizer, progress=False)
                qs = time.perf_counter() - t0
                ppl = perplexity(model, input_ids=bench.input_ids)
                bpw = pq.model_size_report(model).bits_per_weight
                label = f"<= {r}, energy {energy:g}" if energy is not None and r else (r or 0)
                out.append({"setting": setting, "group_size": group_size, "rotation": rotation, "rank": label, "ppl": ppl,
                            "delta": ppl - f_ppl, "bpw": bpw, "quant_s": qs})
                print(f"{setting} g{group_size} rotation={rotation} rank={label}: {ppl:.3f} ({ppl - f_ppl:+.3f}), "
                      f"{bpw:.3f} bits/weight, {qs:.0f} s", file=sys.stderr, flush=True)


def _interleaved_ms(fns: list, x: torch.Tensor, repeat: int) -> list[float]:
    """Median milliseconds per call of each of ``fns``, called in turn within every repetition
    (the machine is shared: a slow period then hits all of them, not one)."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            for _ in range(3):
                fn(x)
        for _ in range(repeat):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn(x)
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def run_cost(out: list[dict], size: int = 4096, repeat: int = 50, ranks=(16, 32, 64)) -> None:
    from piecewise_quant import lowrank
    from piecewise_quant.kernels import lowrank_add
    from piecewise_quant.qlinear import ensure_runtime
    from piecewise_quant.quantization import layer_spec_for

    ensure_runtime()
    torch.manual_seed(0)
    w = torch.randn(size, size) * 0.02
    fmt = pq.get_format("uniform")
    base = pq.QuantSpec(grid="uniform", bits=4, group_size=128, observer="minmax")
    plain_layer = layer_spec_for("bench", base, size, size)
    tensors = fmt.quantize(w, plain_layer)
    dense = pq.QuantLinear.empty(plain_layer, fmt, bias=False)
    dense.load_quantized(tensors)
    g = torch.Generator().manual_seed(1)
    for r in ranks:
        layer = layer_spec_for("bench", base.with_changes({"low_rank": r}), size, size)
        q = pq.QuantLinear.empty(layer, fmt, bias=False)
        q.load_quantized({**tensors, "lowrank_a": (torch.randn(size, r, generator=g) * 0.05).half(),
                          "lowrank_b": (torch.randn(r, size, generator=g) * 0.05).half()})
        assert lowrank.rank(layer) == r
        a32, b32 = q.lowrank_a.float(), q.lowrank_b.float()
        for m in (1, 64):
            x = torch.randn(m, size)
            acc = torch.zeros(m, size)
            fns = [dense, q, lambda v: lowrank.branch(v, a32, b32)]
            kernel = lowrank_add.add(acc, x, q.lowrank_a, q.lowrank_b) is not None  # the C kernel takes <= 16 rows
            if kernel:
                fns.append(lambda v: lowrank_add.add(acc, v, q.lowrank_a, q.lowrank_b))
            d, s, br, *kr = _interleaved_ms(fns, x, repeat)
            row = {"rank": r, "m": m, "dense_ms": d, "with_low_rank_ms": s, "branch_ms": br, "overhead": s / d - 1,
                   "branch_share": br / d, "branch_kernel_ms": kr[0] if kr else None,
                   "bpw_dense": fmt.bits_per_weight(plain_layer), "bpw": fmt.bits_per_weight(layer)}
            out.append(row)
            alone = f", the C kernel's {kr[0]:.3f} ms" if kr else ""
            print(f"cost rank {r} M={m}: {d:.3f} ms dense, {s:.3f} ms with the branch ({row['overhead']:+.0%}), "
                  f"branch alone {br:.3f} ms with float32 factors ({br / d:.0%} of dense){alone}",
                  file=sys.stderr, flush=True)


def run_svd(out: list[dict], size: int = 4096, ranks=(16, 32, 64)) -> None:
    """Seconds for the factors of a ``size`` x ``size`` weight: a full float64 SVD against
    ``lowrank.top_singular``'s randomized one, and how much farther from ``W`` the randomized
    rank-``r`` approximation is than the optimal one (a Gaussian weight: a flat spectrum, the
    hardest case for a randomized range finder)."""
    from piecewise_quant import lowrank

    w = torch.randn(size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.02
    t0 = time.perf_counter()
    _, s, _ = torch.linalg.svd(w, full_matrices=False)
    full_s = time.perf_counter() - t0
    for r in ranks:
        t0 = time.perf_counter()
        u, sr, vh = lowrank.top_singular(w, r)
        rand_s = time.perf_counter() - t0
        optimal = float(s[r:].square().sum().sqrt())
        err = float((w - (u * sr) @ vh).norm())
        out.append({"rank": r, "full_svd_s": full_s, "randomized_s": rand_s, "error_vs_optimal": err / optimal - 1})
        print(f"svd rank {r}: full {full_s:.1f} s, randomized {rand_s:.1f} s, error +{err / optimal - 1:.2e} of optimal",
              file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("quality", "cost", "svd", "all"), default="all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--equal-bits", action="store_true",
                    help="quality: rank 0 with groups of 32 instead of the rank sweep at groups of 128 (the bits a "
                         "branch costs spent on smaller groups)")
    ap.add_argument("--energy", type=float, default=None,
                    help="quality: W4A4 with each layer's rank chosen by lowrank.choose_ranks (this share of the "
                         "weight's energy, at most 32) instead of the rank sweep")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quality: list[dict] = []
    cost: list[dict] = []
    if args.part in ("quality", "all"):
        if args.equal_bits:  # the same settings without a branch, spending bits on smaller groups instead
            run_quality(quality, ranks=(None,), group_size=32)
        elif args.energy is not None:  # W4A4, ranks by energy (capped at 32)
            run_quality(quality, ranks=(32,), settings=("W4A4",), energy=args.energy)
        else:
            run_quality(quality)
        print("| setting | rotation | group | rank | held-out ppl | vs float | bits/weight |")
        print("|---|---|---|---|---|---|---|")
        for r in quality:
            if r["setting"] == "float":
                print(f"| float | | | | {r['ppl']:.3f} | | 32 |")
                continue
            print(f"| {r['setting']} | {r['rotation'] or 'none'} | {r['group_size']} | {r['rank']} | {r['ppl']:.3f} | "
                  f"{r['delta']:+.3f} | {r['bpw']:.3f} |")
    if args.part in ("cost", "all"):
        run_cost(cost, repeat=args.repeat)
        print(f"\n4096 x 4096 uniform W4 g128, {args.threads} thread(s), median ms per call\n")
        print("| rank | M | dense (ms) | + low-rank (ms) | overhead | branch alone, float32 factors (ms, share of dense) "
              "| branch alone, C kernel on the float16 factors (ms) | bits/weight |")
        print("|---|---|---|---|---|---|---|---|")
        for r in cost:
            kernel = "-" if r["branch_kernel_ms"] is None else f"{r['branch_kernel_ms']:.3f}"
            print(f"| {r['rank']} | {r['m']} | {r['dense_ms']:.3f} | {r['with_low_rank_ms']:.3f} | {r['overhead']:+.0%} | "
                  f"{r['branch_ms']:.3f} ({r['branch_share']:.0%}) | {kernel} | {r['bpw_dense']:.3f} -> {r['bpw']:.3f} |")
    svd: list[dict] = []
    if args.part == "svd":  # not in "all": the full SVD alone takes over a minute
        run_svd(svd)
        print(f"\n4096 x 4096 float64, {args.threads} thread(s)\n")
        print("| rank | full SVD (s) | randomized (s) | rank-r error vs optimal |")
        print("|---|---|---|---|")
        for r in svd:
            print(f"| {r['rank']} | {r['full_svd_s']:.1f} | {r['randomized_s']:.1f} | +{r['error_vs_optimal']:.2e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"quality": quality, "cost": cost, "svd": svd}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
