"""GGUF export for llama.cpp (:func:`export_gguf`, Llama models): uniform symmetric g32 layers as
Q4_0 / Q8_0 blocks with our codes and float16 scales unchanged, float tensors as stored, and the
names, metadata, Q/K row order and GPT-2 BPE vocabulary llama.cpp's ``convert_hf_to_gguf.py``
writes. The ``gguf`` package is imported only when an export runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .common import ExportError, ExportSummary, local_tensor_names, refuse_layers
from .ct import dense_only_refusal, rotation_refusal

GGUF_FILE = "model.gguf"
GGUF_GROUP = 32
_GGUF_ARCHS = {"LlamaForCausalLM": "llama"}


def gguf_refusal(spec: Any, group_size: int | str) -> str | None:
    """Why a layer cannot be written as GGUF Q4_0/Q8_0 without loss, or ``None``."""
    why = dense_only_refusal(spec)
    if why is not None:
        return why
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
    arch = _gguf_arch(model)
    layers = quantized_layers(model)
    if not layers:
        raise ExportError(f"{source} has no piecewise-quant layers (a float checkpoint? quantize it first)")
    refuse_layers(layers, lambda q: rotation_refusal(q.layer_spec) or gguf_refusal(q.spec, q.layer_spec.group_size),
                  "GGUF", "exact Q4_0/Q8_0 equivalent")
    try:
        vocab = gguf.vocab.BpeVocab(source)
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(f"{source}: no GPT-2-style byte-level BPE tokenizer.json to write into the GGUF ({exc}); "
                          "other tokenizers need llama.cpp's convert_hf_to_gguf.py") from None

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    quantized, kinds, done = _quantized_tensors(gguf, model, layers, names)
    tensors = quantized + _float_tensors(model, names, done)
    if getattr(model.config, "tie_word_embeddings", False):
        tensors = [x for x in tensors if x[0] != "output.weight"]
    with atomic_directory(output, overwrite=overwrite) as tmp:
        w = gguf.GGUFWriter(tmp / GGUF_FILE, arch)
        _add_metadata(gguf, w, model.config, source, kinds)
        _add_vocab(gguf, w, vocab, source)
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


def _gguf_arch(model: Any) -> str:
    """llama.cpp's architecture name for ``model``; other architectures are refused."""
    archs = list(getattr(model.config, "architectures", None) or [])
    arch = next((_GGUF_ARCHS[a] for a in archs if a in _GGUF_ARCHS), None)
    if arch is None:
        raise ExportError(f"GGUF export supports {', '.join(_GGUF_ARCHS)} only, not {', '.join(archs) or type(model).__name__}: "
                          "other architectures need llama.cpp's convert_hf_to_gguf.py; use --format compressed-tensors")
    return arch


def _heads(cfg: Any) -> tuple[int, int]:
    """``(attention heads, key/value heads)``."""
    n_head = cfg.num_attention_heads
    return n_head, getattr(cfg, "num_key_value_heads", None) or n_head


def _quantized_tensors(gguf: Any, model: Any, layers: dict[str, Any], names: Any):
    """``([(gguf name, Q4_0/Q8_0 blocks, quantization type)], {type value: layers}, the checkpoint
    names of the tensors they replace)``; q_proj/k_proj rows in llama.cpp's order."""
    n_head, n_kv = _heads(model.config)
    tensors: list[tuple[str, Any, Any]] = []
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
        done |= {f"{name}.{t}" for t in local_tensor_names(q)}
        if q.bias is not None:
            raise ExportError(f"layer {name!r} has a bias, which llama.cpp's llama graph does not read")
    return tensors, kinds, done


def _float_tensors(model: Any, names: Any, done: set[str]) -> list[tuple[str, Any, None]]:
    """Every other tensor of ``model``'s state dict as stored (bfloat16 as float32, which numpy has)."""
    n_head, n_kv = _heads(model.config)
    tensors: list[tuple[str, Any, None]] = []
    for key, value in model.state_dict().items():
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
    return tensors


def _add_metadata(gguf: Any, w: Any, cfg: Any, source: Path, kinds: dict[int, int]) -> None:
    """The llama hyperparameters and file type, as llama.cpp's converter writes them."""
    n_head, n_kv = _heads(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    ftype = gguf.LlamaFileType.MOSTLY_Q4_0 if 2 in kinds else gguf.LlamaFileType.MOSTLY_Q8_0
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    w.add_name(source.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
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


def _add_vocab(gguf: Any, w: Any, vocab: Any, source: Path) -> None:
    """The GPT-2-style BPE vocabulary, with the special tokens of tokenizer.json as CONTROL tokens."""
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
