"""Wall time and memory of calibrating the bundled model with each recipe (one process per recipe,
so the process peak RSS belongs to that recipe alone).

Usage (from the repository root)::

    python benchmarks/calibration_cost.py                       # aware, gptq, lwc, omniquant, mixed
    python benchmarks/calibration_cost.py --recipes gptq --n-samples 128

Prints a markdown table: calibration wall time, process peak RSS (model, torch and everything else
included), the most block inputs/outputs held at once, and the float model's size for scale.
Results are in ``docs/calibration.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES = {
    "load only (no calibration)": None,
    "aware": {},
    "gptq": {"gptq": True},
    "lwc": {"lwc": True},
    "omniquant": {"lwc": True, "let": True},
    "gptq + mixed 3.5": {"gptq": True, "mixed_precision_budget": 3.5},
}


def _one(recipe: str, n_samples: int, threads: int) -> dict:
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import piecewise_quant as pq
    from piecewise_quant.evaluate import default_model_path

    torch.set_num_threads(threads)
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    float_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if RECIPES[recipe] is None:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return {"recipe": recipe, "n_samples": 0, "wall_s": 0.0, "peak_rss_mb": rss, "held_mb": 0.0, "float_mb": float_mb}
    config = pq.PiecewiseQuantConfig(
        bits=3, group_size=128, calibration=pq.CalibrationConfig(n_samples=n_samples, **RECIPES[recipe])
    )
    t0 = time.perf_counter()
    report = pq.calibrate(model, config, tokenizer=tok, progress=False)
    return {
        "recipe": recipe, "n_samples": n_samples, "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": report.peak_rss_mb, "held_mb": report.peak_held_mb, "float_mb": float_mb,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma list of: " + ", ".join(RECIPES))
    p.add_argument("--n-samples", type=int, default=64, help="calibration samples of 256 tokens (default 64)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args.one, args.n_samples, args.threads)))
        return 0
    print("| recipe (3-bit g128 piecewise) | samples x tokens | wall time (s) | process peak RSS (MB) "
          "| block activations held (MB) |")
    print("|---|---|---:|---:|---:|")
    for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        if recipe not in RECIPES:
            raise SystemExit(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
        out = subprocess.run(
            [sys.executable, __file__, "--one", recipe, "--n-samples", str(args.n_samples), "--threads", str(args.threads)],
            capture_output=True, text=True, check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {recipe} | {r['n_samples']} x 256 | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['held_mb']:.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
