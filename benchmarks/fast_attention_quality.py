"""Quality of DiTFastAttn plans on a trained DiT with 256 image tokens: FLOPs saved against
classifier accuracy and FD, for thresholds 0..0.15, alone and with W8A8.

The 16-token ``dit-digits`` model cannot show anything about attention over many tokens, so this
script trains ``dit-digits16``: the same recipe (``benchmarks/dit_digits.py``: sklearn digits,
epsilon objective, 10% label dropout, EMA) on the digits upsampled to 16x16 (bilinear), with 1x1
patches, so attention runs over 256 tokens. Generated 16x16 images are average-pooled back to 8x8
and judged by ``dit_digits``' classifier (accuracy of the requested digit, FD in its feature space).

For each threshold the plan is searched (``pipe.enable_fast_attention``) on the 10 class labels at
the evaluation schedule (DDIM, 20 steps, guidance 2), then images are generated from the same noise
as the float row. ``attention FLOPs saved`` is the planned saving over the attention modules
(projections included, CFG batch of 2). ``predicted forward speed-up at 4,096 tokens`` applies the
plan's method mix to the per-method forward times measured by ``benchmarks/fast_attention.py`` on
the PixArt-Sigma-shaped model (``docs/fast_attention.json``): a prediction, not a measurement of this
model.

Usage::

    python benchmarks/fast_attention_quality.py train      # ~10 min on 2 shared cores; writes assets/dit-digits16/
    python benchmarks/fast_attention_quality.py evaluate   # ~10 min; writes docs/fast_attention_quality.json and .png
    python benchmarks/fast_attention_quality.py --quick    # seconds: tiny training + one threshold (the test runs it)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import dit_digits as bench  # noqa: E402

ASSET = REPO / "assets" / "dit-digits16"
DOCS = REPO / "docs"
MODEL_CONFIG = dict(
    num_attention_heads=2, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=4, sample_size=16,
    patch_size=1, num_embeds_ada_norm=bench.NUM_CLASSES, norm_type="ada_norm_zero", dropout=0.0,
)
QUICK_CONFIG = dict(MODEL_CONFIG, num_attention_heads=1, attention_head_dim=16, num_layers=2)
THRESHOLDS = (0.0, 0.025, 0.05, 0.075, 0.1, 0.15)


def load_digits16() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _orig_load()
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False).clamp(-1, 1), y


_orig_load = bench.load_digits_tensors


def to8(images: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(images).unsqueeze(1)
    return F.avg_pool2d(t, 2).squeeze(1).numpy()


def train(out: Path, steps: int, batch: int, quick: bool) -> dict[str, Any]:
    bench.load_digits_tensors = load_digits16
    try:
        return bench.train(out, steps=steps, batch_size=batch, lr=1e-3, seed=0,
                           model_config=QUICK_CONFIG if quick else MODEL_CONFIG)
    finally:
        bench.load_digits_tensors = _orig_load


def _predicted_speedup(plan, forward_rows: list[dict], tokens: int = 4096) -> float | None:
    """Forward-time ratio full / plan at ``tokens`` from the per-method times (every layer the same
    method), assuming identical layers: each (step, layer) cell costs its method's time / layers."""
    by = {r["method"]: r["seconds"] for r in forward_rows if r["tokens"] == tokens}
    if not by:
        return None
    t = {
        "full": by["full (diffusers processors, no fast attention)"], "full_res": by["full, also caching the window residual"],
        "wars": by["WA-RS (window + cached residual)"], "full+asc": by["full + ASC (one CFG branch)"],
        "wars+asc": by["WA-RS + ASC"], "ast": by["AST (reuse previous step's output)"],
    }
    total = 0.0
    rows = plan.methods
    for i, row in enumerate(rows):
        for j, m in enumerate(row):
            if m.startswith("full"):
                later = next((r[j] for r in rows[i + 1:] if r[j] != "ast"), "full")
                if later.startswith("wars"):
                    m = "full_res" if m == "full" else m  # full+asc computes the residual on one branch: close to full+asc
            total += t[m]
    return t["full"] * len(rows) * len(rows[0]) / total


def evaluate(model_path: Path, per_class: int, steps: int, guidance: float, thresholds: tuple[float, ...], quick: bool,
             thresholds_2d: tuple[float, ...] = ()) -> dict[str, Any]:
    import piecewise_quant as pq
    from piecewise_quant.integrations.diffusers import register_with_diffusers

    register_with_diffusers()
    judge = bench.DigitsJudge()
    pipe = bench.make_pipeline(bench.load_model(model_path))
    fwd_json = DOCS / "fast_attention.json"
    forward_rows = json.loads(fwd_json.read_text()).get("forward", []) if fwd_json.is_file() else []
    search = dict(calibration_prompts=list(range(10)), num_inference_steps=steps, guidance_scale=guidance, seed=12345,
                  calibration_batch_size=10)

    def gen() -> tuple[np.ndarray, np.ndarray, float]:
        t0 = time.perf_counter()
        images, labels = bench.generate(pipe, per_class, steps, guidance, seed=0)
        return to8(images), labels, time.perf_counter() - t0

    def row(name: str, images: np.ndarray, labels: np.ndarray, gen_s: float, **extra) -> dict[str, Any]:
        r = {"name": name, "accuracy": judge.accuracy(images, labels), "fd": judge.fd(images), "generate_s": round(gen_s, 1),
             **extra}
        if ref is not None:
            r["psnr_vs_float"] = bench.psnr(images, ref)
        print(f"  {name}: acc {r['accuracy']:.3f}  FD {r['fd']:.2f}"
              + (f"  saved {100 * extra['flops_saved']:.1f}%" if "flops_saved" in extra else ""), file=sys.stderr)
        return r

    ref = None
    images, labels, s = gen()
    results: dict[str, Any] = {
        "settings": {"per_class": per_class, "steps": steps, "guidance_scale": guidance, "scheduler": "DDIM", "eval_seed": 0,
                     "search": "10 class labels, 1 pipeline call, seed 12345",
                     "tokens": int(pipe.transformer.config.sample_size) ** 2},
        "judge": {"real_test_accuracy": judge.real_accuracy, "real_train_vs_test_fd": judge.real_split_fd},
        "rows": [row("float", images, labels, s)],
    }
    ref, results_labels = images, labels
    samples = {"float": images[::per_class]}
    plans = {}
    window_shapes = ("1d", "2d") if thresholds_2d else ("1d",)
    for shape in window_shapes:
        for delta in (thresholds if shape == "1d" else thresholds_2d):
            rep = pipe.enable_fast_attention(threshold=delta, window_shape=shape, **search)
            if all(m == "full" for r in rep.plan.methods for m in r):
                # an all-full plan runs the original processors: the float images, bit for bit
                images, labels, s = ref, results_labels, 0.0
            else:
                images, labels, s = gen()
            name = f"fast attention {shape}, delta {delta}"
            r = row(name, images, labels, s, threshold=delta, window_shape=shape, flops_saved=rep.attention_flops_saved,
                    methods=rep.method_counts, search_s=round(rep.wall_s, 1),
                    predicted_speedup_4096=_predicted_speedup(rep.plan, forward_rows))
            results["rows"].append(r)
            plans[name] = rep.plan.to_dict()
            samples[name] = images[::per_class]
            pipe.disable_fast_attention()
    # the smallest threshold (1-D window) that saves >= 40% of the attention FLOPs, alone and with W8A8
    fa_rows = [r for r in results["rows"] if r.get("window_shape") == window_shapes[0]]
    chosen = next((r for r in fa_rows if r["flops_saved"] >= 0.40), fa_rows[-1])
    results["chosen_threshold"] = chosen["threshold"]
    w8a8 = pq.PiecewiseQuantConfig(bits=8, grid="uniform", group_size="channel", act_bits=8, modules_to_not_convert=[])
    pipe.enable_quant(w8a8, progress=False)
    images, labels, s = gen()
    results["rows"].append(row("W8A8 dynamic per-token", images, labels, s))
    rep = pipe.enable_fast_attention(threshold=chosen["threshold"], window_shape=window_shapes[0], **search)
    images, labels, s = gen()
    results["rows"].append(row(f"W8A8 + fast attention {window_shapes[0]}, delta {chosen['threshold']}", images, labels, s,
                               threshold=chosen["threshold"], flops_saved=rep.attention_flops_saved, methods=rep.method_counts))
    samples["W8A8 + fast attention"] = images[::per_class]
    pipe.disable_fast_attention()
    pipe.disable_quant()
    results["plans"] = plans
    results["samples"] = samples
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["| configuration | attention FLOPs saved | accuracy | FD | PSNR vs float (dB) "
             "| predicted forward speed-up, 4,096 tokens |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        saved = f"{100 * r['flops_saved']:.1f}%" if "flops_saved" in r else "—"
        p = r.get("psnr_vs_float")
        p = "—" if p is None else ("inf" if p == float("inf") else f"{p:.1f}")
        sp = r.get("predicted_speedup_4096")
        lines.append(f"| {r['name']} | {saved} | {r['accuracy']:.3f} | {r['fd']:.2f} | {p} "
                     f"| {'—' if sp is None else f'{sp:.2f}x'} |")
    j = results["judge"]
    lines.append("")
    lines.append(f"Judge: {j['real_test_accuracy']:.3f} accuracy on held-out real digits; "
                 f"FD between real train and test digits {j['real_train_vs_test_fd']:.2f}.")
    lines.append(f"Chosen threshold (smallest with >= 40% attention FLOPs saved, 1-D window): {results['chosen_threshold']}")
    return "\n".join(lines)


def save_outputs(results: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results.pop("samples")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fast_attention_quality.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    base = results["rows"][0]
    for shape, marker in (("1d", "o-"), ("2d", "s--")):
        rows = [r for r in results["rows"] if r.get("window_shape") == shape]
        if not rows:
            continue
        xs = [100 * r["flops_saved"] for r in rows]
        axes[0].plot(xs, [r["accuracy"] for r in rows], marker, label=f"{shape} window")
        axes[1].plot(xs, [r["fd"] for r in rows], marker, label=f"{shape} window")
        for r, x in zip(rows, xs):
            axes[0].annotate(f"{r['threshold']}", (x, r["accuracy"]), fontsize=6)
    axes[0].axhline(base["accuracy"], color="gray", lw=0.8, label="float")
    axes[0].axhline(base["accuracy"] - 0.02, color="gray", lw=0.8, ls=":", label="float - 2 points")
    axes[1].axhline(base["fd"], color="gray", lw=0.8, label="float")
    axes[1].axhline(base["fd"] * 1.1, color="gray", lw=0.8, ls=":", label="float + 10%")
    axes[0].set(xlabel="attention FLOPs saved (%)", ylabel="classifier accuracy", title="accuracy (labels: threshold)")
    axes[1].set(xlabel="attention FLOPs saved (%)", ylabel="FD (classifier features)", title="FD")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.suptitle("DiTFastAttn on dit-digits16 (256 tokens), thresholds 0..0.15", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "fast_attention_quality.png", dpi=110)
    plt.close(fig)
    names = list(samples)
    fig, axes = plt.subplots(len(names), 10, figsize=(7, len(names) * 0.75))
    axes = np.atleast_2d(axes)
    for i, name in enumerate(names):
        for k in range(10):
            axes[i, k].imshow(samples[name][k], cmap="gray_r", vmin=0, vmax=1)
            axes[i, k].set_xticks([])
            axes[i, k].set_yticks([])
        axes[i, 0].set_ylabel(name.replace("fast attention", "FA"), rotation=0, ha="right", va="center", fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "fast_attention_samples.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", choices=["train", "evaluate", "all"], default="all")
    ap.add_argument("--steps", type=int, default=1200, help="training steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)), help="1-D window thresholds")
    ap.add_argument("--thresholds-2d", default="0.05,0.1", help="2-D window thresholds ('' for none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="output folder (default: assets/dit-digits16 and docs/)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = Path(args.out) / "model" if args.out else ASSET
    docs_dir = Path(args.out) if args.out else DOCS
    if args.quick:
        args.steps, args.batch, args.per_class = 20, 16, 2
    if args.command in ("train", "all") or args.quick:
        info = train(model_dir, args.steps, args.batch, args.quick)
        print(json.dumps({k: info[k] for k in ("steps", "train_wall_s", "final_loss_avg_last_500", "parameters")}),
              file=sys.stderr)
    if args.command in ("evaluate", "all") or args.quick:
        floats = lambda text: tuple(float(t) for t in text.split(",") if t.strip())  # noqa: E731
        res = evaluate(model_dir, args.per_class, 4 if args.quick else 20, 2.0,
                       (0.0, 0.15) if args.quick else floats(args.thresholds),
                       args.quick, (0.15,) if args.quick else floats(args.thresholds_2d))
        print(table(res))
        save_outputs(res, docs_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
