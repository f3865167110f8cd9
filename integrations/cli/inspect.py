"""``piecewise-quant inspect``: the per-layer table of a quantized checkpoint (grid, bits, group
size, bits/weight, activations, CPU kernel, and the weight error against ``--reference``), and
with ``--plot`` a picture of one layer's weights and grid (:mod:`.plotting`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UserError, add_command, group_label, kernel_label, load, model_dir, task_of

EPILOG = """examples:
  piecewise-quant inspect --model out/pw4
  piecewise-quant inspect --model out/pw4 --reference assets/tiny-llama-pydoc
  piecewise-quant inspect --model out/pw4 --layer model.layers.0.mlp.down_proj --plot down_proj.png

--plot draws the layer's weight histogram, and below it one group's weights (--row, --group) with
that group's grid levels (grey) and, for the piecewise grid, its breakpoints ±p (red, dashed)."""


def add_parser(sub) -> None:
    i = add_command(sub, "inspect", "per-layer table of formats, bits and error; --plot a layer's histogram and grid",
                    "Per-layer table of a quantized checkpoint: grid, bits, group size, bits/weight, activations, "
                    "and the relative weight error ||W_q - W|| / ||W|| against --reference.", EPILOG)
    i.add_argument("--model", required=True, help="a quantized checkpoint directory")
    i.add_argument("--reference", metavar="FLOAT_DIR",
                   help="the float model it was quantized from (for the error column and --plot)")
    i.add_argument("--layer", metavar="NAME", help="show only this layer (and plot it)")
    i.add_argument("--plot", metavar="OUT.png", help="write a PNG of the layer's weight histogram with one group's grid")
    i.add_argument("--row", type=int, default=0, help="output row of the plotted group (default 0)")
    i.add_argument("--group", type=int, default=0, help="group index within the row (default 0)")
    i.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``piecewise-quant inspect``."""
    import torch

    import piecewise_quant as pq

    from . import plotting

    model_path = model_dir(args.model)
    ref_path = model_dir(args.reference, "--reference") if args.reference else None
    if args.plot:
        plotting.check_plot_backend()
    model = load(model_path, task=task_of(model_path))
    layers = pq.quantized_layers(model)
    if not layers:
        raise UserError(f"{model_path} has no piecewise-quant layers (a float checkpoint? quantize it first)")
    _check_layer_name(args.layer, layers)
    reference = load(ref_path, task=task_of(ref_path)) if ref_path is not None else None
    rows = [_layer_row(name, q, reference, ref_path) for name, q in layers.items()
            if args.layer is None or name == args.layer]
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
        path = plotting.plot_layer(name, layers[name], w, args.row, args.group, Path(args.plot))
        print(f"\nwrote {path} (layer {name}, row {args.row}, group {args.group})")
    return 0


def _check_layer_name(name: str | None, layers: dict) -> None:
    """``--layer`` names a quantized layer; a typo gets the closest names."""
    import difflib

    if name is not None and name not in layers:
        close = difflib.get_close_matches(name, list(layers), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; layers are e.g. {', '.join(list(layers)[:3])}"
        raise UserError(f"--layer {name!r}: no quantized layer of that name{hint}")


def _layer_row(name: str, q, reference, ref_path: Path | None) -> tuple[str, ...]:
    """One table row; the error column compares with the same layer of ``reference`` if given."""
    spec = q.spec
    err = "-" if reference is None else _weight_error(name, q, reference, ref_path)
    act = "-" if spec.act_bits is None else f"{spec.act_format}{spec.act_bits} {spec.act_mode}"
    return (name, spec.grid, str(spec.bits), group_label(q.layer_spec), f"{q.bits_per_weight():.3f}", act, err,
            kernel_label(q))


def _weight_error(name: str, q, reference, ref_path: Path | None) -> str:
    """``||W_q - W|| / ||W||`` against the float layer ``name`` of ``reference``, formatted."""
    import torch

    try:
        w = reference.get_submodule(name).weight.detach().to(torch.float32)
    except AttributeError:
        raise UserError(f"--reference {ref_path}: has no layer {name!r} (not the model this was quantized from?)") from None
    if tuple(w.shape) != (q.out_features, q.in_features):
        raise UserError(f"--reference {ref_path}: layer {name!r} has shape {tuple(w.shape)}, "
                        f"the quantized one {(q.out_features, q.in_features)}")
    return f"{float((q.dequantize(torch.float32) - w).norm() / w.norm()):.4f}"
