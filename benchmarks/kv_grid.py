"""W x A x KV evaluation grid on the bundled tiny Llama (QLLM-Eval's axes), plus the issue-19 KV targets.

The grid is :mod:`piecewise_quant.integrations.transformers.kv_grid` (the same one
``piecewise-quant eval --grid`` runs, on any float causal LM); this script runs it on the bundled
model with the issue's settings and adds the KV targets (KIVI perplexity, measured memory,
decode speed, piecewise vs uniform K/V grids).

Weights and activations: data-free ``piecewise_quant.quantize`` with the default (piecewise) grid,
``lm_head`` in float; no calibration text is used (the held-out split is only evaluated). KV:

* ``KV8`` / ``KV4``: QLLM-Eval's protocol, ``kv_fake_quant``: every post-RoPE K/V quantized as it
  enters the cache, asymmetric, per token in groups of head_dim (64), no residual window;
* ``KIVI2`` (KV part ``KV2 (KIVI)``; and the KIVI rows of the targets): the real ``QuantizedKVCache`` (keys per
  channel, values per token, G32, full-precision residual R); perplexity is computed feeding each
  window in chunks of 32 tokens through the cache (a query never sees an unfinished key block
  quantized, as in generation).

Columns: held-out perplexity (``piecewise_quant.evaluate``: non-overlapping 256-token windows of
the held-out ``pydoc_data.topics`` split; the evaluate module offers no out-of-domain text),
its increase over float, the repetition of greedy generations (rep-4: the share of generated
4-grams that already occurred in the same continuation; rep-line: the share of generated
non-empty lines repeating an earlier one), KV bytes per token (measured: allocated bytes of the
cache after a prefill of ``--ctx`` tokens, divided by the tokens; for fake-quant rows the real
cache with the same storage) and weight bytes (allocated bytes of parameters and buffers).

Usage (repository root)::

    python benchmarks/kv_grid.py                 # full grid + targets, markdown to stdout (~5 min, 2 cores)
    python benchmarks/kv_grid.py --quick         # a few windows and rows (the test uses it)
    python benchmarks/kv_grid.py --markdown docs/results/kv_grid.md --plot docs/kv_grid.png
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import importlib.util
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from piecewise_quant.args import KVArgs
from piecewise_quant.evaluate import default_model_path, heldout_text, perplexity
from piecewise_quant.integrations.transformers import kv_grid

WINDOW = 256
KV8 = KVArgs(bits=8, key_axis="token", group_size=64, residual_length=0)
KV4 = KVArgs(bits=4, key_axis="token", group_size=64, residual_length=0)
KIVI = {b: KVArgs(bits=b, key_axis="channel", group_size=32, residual_length=128) for b in (2, 4)}
QUICK_SETTINGS = ("float", "KV4", "KIVI2", "W4A8", "W4A8KV4")

_cache_for = kv_grid.new_cache
ppl_with_cache = kv_grid.perplexity_through_cache


def kv_bytes_per_token(model: Any, kv: KVArgs | None, ctx: int, ids: torch.Tensor) -> float:
    """Measured cache bytes per token after a prefill of the first ``ctx`` tokens of ``ids``."""
    return kv_grid.kv_bytes_per_token(model, kv, ids[:, :ctx])


@dataclass
class Setup:
    model: Any
    tokenizer: Any
    windows: torch.Tensor
    prompts: torch.Tensor
    args: argparse.Namespace


def run_grid(s: Setup) -> dict[str, Any]:
    """The issue's settings (``--quick``: a few, on the uniform weight grid) through
    :func:`piecewise_quant.integrations.transformers.kv_grid.run_grid`."""
    names = QUICK_SETTINGS if s.args.quick else kv_grid.DEFAULT_SETTINGS
    settings = kv_grid.parse_settings(list(names), kv_grid.head_dim_of(s.model.config),
                                      "uniform" if s.args.quick else "piecewise")
    result = kv_grid.run_grid(s.model, s.tokenizer, s.windows, s.prompts, settings, new_tokens=s.args.new_tokens,
                              kv_context=s.windows.reshape(1, -1)[:, : s.args.ctx], progress=False)
    for wa, row in result.ppl.items():
        print(f"[kv_grid] {wa}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), file=sys.stderr)
    return result.to_dict()


# ---- the issue-19 targets ----------------------------------------------------------------------

MEMORY_SCHEMES = {
    "KIVI-4 G32 R128": KIVI[4],
    "KIVI-4 G64 R32": KVArgs(bits=4, group_size=64, residual_length=32),
    "int4 per-token G64 R0": KV4,
    "KIVI-2 G32 R128": KIVI[2],
    "int8 per-token G64 R0": KV8,
}


@torch.no_grad()
def memory_targets(s: Setup, contexts: list[int]) -> list[dict[str, Any]]:
    """KV bytes of each scheme over the fp16 cache, with the model in float16 (measured)."""
    half = copy.deepcopy(s.model).to(torch.float16)
    ids = s.windows.reshape(1, -1)
    out = []
    for ctx in contexts:
        fp16 = kv_bytes_per_token(half, None, ctx, ids)
        for name, kv in MEMORY_SCHEMES.items():
            q = kv_bytes_per_token(half, kv, ctx, ids)
            out.append(dict(ctx=ctx, scheme=name, bytes_per_token=q, fp16_bytes_per_token=fp16, ratio=q / fp16))
    return out


@torch.no_grad()
def speed_target(s: Setup, ctx: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """generate() tokens/s after a ``ctx``-token prompt: full-precision vs KIVI-4 cache (median of
    interleaved repeats, so that load from other processes hits both alike)."""
    prompt = s.windows.reshape(1, -1)[:, :ctx]
    times: dict[str, list[float]] = {"float cache": [], "KIVI-4 G32 R128": []}
    for _ in range(repeats):
        for name, kv in (("float cache", None), ("KIVI-4 G32 R128", KIVI[4])):
            t = time.perf_counter()
            s.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=2,
                             past_key_values=_cache_for(s.model, kv))
            times[name].append(time.perf_counter() - t)
    tps = {k: new_tokens / statistics.median(v) for k, v in times.items()}
    return dict(ctx=ctx, new_tokens=new_tokens, repeats=repeats, tokens_per_s=tps,
                ratio=tps["KIVI-4 G32 R128"] / tps["float cache"])


def format_fake_quant(grid: str, observer: str = "mse") -> Callable[[torch.Tensor, KVArgs, str], torch.Tensor]:
    """A ``kv_fake_quant`` quantizer with one of the project's weight formats: rows of head_dim
    values (per token and head), groups of ``kv.group_size`` (token axis only)."""
    from piecewise_quant.config import LayerSpec, QuantSpec
    from piecewise_quant.registry import get_format

    fmt = get_format(grid)

    def fq(x: torch.Tensor, kv: KVArgs, axis: str) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        spec = QuantSpec(grid=grid, bits=kv.bits, group_size=kv.group_size, observer=observer)
        layer = LayerSpec("kv", spec, in_features=rows.shape[1], out_features=rows.shape[0], group_size=kv.group_size)
        return fmt.dequantize(fmt.quantize(rows, layer), layer, torch.float32).reshape(x.shape).to(x.dtype)

    fq.bits_per_value = lambda kv: fmt.bits_per_weight(  # type: ignore[attr-defined]
        LayerSpec("kv", QuantSpec(grid=grid, bits=kv.bits, group_size=kv.group_size), kv.group_size * 8, 8, kv.group_size))
    return fq


@torch.no_grad()
def grid_comparison(s: Setup, n_windows: int) -> list[dict[str, Any]]:
    """Piecewise vs uniform grids for K/V at equal code bits, per token and head (groups of 64),
    QLLM-Eval protocol: relative squared error of the float model's post-RoPE K/V on
    ``n_windows`` held-out windows, and held-out perplexity on the same windows."""
    from piecewise_quant.integrations.transformers import kv_fake_quant
    from piecewise_quant.kv import fake_quantize_kv

    cache = _cache_for(s.model, None)
    windows = s.windows[:n_windows]
    s.model(windows, past_key_values=cache)
    def piecewise_cache(x: torch.Tensor, kv: KVArgs, axis: str) -> torch.Tensor:
        return fake_quantize_kv(x, dataclasses.replace(kv, grid="piecewise"), axis)

    piecewise_cache.bits_per_value = lambda kv: dataclasses.replace(kv, grid="piecewise").bits_per_value("token")
    grids = {"uniform min-max (cache)": fake_quantize_kv, "piecewise mse (cache, grid='piecewise')": piecewise_cache,
             "uniform mse (project format)": format_fake_quant("uniform"),
             "piecewise mse (project format)": format_fake_quant("piecewise")}
    out = [dict(bits=16, grid="float", bits_per_value=16.0, keys_rel_mse=0.0, values_rel_mse=0.0,
                ppl=perplexity(s.model, input_ids=windows.reshape(-1), window=WINDOW))]
    for bits in (4, 3, 2):
        kv = KVArgs(bits=bits, key_axis="token", group_size=64, residual_length=0)
        for name, fq in grids.items():
            err = {}
            for which in ("keys", "values"):
                x = torch.cat([getattr(layer, which) for layer in cache.layers], dim=0).float()
                err[which] = float(((fq(x, kv, "token") - x) ** 2).sum() / (x**2).sum())
            with kv_fake_quant(s.model, kv, fq):
                ppl = perplexity(s.model, input_ids=windows.reshape(-1), window=WINDOW)
            bpv = fq.bits_per_value(kv) if hasattr(fq, "bits_per_value") else kv.bits_per_value("token")
            out.append(dict(bits=bits, grid=name, bits_per_value=bpv, keys_rel_mse=err["keys"],
                            values_rel_mse=err["values"], ppl=ppl))
    return out


def run_targets(s: Setup, grid: dict[str, Any]) -> dict[str, Any]:
    base = grid["float_ppl"]
    kivi = {"KIVI-4 G32 R128": KIVI[4], "KIVI-4 G32 R32": KVArgs(bits=4, group_size=32, residual_length=32),
            "KIVI-4 piecewise G32 R32": KVArgs(bits=4, group_size=32, residual_length=32, grid="piecewise"),
            "KIVI-3 G32 R32": KVArgs(bits=3, group_size=32, residual_length=32),
            "KIVI-3 piecewise G32 R32": KVArgs(bits=3, group_size=32, residual_length=32, grid="piecewise")}
    if s.args.quick:
        kivi = {}
    t0 = time.perf_counter()

    def stage(name: str, value: Any) -> Any:
        nonlocal t0
        print(f"[kv_grid] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        t0 = time.perf_counter()
        return value

    ppl = stage("KIVI perplexity", {name: ppl_with_cache(s.model, s.windows, kv) for name, kv in kivi.items()})
    return dict(
        kv8_fake_delta_pct=100 * (grid["ppl"]["float"]["KV8"] / base - 1) if "KV8" in grid["ppl"]["float"] else None,
        kivi_ppl={k: dict(ppl=v, delta_pct=100 * (v / base - 1)) for k, v in ppl.items()},
        memory=stage("memory", memory_targets(s, [s.args.ctx] if s.args.quick else [1024, 2048])),
        speed=stage("speed", speed_target(s, s.args.ctx, s.args.speed_tokens, s.args.speed_repeats)),
        grids=stage("grids", [] if s.args.quick else grid_comparison(s, s.args.grid_windows)),
    )


# ---- recall on the long-context model -----------------------------------------------------------

RECALL_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-llama-recall"
MIN_FLOAT_RECALL = 0.5  # below it the float model does not recall, and a ratio to it means nothing
RECALL_KV = {"KV8": KV8, "KV4": KV4, "KV4 (KIVI)": KIVI[4], "KV2 (KIVI)": KIVI[2]}


def _recall_task() -> Any:
    """``benchmarks/recall_task.py`` (a sibling script, not a package)."""
    if "recall_task" not in sys.modules:
        spec = importlib.util.spec_from_file_location("recall_task", Path(__file__).with_name("recall_task.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["recall_task"]


@torch.no_grad()
def recall_grid(model_dir: Path, contexts: list[int], n: int) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on ``n`` held-out recall prompts per context: float,
    float seeing only the last 128 tokens (what a 128-token window alone could answer), and each
    KV setting both in the fake-quant mode (one forward with ``kv_fake_quant``) and through the
    real ``QuantizedKVCache`` in ``generate()``. ``early``: accuracy (real cache) on the prompts
    whose queried pair lies in the first quarter of the context."""
    from piecewise_quant.integrations.transformers import kv_fake_quant

    rt = _recall_task()
    model = rt.load_model(model_dir)
    rows = []
    for ctx in contexts:
        prompts, answers, where = rt.eval_prompts(n, ctx)
        early = where < rt.pairs_for(ctx) // 4

        def acc(pred: torch.Tensor, mask: torch.Tensor | None = None) -> float:
            hit = (pred == answers).float()
            return float(hit[mask].mean() if mask is not None else hit.mean())

        gen = rt.predict(model, prompts, generate=True, cache_factory=lambda: _cache_for(model, None))
        tail = torch.cat([torch.full((n, 1), rt.BOS), prompts[:, -127:]], dim=1)
        rows.append(dict(ctx=ctx, setting="float", kv_scheme="float", fake=acc(rt.predict(model, prompts)),
                         cache=acc(gen), early=acc(gen, early)))
        rows.append(dict(ctx=ctx, setting="float, last 128 tokens only", kv_scheme="float", fake=None,
                         cache=acc(rt.predict(model, tail)), early=acc(rt.predict(model, tail), early)))
        for name, kv in RECALL_KV.items():
            with kv_fake_quant(model, kv):
                fake = acc(rt.predict(model, prompts))
            gen = rt.predict(model, prompts, generate=True, cache_factory=lambda kv=kv: _cache_for(model, kv))
            rows.append(dict(ctx=ctx, setting=name, kv_scheme=kv.describe(), fake=fake, cache=acc(gen), early=acc(gen, early)))
        print(f"[kv_grid] recall at {ctx}: " + ", ".join(f"{r['setting']} {r['cache']:.3f}" for r in rows if r["ctx"] == ctx),
              file=sys.stderr)
    return dict(model=str(model_dir), contexts=contexts, n=n, rows=rows, early_prompts={c: int(
        (rt.eval_prompts(n, c)[2] < rt.pairs_for(c) // 4).sum()) for c in contexts})


@torch.no_grad()
def recall_by_setting(model_dir: Path, names: tuple[str, ...], context: int, n: int, weight_grid: str) -> dict[str, Any]:
    """The grid's recall column: exact-match accuracy of the recall model's greedy answers on ``n``
    held-out prompts of ``context`` tokens under each grid setting (its W/A part applied to the
    recall model with :func:`kv_grid.quantize_wa`; its KV part in fake-quant, or through the real
    cache in ``generate()`` for ``KIVI<b>``)."""
    rt = _recall_task()
    model = rt.load_model(model_dir)
    prompts, answers, _ = rt.eval_prompts(n, context)
    settings = kv_grid.parse_settings(list(names), kv_grid.head_dim_of(model.config), weight_grid)
    quantized: dict[str, Any] = {}
    rows = []
    for st in settings:
        if st.wa not in quantized:  # one quantized copy per W/A part, shared by its KV settings
            quantized[st.wa] = kv_grid.quantize_wa(model, st.weights)
        q = quantized[st.wa]
        if st.kv_protocol == "cache":
            pred = rt.predict(q, prompts, generate=True, cache_factory=lambda kv=st.kv, q=q: _cache_for(q, kv))
        else:
            pred = kv_grid.with_kv(q, st, lambda _, q=q: rt.predict(q, prompts))
        rows.append(dict(setting=st.name, accuracy=float((pred == answers).float().mean())))
    base = next(r["accuracy"] for r in rows if r["setting"] == "float")
    for r in rows:
        r["ratio"] = r["accuracy"] / base if base else 0.0
    print("[kv_grid] recall by setting: " + ", ".join(f"{r['setting']} {r['accuracy']:.3f}" for r in rows), file=sys.stderr)
    return dict(model=str(model_dir), context=context, n=n, weight_grid=weight_grid, rows=rows)


def recall_column_markdown(col: dict[str, Any]) -> list[str]:
    lines = ["", f"Recall column ({Path(col['model']).name}, {col['context']} tokens, {col['n']} held-out prompts; "
             f"W/A parts data-free on the {col['weight_grid']} grid, as above):", "",
             "| setting | recall | x float |", "|---|---|---|"]
    return lines + [f"| {r['setting']} | {r['accuracy']:.3f} | {r['ratio']:.3f} |" for r in col["rows"]]


def recall_markdown(recall: dict[str, Any]) -> list[str]:
    lines = ["", f"Recall ({Path(recall['model']).name}, {recall['n']} held-out prompts per context; accuracy of the "
             "greedy answer; early: prompts whose queried pair is in the first quarter of the context):", "",
             "| context | setting | KV scheme | fake-quant | real cache, generate() | early (real cache) |",
             "|---|---|---|---|---|---|"]
    for r in recall["rows"]:
        fake = "-" if r["fake"] is None else f"{r['fake']:.3f}"
        lines.append(f"| {r['ctx']} | {r['setting']} | {r['kv_scheme']} | {fake} | {r['cache']:.3f} | {r['early']:.3f} |")
    lines += ["", f"KV4 recall / float recall (target >= 0.95; judged only where float recall >= {MIN_FLOAT_RECALL}):", ""]
    for t in recall_targets(recall):
        verdict = ("not measurable: float recall is too low" if t["float"] < MIN_FLOAT_RECALL
                   else "met" if t["ratio"] >= 0.95 else "missed")
        lines.append(f"- {t['ctx']} tokens, {t['setting']} ({t['mode']}): {t['ratio']:.3f} (float {t['float']:.3f}; {verdict})")
    return lines


def recall_targets(recall: dict[str, Any]) -> list[dict[str, Any]]:
    """KV4 accuracy over float accuracy at each context: the fake-quant KV4 (QLLM-Eval) and the
    real KIVI-4 G32 R128 cache."""
    out = []
    for ctx in recall["contexts"]:
        rows = {r["setting"]: r for r in recall["rows"] if r["ctx"] == ctx}
        base = rows["float"]["cache"]
        for setting, mode in (("KV4", "fake"), ("KV4", "cache"), ("KV4 (KIVI)", "cache")):
            if setting in rows:
                out.append(dict(ctx=ctx, setting=setting, mode=mode, float=base,
                                ratio=rows[setting][mode] / base if base else 0.0))
    return out


# ---- output ------------------------------------------------------------------------------------


def markdown(grid: dict[str, Any], targets: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [kv_grid.grid_markdown(kv_grid.GridResult(**grid)).rstrip("\n")]
    lines += ["", "KIVI (real cache, chunked) perplexity:", ""]
    lines += [f"- {k}: {v['ppl']:.3f} ({v['delta_pct']:+.2f}%)" for k, v in targets["kivi_ppl"].items()]
    lines += ["", "| context | scheme | KV bytes/token | fp16 bytes/token | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {m['ctx']} | {m['scheme']} | {m['bytes_per_token']:.0f} | {m['fp16_bytes_per_token']:.0f} | {m['ratio']:.3f} |"
              for m in targets["memory"]]
    sp = targets["speed"]
    lines += ["", f"generate() at {sp['ctx']} tokens of context, {sp['new_tokens']} new tokens, median of {sp['repeats']}: "
              + ", ".join(f"{k} {v:.1f} tok/s" for k, v in sp["tokens_per_s"].items()) + f" (ratio {sp['ratio']:.2f})", "",
              "Grids for K/V (per token and head, QLLM-Eval protocol, first windows only):", "",
              "| bits | grid | bits/value | keys rel. MSE | values rel. MSE | ppl |", "|---|---|---|---|---|---|"]
    lines += [f"| {g['bits']} | {g['grid']} | {g['bits_per_value']:.2f} | {g['keys_rel_mse']:.5f} | "
              f"{g['values_rel_mse']:.5f} | {g['ppl']:.3f} |" for g in targets["grids"]]
    if targets.get("recall_by_setting"):
        lines += recall_column_markdown(targets["recall_by_setting"])
    if targets.get("recall"):
        lines += recall_markdown(targets["recall"])
    return "\n".join(lines) + "\n"


def plot(grid: dict[str, Any], path: Path) -> None:
    kv_grid.plot_grid(kv_grid.GridResult(**grid), path)


def setup(args: argparse.Namespace) -> Setup:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(tokenizer(heldout_text(), add_special_tokens=False)["input_ids"])
    n = ids.numel() // WINDOW
    windows = ids[: n * WINDOW].reshape(n, WINDOW)[: args.windows]
    # prompts: the first 32 tokens of evenly spread held-out windows
    step = max(1, n // args.prompts)
    prompts = ids[: n * WINDOW].reshape(n, WINDOW)[::step][: args.prompts, :32]
    return Setup(model, tokenizer, windows, prompts, args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few windows, W/A float and W4A8, KV -, KV4, KIVI-2")
    p.add_argument("--model", default=None, help="model folder (default: the bundled tiny-llama-pydoc)")
    p.add_argument("--windows", type=int, default=None, help="held-out windows for perplexity (default: all)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--ctx", type=int, default=1024, help="context for KV bytes and speed")
    p.add_argument("--speed-tokens", type=int, default=64)
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: tiny ops gain nothing from more, and a shared machine makes more threads spin)")
    p.add_argument("--grid-windows", type=int, default=8, help="windows for the piecewise-vs-uniform K/V comparison")
    p.add_argument("--recall-model", type=Path, default=RECALL_MODEL,
                   help="recall model folder (default: the bundled tiny-llama-recall)")
    p.add_argument("--recall-prompts", type=int, default=256, help="held-out recall prompts per context")
    p.add_argument("--recall-contexts", type=int, nargs="+", default=[512, 1024],
                   help="recall contexts in tokens (>= 512, so that KIVI's 128-token window does not cover them)")
    p.add_argument("--recall-only", action="store_true", help="only the recall table (no perplexity grid, no targets)")
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.windows = args.windows or 4
        args.prompts, args.new_tokens, args.ctx = min(args.prompts, 2), min(args.new_tokens, 16), min(args.ctx, 256)
        args.speed_tokens, args.speed_repeats = min(args.speed_tokens, 4), 1
        args.recall_prompts, args.recall_contexts = min(args.recall_prompts, 8), args.recall_contexts[:1]
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    recall = recall_grid(args.recall_model, args.recall_contexts, args.recall_prompts)
    if args.recall_only:
        text = "\n".join(recall_markdown(recall)[1:]) + "\n"
        print(text)
        if args.markdown:
            args.markdown.write_text(f"<!-- python benchmarks/kv_grid.py {' '.join(argv or sys.argv[1:])} -->\n" + text)
        if args.json:
            args.json.write_text(json.dumps(dict(recall=recall, recall_targets=recall_targets(recall)), indent=1))
        return 0
    s = setup(args)
    grid = run_grid(s)
    targets = run_targets(s, grid)
    targets["recall"] = recall
    targets["recall_targets"] = recall_targets(recall)
    targets["recall_by_setting"] = recall_by_setting(
        args.recall_model, QUICK_SETTINGS if args.quick else kv_grid.DEFAULT_SETTINGS, args.recall_contexts[-1],
        args.recall_prompts, "uniform" if args.quick else "piecewise")
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=platform.platform(),
                processor=platform.processor() or platform.machine(), threads=args.threads, torch=torch.__version__,
                windows=int(s.windows.shape[0]), prompts=int(s.prompts.shape[0]), new_tokens=args.new_tokens, ctx=args.ctx,
                seconds=round(time.perf_counter() - t0, 1),
                command="python benchmarks/kv_grid.py " + " ".join(argv or sys.argv[1:]))
    text = markdown(grid, targets, meta)
    print(text)
    print(f"[kv_grid] {meta['seconds']} s", file=sys.stderr)
    if args.markdown:
        args.markdown.write_text(f"<!-- {meta['command']} ; {meta['date']} ; {meta['machine']} -->\n" + text)
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, grid=grid, targets=targets), indent=1))
    if args.plot:
        plot(grid, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
