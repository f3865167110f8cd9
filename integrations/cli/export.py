"""``piecewise-quant export``: a piecewise-quant checkpoint written in a format engines without
this package load (compressed-tensors, or GGUF for llama.cpp), with the same codes and scales
(see :mod:`piecewise_quant.integrations.export`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UserError, add_command, check_output, dir_bytes, load, model_dir, task_of

EPILOG = """examples:
  piecewise-quant quantize --model MODEL --output out/u4 --grid uniform --bits 4 --override '*=symmetric:true'
  piecewise-quant export --model out/u4 --output out/u4-ct --format compressed-tensors
  vllm serve out/u4-ct          # stock vLLM: no --quantization option, no plugin needed

Exports uniform 4/8-bit weights (grouped or per channel; symmetric or with zero points), FP8
weights and W8A8 (int8 per-channel weights, int8 activations) with the same codes and scales. The
piecewise grid, 2/3-bit codes and plugin grids have no equivalent elsewhere and are refused
(docs/export.md). --format gguf writes uniform symmetric g32 4-bit / 8-bit Llama models as
llama.cpp's Q4_0 / Q8_0 (OUTPUT/model.gguf), also without re-quantizing."""


def add_parser(sub) -> None:
    x = add_command(sub, "export", "write a quantized checkpoint as compressed-tensors for stock transformers and vLLM",
                    "Convert a piecewise-quant checkpoint (uniform int4/int8, FP8, W8A8) to a format engines without this "
                    "package load, with the same codes and scales.", EPILOG)
    x.add_argument("--model", required=True, help="a piecewise-quant checkpoint directory (from `piecewise-quant quantize`)")
    x.add_argument("--output", required=True, help="directory to write the exported checkpoint to")
    x.add_argument("--format", choices=("compressed-tensors", "gguf"), default="compressed-tensors",
                   help="compressed-tensors (default; stock transformers and vLLM) or gguf (llama.cpp: Q4_0/Q8_0, Llama models)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    x.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``piecewise-quant export``."""
    from piecewise_quant.integrations import export as ex

    model_path = model_dir(args.model)
    out = Path(args.output)
    check_output(out, args.overwrite, model_path)
    if args.format == "gguf":
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise UserError("--format gguf needs the gguf package, which is not installed: "
                            "pip install 'piecewise-quant[gguf]'") from None
    _check_source_config(model_path, args.format)
    print(f"piecewise-quant export: {model_path} -> {out} ({args.format})")
    model = load(model_path, task=task_of(model_path), dtype="auto")
    write = ex.export_gguf if args.format == "gguf" else ex.export_compressed_tensors
    try:
        summary = write(model, model_path, out, overwrite=args.overwrite)
    except ex.ExportError as exc:
        raise UserError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"--output {out}: {exc}") from None
    _print_summary(summary, args.format, model_path, out)
    return 0


def _check_source_config(model_path: Path, fmt: str) -> None:
    """From config.json alone: a piecewise-quant checkpoint with at least one scheme ``fmt`` can hold."""
    import json

    from piecewise_quant.integrations import export as ex

    try:
        qc = json.loads((model_path / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_path}/config.json cannot be read as JSON: {exc}") from None
    if not isinstance(qc, dict) or qc.get("quant_method") != "piecewise":
        what = "a float checkpoint" if not qc else f"quantized with quant_method {qc.get('quant_method')!r}"
        raise UserError(f"--model {model_path}: not a piecewise-quant checkpoint ({what}); quantize it first, e.g. "
                        f"piecewise-quant quantize --model {model_path} --output OUT --grid uniform --bits 4")
    try:
        ex.check_exportable_config(qc, fmt)
    except ValueError as exc:  # ExportError, or a config that does not parse
        raise UserError(str(exc)) from None


def _print_summary(summary, fmt: str, model_path: Path, out: Path) -> None:
    from piecewise_quant.integrations.export import GGUF_FILE

    counts: dict[str, int] = {}
    for layer_format in summary.layers.values():
        counts[layer_format] = counts.get(layer_format, 0) + 1
    print()
    print(f"quantized layers     {len(summary.layers)} ({', '.join(f'{n} {f}' for f, n in sorted(counts.items()))})")
    if fmt == "gguf":
        print(f"bytes on disk        {summary.bytes_on_disk:,} ({out / GGUF_FILE}; was {dir_bytes(model_path):,})")
    else:
        print(f"float Linear layers  {len(summary.float_linears)} (listed in quantization_config.ignore)")
        print(f"config groups        {len(summary.groups)}")
        print(f"bytes on disk        {summary.bytes_on_disk:,} (was {dir_bytes(model_path):,})")
    for note in summary.notes:
        print(f"note: {note}")
    if fmt == "gguf":
        print(f"saved to {out / GGUF_FILE}")
    else:
        print(f"saved to {out}: load it with stock transformers (pip install compressed-tensors) or `vllm serve {out}`")
