"""``piecewise-quant quantize``: quantize a float model (data-free on load, or calibrated) and save
it as a Hugging Face checkpoint. ``optimum-cli piecewise quantize`` parses the same options
(:func:`add_quantize_options`) and runs the same :func:`run`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from piecewise_quant.config import DEFAULT_CALIBRATION_PRESET

from .common import (
    CAUSAL_LM,
    DTYPES,
    TASKS,
    UserError,
    add_command,
    add_scheme_options,
    check_output,
    check_task,
    dir_bytes,
    load,
    model_dir,
    parse_group_size,
    perplexity,
    positive_int,
    read_text,
    token_ids,
    tokenizer,
)

EPILOG = """examples:
  piecewise-quant quantize --model assets/tiny-llama-pydoc --output out/pw4 --eval
  piecewise-quant quantize --model MODEL --output out/u3 --grid uniform --bits 3 --group-size 64
  piecewise-quant quantize --model MODEL --output out/gptq --calibration gptq --n-samples 32
  piecewise-quant quantize --model MODEL --output out/w4a8 --act-bits 8 --calibration-text my_corpus.txt

The output directory is a normal Hugging Face checkpoint: reload it with
AutoModelForCausalLM.from_pretrained(OUTPUT), or `piecewise-quant eval --model OUTPUT`."""


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
    add_scheme_options(p)
    p.add_argument("--ignore", action="append", metavar="PATTERN",
                   help="keep matching layers in float (glob, plain name or re:REGEX; repeatable; lm_head stays float)")
    p.add_argument("--override", action="append", metavar="PATTERN=KEY:VAL[,KEY:VAL]",
                   help="per-layer changes, e.g. '*.down_proj=bits:8,grid:uniform' (repeatable; first match wins)")
    p.add_argument("--act-bits", type=int, default=None, help="also quantize layer inputs: 8 or 4 (default: weight-only)")
    p.add_argument("--act-mode", default=None, choices=("dynamic_per_token", "dynamic_per_token_asym", "static_per_tensor"),
                   help="with --act-bits: dynamic_per_token (default), dynamic_per_token_asym (a scale and an offset "
                   "per token) or static_per_tensor (needs calibration)")
    p.add_argument("--calibration", default=None, metavar="PRESET",
                   help="data-aware calibration preset: default (GPTQ), aware, smoothquant, gptq, gptaq, lwc, "
                        "omniquant (default: data-free)")
    p.add_argument("--calibration-text", default=None, metavar="FILE",
                   help="UTF-8 text file to calibrate on (implies --calibration default unless given; default: bundled text)")
    p.add_argument("--n-samples", type=positive_int, default=None, help="calibration sequences (default 64)")
    p.add_argument("--tune-scales", action="store_true",
                   help="with calibration: then learn each block's stored group scales against the float block, codes "
                        "fixed (docs/calibration.md#scale-tuning)")
    p.add_argument("--act-clip-search", action="store_true",
                   help="with calibration and --act-bits: choose each layer's activation clip ratio on the calibration "
                        "rows (docs/calibration.md#activation-clip-search)")
    p.add_argument("--rotation", default=None, choices=("quarot", "quip"),
                   help="Hadamard rotations before quantizing: quarot (W4A4, Llama-family) or quip (2-3 bit weights, any "
                        "model); see docs/rotation.md")
    p.add_argument("--rotation-trials", type=positive_int, default=None, metavar="N",
                   help="with calibration and --rotation: calibrate with N rotation seeds and keep the one closest to "
                        "the float model on calibration windows held aside from the fit (N+1 calibrations; "
                        "docs/rotation.md#rotation-trials)")
    p.add_argument("--eval", action="store_true", help="also print held-out perplexity of the float and quantized model")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output directory")


def add_parser(sub) -> None:
    q = add_command(sub, "quantize", "quantize a model and save it as a Hugging Face checkpoint",
                    "Quantize a float model (data-free, or calibrated with --calibration / --calibration-text) "
                    "and save model + tokenizer to --output.", EPILOG)
    add_quantize_options(q)
    q.set_defaults(func=run)


def parse_override(value: str) -> tuple[str, dict]:
    """``PATTERN=KEY:VAL[,KEY:VAL...]``, e.g. ``*.down_proj=bits:8,grid:uniform``."""
    pattern, sep, rest = value.rpartition("=")
    if not sep or not pattern or not rest:
        raise UserError(f"--override {value!r}: expected PATTERN=KEY:VALUE[,KEY:VALUE...], "
                        "e.g. '*.down_proj=bits:8,grid:uniform'")
    changes: dict = {}
    for item in rest.split(","):
        key, colon, raw = item.partition(":")
        if not colon or not key or not raw:
            raise UserError(f"--override {value!r}: {item!r} is not KEY:VALUE")
        changes[key.strip()] = parse_value(raw.strip())
    return pattern, changes


def parse_value(raw: str):
    """An ``--override`` value: None, a bool, an int, a float, or else the string itself."""
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


def run(args: argparse.Namespace) -> int:
    """``piecewise-quant quantize`` (and ``optimum-cli piecewise quantize``)."""
    import piecewise_quant as pq

    model_path = model_dir(args.model)
    check_task(model_path, args.task)
    out = Path(args.output)
    check_output(out, args.overwrite, model_path)
    text = read_text(args.calibration_text, "--calibration-text") if args.calibration_text else None
    act_mode = _act_mode(args, text)
    tok_option = getattr(args, "tokenizer", None)
    tok_path = model_dir(tok_option, "--tokenizer") if tok_option else model_path
    config, calibration = _build_config(args, act_mode, text)

    tok = tokenizer(tok_path, tok_option or None)
    print(f"piecewise-quant quantize: {model_path} -> {out}")
    print(f"  grid={config.grid} bits={config.bits} group_size={config.group_size}"
          + (f" act_bits={config.act_bits} act_mode={config.act_mode}" if config.act_bits else "")
          + (f" calibration={args.calibration or DEFAULT_CALIBRATION_PRESET} on "
             f"{args.calibration_text or 'the bundled pydoc text'}" if calibration else " (data-free)")
          + (f" rotation={args.rotation}" if args.rotation else ""))
    start = time.perf_counter()
    model = _quantize_model(args, model_path, config, text, tok)
    seconds = time.perf_counter() - start
    try:  # written beside --output and renamed into place: an old checkpoint there is replaced whole
        pq.save_pretrained(model, out, tokenizer=tok, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        raise UserError(f"--output {out}: {exc}") from None
    _print_report(model, model_path, out, seconds)
    if args.eval and args.task != CAUSAL_LM:
        print("(--eval measures perplexity, which needs a causal LM: skipped)")
    elif args.eval:
        from piecewise_quant.evaluate import heldout_text

        ids = token_ids(tok, heldout_text())
        ppl_q, n = perplexity(model, ids, 256, None)
        del model  # before the float model is loaded
        ppl_f, _ = perplexity(load(model_path), ids, 256, None)
        print(f"held-out perplexity  {ppl_f:.3f} float -> {ppl_q:.3f} quantized ({ppl_q - ppl_f:+.3f}, {n} windows of 256)")
    print(f"saved to {out}")
    return 0


def _act_mode(args: argparse.Namespace, text: str | None) -> str:
    """The activation mode, after the checks of the options that go with it."""
    if args.act_bits is None and args.act_mode is not None:
        raise UserError("--act-mode applies to quantized activations: give --act-bits 8 or 4 with it (or drop it)")
    act_mode = args.act_mode or "dynamic_per_token"
    if args.n_samples is not None and args.calibration is None and text is None and act_mode != "static_per_tensor":
        raise UserError("--n-samples needs --calibration PRESET, --calibration-text FILE or --act-mode static_per_tensor")
    if args.tune_scales and args.calibration is None and text is None:
        raise UserError("--tune-scales tunes a calibrated model's scales: give --calibration PRESET or "
                        "--calibration-text FILE with it")
    if args.act_clip_search:
        if args.calibration is None and text is None:
            raise UserError("--act-clip-search chooses clip ratios on calibration data: give --calibration PRESET or "
                            "--calibration-text FILE with it")
        if args.act_bits is None or act_mode == "static_per_tensor":
            raise UserError("--act-clip-search chooses the clip ratio of dynamic activations: give --act-bits 4 (or 8) "
                            "with --act-mode dynamic_per_token or dynamic_per_token_asym")
    if args.rotation_trials is not None:
        if args.calibration is None and text is None:
            raise UserError("--rotation-trials compares calibrated models: give --calibration PRESET or "
                            "--calibration-text FILE with it")
        if args.rotation is None:
            raise UserError("--rotation-trials tries rotation seeds: give --rotation quarot (or quip) with it")
    return act_mode


def _build_config(args: argparse.Namespace, act_mode: str, text: str | None):
    """``(PiecewiseQuantConfig, CalibrationConfig or None)`` from the options, every scheme checked
    against its format before anything is loaded."""
    import piecewise_quant as pq

    try:
        calibration = None
        if args.calibration is not None or text is not None:
            changes = {} if args.n_samples is None else {"n_samples": args.n_samples}
            if args.tune_scales:
                changes["tune_scales"] = True
            if args.act_clip_search:
                changes["act_clip_search"] = True
            if args.rotation_trials is not None:
                changes["rotation_trials"] = args.rotation_trials
            calibration = pq.CalibrationConfig.preset(args.calibration or DEFAULT_CALIBRATION_PRESET, **changes)
        skip = None
        if args.ignore:
            from piecewise_quant.config import DEFAULT_MODULES_TO_NOT_CONVERT

            skip = [*(DEFAULT_MODULES_TO_NOT_CONVERT if args.task == CAUSAL_LM else ()), *args.ignore]
        overrides = dict(parse_override(v) for v in (args.override or []))
        config = pq.PiecewiseQuantConfig(
            grid=args.grid, bits=args.bits, group_size=parse_group_size(args.group_size),
            act_bits=args.act_bits, act_mode=act_mode, calibration=calibration, rotation=args.rotation,
            modules_to_not_convert=skip, overrides=overrides,
        )
        pq.get_format(config.grid).validate(config.default_spec)  # bits the grid lacks, before loading
        for pattern, spec in config.override_schemes.items():
            if spec is not None:
                try:
                    pq.get_format(spec.grid).validate(spec)
                except ValueError as exc:
                    raise ValueError(f"overrides[{pattern!r}]: {exc}") from None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return config, calibration


def _quantize_model(args: argparse.Namespace, model_path: Path, config, text: str | None, tok):
    """Calibrate on ``text``, or quantize on load (then set static activation scales from the
    bundled text if the config has them)."""
    import piecewise_quant as pq

    options = {"task": args.task, "dtype": args.dtype}
    try:
        if text is not None:
            model = load(model_path, **options)
            pq.calibrate(model, config, data=text, tokenizer=tok)
            return model
        model = load(model_path, quantization_config=config, **options)
        if any(q.act_scale is not None for q in pq.quantized_layers(model).values()):
            # static activation scales need data even without a calibration recipe
            from piecewise_quant.calibration.data import prepare_batches

            batches = prepare_batches(None, tokenizer=tok, n_samples=args.n_samples or 16, seq_len=256)
            n = pq.calibrate_activation_scales(model, batches)
            print(f"  static activation scales of {n} layers set from {len(batches)} batches of the bundled pydoc text")
        return model
    except ValueError as exc:  # a layer the config cannot handle, calibration text too short...
        raise UserError(str(exc)) from None


def _print_report(model, model_path: Path, out: Path, seconds: float) -> None:
    import piecewise_quant as pq

    report = pq.model_size_report(model)
    layers = pq.quantized_layers(model)
    print()
    print(f"quantized layers     {len(layers)}")
    print(f"bits/weight          {report.bits_per_weight:.3f} (quantized layers, metadata included)")
    if report.unsupported:
        print(f"                     {report.overall_bits_per_weight:.3f} over every weight matrix: "
              f"{len(report.unsupported)} of unsupported type stay float (e.g. {report.unsupported[0][0]})")
    print(f"model bytes          {report.total_bytes:,} in memory, {dir_bytes(out):,} on disk (was {dir_bytes(model_path):,})")
    print(f"quantize time        {seconds:.1f} s")

