"""The W x A x KV evaluation grid (QLLM-Eval's axes): one float causal LM, quantized in turn by
weights (W), weights and activations (WA) and the KV cache (KV), each setting measured by held-out
perplexity, the repetition of greedy generations, KV bytes per token and weight bytes.

A setting is named the way papers write it: ``float``, ``W8``, ``W4A8``, ``KV4``, ``W8KV4``,
``W4A8KV4``, ``KIVI2``... (:func:`parse_setting`).

* ``W<b>``: data-free :func:`piecewise_quant.quantize` of every Linear but ``lm_head`` with
  ``bits=b`` on the chosen weight grid (piecewise by default), group size 128 (or per channel
  where 128 does not divide a layer);
* ``A<b>``: plus ``act_bits=b`` (dynamic per-token activations; needs a ``W`` part);
* ``KV<b>`` / ``KVfp8``: QLLM-Eval's protocol through :func:`kv_fake_quant`: every post-RoPE key
  and value quantized as it enters the cache, asymmetric, per token in groups of the head size,
  no residual window and no sink tokens;
* ``KIVI<b>``: the real :class:`QuantizedKVCache` (keys per channel in blocks of 32 tokens,
  values per token in groups of 32, the 128 newest tokens in full precision); perplexity then
  feeds each window in chunks of 32 tokens through the cache, so that a query never sees an
  unfinished key block quantized, as in generation.

Perplexity is computed for every combination of the W/A parts and KV parts named (the heat map);
the table has one row per named setting. Used by ``piecewise-quant eval --grid`` and
``benchmarks/kv_grid.py``.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from piecewise_quant.args import KVArgs
from piecewise_quant.evaluate import perplexity
from piecewise_quant.kv import storage_bytes

DEFAULT_SETTINGS = ("float", "W8", "W4", "W3", "W8A8", "W4A8", "KV8", "KV4", "KIVI2", "W8KV4", "W4A8KV4")
CHUNK = 32
KIVI_GROUP, KIVI_RESIDUAL = 32, 128
_SETTING = re.compile(r"^(?:W(?P<w>\d+))?(?:A(?P<a>\d+))?(?:KV(?P<kv>\d+|fp8)|KIVI(?P<kivi>\d+))?$", re.IGNORECASE)
SETTING_HELP = ("float, or W<bits>, W<bits>A<bits>, KV<bits> (QLLM-Eval: per token, no residual), KVfp8, "
                "KIVI<bits> (the real cache: keys per channel, G32, R128) and their concatenations, e.g. W4A8KV4")


@dataclass(frozen=True)
class GridSetting:
    """One point of the grid: a name, its W/A part and its KV part.

    Attributes:
        name: as written by the user, e.g. ``"W4A8KV4"``.
        wa: the W/A part's name (``"float"``, ``"W4"``, ``"W4A8"``...).
        weights: :class:`~piecewise_quant.PiecewiseQuantConfig` fields of the W/A part
            (``None``: float weights and activations).
        kv_name: the KV part's name (``"-"``: a full-precision cache).
        kv: the KV scheme (``None``: full precision).
        kv_protocol: ``"fake"`` (QLLM-Eval fake quantization), ``"cache"`` (the real quantized
            cache) or ``"-"``.
    """

    name: str
    wa: str
    weights: dict[str, Any] | None
    kv_name: str
    kv: KVArgs | None
    kv_protocol: str


def parse_setting(name: str, head_dim: int, weight_grid: str = "piecewise") -> GridSetting:
    """``"W4A8KV4"`` -> its :class:`GridSetting` for a model whose attention heads have
    ``head_dim`` channels (the QLLM-Eval KV group). Raises ``ValueError`` naming the setting and
    the grammar when it cannot be read."""
    text = name.strip()
    m = _SETTING.match(text)
    if text.lower() in ("float", "fp16", "fp32", "bf16"):
        return GridSetting(text, "float", None, "-", None, "-")
    if not text or m is None or not any(m.groupdict().values()):
        raise ValueError(f"grid setting {name!r} is not understood; write {SETTING_HELP}")
    w, a, kv_bits, kivi = m["w"], m["a"], m["kv"], m["kivi"]
    if a and not w:
        raise ValueError(f"grid setting {name!r}: activation bits need weight bits too (e.g. W8A8); "
                         "activations are quantized inside the quantized Linear layers")
    weights = None
    wa = f"W{w}" + (f"A{a}" if a else "") if w else "float"
    try:
        if w:
            weights = _wa_fields(int(w), int(a) if a else None, weight_grid)
        if kv_bits:
            fp8 = kv_bits.lower() == "fp8"
            kv = KVArgs(bits=8 if fp8 else int(kv_bits), format="fp8" if fp8 else "int", key_axis="token",
                        group_size=head_dim, residual_length=0)
            return GridSetting(text, wa, weights, "KVfp8" if fp8 else f"KV{kv_bits}", kv, "fake")
        if kivi:
            kv = KVArgs(bits=int(kivi), key_axis="channel", group_size=KIVI_GROUP, residual_length=KIVI_RESIDUAL)
            return GridSetting(text, wa, weights, f"KV{kivi} (KIVI)", kv, "cache")
    except ValueError as exc:
        raise ValueError(f"grid setting {name!r}: {exc}") from None
    return GridSetting(text, wa, weights, "-", None, "-")


def _wa_fields(bits: int, act_bits: int | None, weight_grid: str) -> dict[str, Any]:
    """The PiecewiseQuantConfig fields of a W/A part, validated now (a wrong bit width fails
    before any model is loaded)."""
    from piecewise_quant.config import PiecewiseQuantConfig
    from piecewise_quant.registry import get_format

    fields: dict[str, Any] = dict(bits=bits, grid=weight_grid)
    if act_bits is not None:
        fields["act_bits"] = act_bits
    config = PiecewiseQuantConfig(**fields)
    get_format(config.grid).validate(config.default_spec)
    return fields


def parse_settings(names: str | list[str] | tuple[str, ...], head_dim: int, weight_grid: str = "piecewise") -> list[GridSetting]:
    """A comma-separated string (or a list) of setting names, parsed; duplicates are an error."""
    items = [n for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not items:
        raise ValueError(f"no grid setting given; write a comma-separated list of {SETTING_HELP}")
    settings = [parse_setting(n, head_dim, weight_grid) for n in items]
    seen: set[tuple[str, str]] = set()
    for s in settings:
        if (s.wa, s.kv_name) in seen:
            raise ValueError(f"grid setting {s.name!r} is listed twice (as {s.wa} with KV {s.kv_name})")
        seen.add((s.wa, s.kv_name))
    return settings


def head_dim_of(config: Any) -> int:
    """The attention head size of a transformers config."""
    hd = getattr(config, "head_dim", None)
    if not hd:
        hd = config.hidden_size // config.num_attention_heads
    return int(hd)


# ---- measurements ------------------------------------------------------------------------------


def new_cache(model: Any, kv: KVArgs | None) -> Any:
    """A fresh cache for ``model``: transformers' ``DynamicCache`` (``kv=None``) or a
    :class:`QuantizedKVCache`."""
    from transformers import DynamicCache

    from .kv_cache import QuantizedKVCache

    return DynamicCache(config=model.config) if kv is None else QuantizedKVCache(kv, model.config)


@torch.no_grad()
def perplexity_through_cache(model: Any, windows: torch.Tensor, kv: KVArgs, batch_size: int = 16) -> float:
    """:func:`piecewise_quant.evaluate.perplexity`'s protocol (mean loss per window, then the
    exponent of the mean), each window fed ``CHUNK`` tokens at a time through a fresh quantized cache."""
    losses = []
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size]
        cache = new_cache(model, kv)
        logits = torch.cat(
            [model(batch[:, s : s + CHUNK], past_key_values=cache).logits for s in range(0, batch.shape[1], CHUNK)], dim=1
        )[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        losses.append(loss.reshape(batch.shape[0], -1).mean(dim=1))
    return math.exp(float(torch.cat(losses).mean()))


def with_kv(model: Any, setting: GridSetting, fn: Callable[[KVArgs | None], Any]) -> Any:
    """``fn(kv_for_a_real_cache_or_None)`` with the setting's KV part active: inside
    :func:`kv_fake_quant` for the fake protocol, with the scheme passed on for the real cache."""
    from .kv_cache import kv_fake_quant

    if setting.kv_protocol == "fake":
        with kv_fake_quant(model, setting.kv):
            return fn(None)
    return fn(setting.kv if setting.kv_protocol == "cache" else None)


def grid_perplexity(model: Any, windows: torch.Tensor, setting: GridSetting) -> float:
    """Perplexity of ``model`` (already carrying the setting's W/A part) on ``windows``
    (``(n, window)`` token ids) with the setting's KV part."""
    if setting.kv_protocol == "cache":
        return perplexity_through_cache(model, windows, setting.kv)
    return with_kv(model, setting, lambda _: perplexity(model, input_ids=windows.reshape(-1), window=windows.shape[1]))


def repetition(continuations: list[list[int]], tokenizer: Any) -> tuple[float, float]:
    """QLLM-Eval's dialogue finding made measurable, averaged over the continuations: (rep-4, the
    share of generated 4-grams already seen in the same continuation; rep-line, the share of
    generated non-empty lines repeating an earlier one)."""
    rep4, rep_line = [], []
    for ids in continuations:
        grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
        rep4.append(1 - len(set(grams)) / len(grams) if grams else 0.0)
        lines = [ln.strip() for ln in tokenizer.decode(ids).splitlines() if ln.strip()]
        rep_line.append(1 - len(set(lines)) / len(lines) if lines else 0.0)
    return statistics.fmean(rep4), statistics.fmean(rep_line)


@torch.no_grad()
def greedy_continuations(model: Any, prompts: torch.Tensor, setting: GridSetting, new_tokens: int) -> list[list[int]]:
    """``new_tokens`` greedy tokens after each prompt (``(n, len)`` ids), with the setting's KV part."""
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else 0

    def run(kv: KVArgs | None) -> torch.Tensor:
        extra = {} if kv is None else {"past_key_values": new_cache(model, kv)}
        return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, **extra)

    return with_kv(model, setting, run)[:, prompts.shape[1] :].tolist()


@torch.no_grad()
def kv_bytes_per_token(model: Any, kv: KVArgs | None, ids: torch.Tensor) -> float:
    """Allocated bytes of a cache (``kv=None``: full precision) after a prefill of ``ids``
    (``(1, ctx)``), per token: measured, not computed."""
    from .kv_cache import cache_bytes

    cache = new_cache(model, kv)
    model(ids, past_key_values=cache)
    return cache_bytes(cache) / ids.shape[1]


def weight_bytes(model: Any) -> int:
    """Allocated bytes of ``model``'s parameters and buffers (packed codes and scales included)."""
    return storage_bytes([*model.parameters(), *model.buffers()])


# ---- the grid ----------------------------------------------------------------------------------


@dataclass
class GridResult:
    """What :func:`run_grid` measured.

    Attributes:
        rows: one dict per setting: ``setting``, ``weights_acts``, ``kv``, ``kv_scheme``,
            ``kv_protocol``, ``ppl``, ``ppl_delta_pct`` (over float), ``rep4``, ``rep_line``,
            ``kv_bytes_per_token``, ``weight_bytes``.
        ppl: perplexity for every W/A part (outer key) and KV part (inner key, ``"-"``: float KV).
        float_ppl: the float model's perplexity.
        windows, window, prompts, new_tokens, kv_context: what was measured on.
    """

    rows: list[dict[str, Any]]
    ppl: dict[str, dict[str, float]]
    float_ppl: float
    windows: int
    window: int
    prompts: int
    new_tokens: int
    kv_context: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(rows=self.rows, ppl=self.ppl, float_ppl=self.float_ppl, windows=self.windows, window=self.window,
                    prompts=self.prompts, new_tokens=self.new_tokens, kv_context=self.kv_context, meta=self.meta)


def quantize_wa(float_model: Any, weights: dict[str, Any] | None) -> Any:
    """A quantized copy of ``float_model`` with the W/A fields ``weights`` (``None``: the float
    model itself). ``lm_head`` stays float; group 128, or per channel where 128 does not divide."""
    import piecewise_quant as pq

    if weights is None:
        return float_model
    in_features = {m.in_features for n, m in float_model.named_modules()
                   if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    group = 128 if all(f % 128 == 0 for f in in_features) else "channel"
    return pq.quantize(copy.deepcopy(float_model), pq.PiecewiseQuantConfig(group_size=group, **weights), progress=False)


def _combinations(settings: list[GridSetting]) -> tuple[dict[str, GridSetting], dict[str, GridSetting]]:
    """The distinct W/A parts and KV parts named, each with a representative setting."""
    was: dict[str, GridSetting] = {"float": GridSetting("float", "float", None, "-", None, "-")}
    kvs: dict[str, GridSetting] = {"-": GridSetting("float", "float", None, "-", None, "-")}
    for s in settings:
        was.setdefault(s.wa, s)
        kvs.setdefault(s.kv_name, s)
    return was, kvs


def run_grid(model: Any, tokenizer: Any, windows: torch.Tensor, prompts: torch.Tensor, settings: list[GridSetting],
             new_tokens: int = 96, kv_context: torch.Tensor | None = None, progress: bool = True) -> GridResult:
    """Measure every setting on a float ``model``: perplexity over ``windows`` (``(n, window)``
    held-out token ids) for each W/A x KV combination, and for each named setting the repetition of
    ``new_tokens`` greedy tokens after each of ``prompts`` (``(n, len)``), the KV bytes per token
    after a prefill of ``kv_context`` (``(1, ctx)``, default the first window) and the weight bytes."""
    from tqdm.auto import tqdm

    was, kvs = _combinations(settings)
    kv_ids = windows[:1] if kv_context is None else kv_context
    ppl: dict[str, dict[str, float]] = {}
    rows = []
    bar = tqdm(total=len(was) * len(kvs) + len(settings), desc="grid", disable=not progress)
    for wa, rep in was.items():
        qmodel = quantize_wa(model, rep.weights)
        ppl[wa] = {}
        for kv_name, kv_rep in kvs.items():
            bar.set_postfix_str(f"{wa} x KV {kv_name}")
            ppl[wa][kv_name] = grid_perplexity(qmodel, windows, kv_rep)
            bar.update()
        for s in (s for s in settings if s.wa == wa):
            bar.set_postfix_str(f"{s.name}: generate")
            rep4, rep_line = repetition(greedy_continuations(qmodel, prompts, s, new_tokens), tokenizer)
            rows.append(dict(setting=s.name, weights_acts=wa, kv=s.kv_name, kv_protocol=s.kv_protocol,
                             kv_scheme="float" if s.kv is None else s.kv.describe(), ppl=ppl[wa][s.kv_name],
                             rep4=rep4, rep_line=rep_line, kv_bytes_per_token=kv_bytes_per_token(qmodel, s.kv, kv_ids),
                             weight_bytes=weight_bytes(qmodel)))
            bar.update()
        del qmodel
    bar.close()
    order = {s.name: i for i, s in enumerate(settings)}
    rows.sort(key=lambda r: order[r["setting"]])
    base = ppl["float"]["-"]
    for r in rows:
        r["ppl_delta_pct"] = 100 * (r["ppl"] / base - 1)
    return GridResult(rows, ppl, base, windows.shape[0], windows.shape[1], prompts.shape[0], new_tokens, kv_ids.shape[1])


# ---- output ------------------------------------------------------------------------------------


def grid_markdown(result: GridResult) -> str:
    """The settings table, then the W/A x KV perplexity matrix, as markdown."""
    lines = [f"float perplexity {result.float_ppl:.3f}; {result.windows} windows of {result.window} tokens; "
             f"{result.prompts} greedy generations of {result.new_tokens} tokens; KV bytes after {result.kv_context} tokens.",
             "", "| setting | KV scheme | KV protocol | ppl | Δ ppl | rep-4 | rep-line | KV bytes/token | weight bytes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        lines.append(f"| {r['setting']} | {r['kv_scheme']} | {r['kv_protocol']} | {r['ppl']:.3f} | {r['ppl_delta_pct']:+.2f}% | "
                     f"{r['rep4']:.3f} | {r['rep_line']:.3f} | {r['kv_bytes_per_token']:.0f} | {r['weight_bytes']:,} |")
    kvs = list(result.ppl["float"])
    lines += ["", "Perplexity, W/A (rows) x KV (columns):", "",
              "| W/A | " + " | ".join("float KV" if k == "-" else k for k in kvs) + " |", "|---" * (1 + len(kvs)) + "|"]
    for wa, row in result.ppl.items():
        lines.append(f"| {wa} | " + " | ".join(f"{row[k]:.3f}" for k in kvs) + " |")
    return "\n".join(lines) + "\n"


def plot_grid(result: GridResult, path: Path | str) -> Path:
    """A heat map (PNG) of the perplexity increase over float, W/A (rows) x KV (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was, kvs = list(result.ppl), list(result.ppl["float"])
    base = result.float_ppl
    data = [[100 * (result.ppl[w][k] / base - 1) for k in kvs] for w in was]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(kvs), 0.9 + 0.55 * len(was)))
    im = ax.imshow(data, cmap="Reds", aspect="auto")
    ax.set_xticks(range(len(kvs)), ["float KV" if k == "-" else k for k in kvs])
    ax.set_yticks(range(len(was)), was)
    top = max(max(row) for row in data) or 1.0
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:+.1f}%", ha="center", va="center", fontsize=9, color="white" if v > 0.6 * top else "black")
    ax.set_title(f"held-out perplexity increase over float ({base:.2f})")
    fig.colorbar(im, ax=ax, label="Δ ppl %")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
