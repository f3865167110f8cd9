"""``piecewise-quant export --format compressed-tensors``: the exported checkpoint loads in stock
transformers (compressed-tensors package, our import hook off) with exactly our dequantized weights
and the same greedy tokens; schemes no other engine has are refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")

import piecewise_quant as pq  # noqa: E402
from piecewise_quant.integrations import cli  # noqa: E402
from piecewise_quant.integrations import export as ex  # noqa: E402

PROMPT = [[5, 100, 200, 300, 400, 17, 9], [44, 55, 66, 77, 88]]
NEW_TOKENS = 10

# name -> config; every scheme compressed-tensors has, and one mixed plan
SCHEMES = {
    "w4_sym_g32": dict(grid="uniform", bits=4, group_size=32, symmetric=True),
    "w4_asym_g32": dict(grid="uniform", bits=4, group_size=32, symmetric=False),
    "w4_asym_tensor": dict(grid="uniform", bits=4, group_size="tensor", symmetric=False),
    "w8_sym_channel": dict(grid="uniform", bits=8, group_size="channel", symmetric=True),
    "fp8_channel": dict(grid="fp8"),
    "fp8_tensor_a8fp8": dict(grid="fp8", group_size="tensor", act_bits=8, act_format="fp8"),
    "fp8_a8fp8_static": dict(grid="fp8", act_bits=8, act_format="fp8", act_mode="static_per_tensor"),
    "w8a8_dynamic": dict(grid="uniform", bits=8, group_size="channel", symmetric=True, act_bits=8),
    "w8a8_static": dict(grid="uniform", bits=8, group_size="tensor", symmetric=True, act_bits=8,
                        act_mode="static_per_tensor"),
    "w4_sym_g32_sharded": dict(grid="uniform", bits=4, group_size=32, symmetric=True, max_shard_size="60KB"),
    "mixed": dict(grid="uniform", bits=4, group_size=64, symmetric=True,
                  overrides={"*.down_proj": {"bits": 8, "group_size": "channel"},
                             "*.v_proj": {"grid": "fp8"},
                             "model.layers.1.mlp.gate_proj": {"grid": "none"}}),
}
EXPECTED_FORMAT = {
    "w4_sym_g32": "pack-quantized", "w4_sym_g32_sharded": "pack-quantized", "w4_asym_g32": "pack-quantized",
    "w4_asym_tensor": "pack-quantized", "w8_sym_channel": "pack-quantized", "fp8_channel": "naive-quantized",
    "fp8_tensor_a8fp8": "float-quantized", "fp8_a8fp8_static": "float-quantized",
    "w8a8_dynamic": "int-quantized", "w8a8_static": "int-quantized", "mixed": "mixed-precision",
}
# same weights; only the summation order differs (our CPU kernel vs torch matmul)
LOGIT_TOL = 1e-4

STOCK_LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
prompts, n = json.loads(sys.argv[1]), int(sys.argv[2])
out = {}
for path in sys.argv[3:]:
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(m).__module__.startswith("transformers."), type(m)
    res = {"tokens": [], "logits": []}
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            res["logits"].append(m(ids).logits[0].tolist())
            g = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
            res["tokens"].append(g[0, len(p):].tolist())
    # compressed layers decompress on the first forward pass
    weights = {name: mod.weight.detach().float().clone() for name, mod in m.named_modules()
               if isinstance(mod, torch.nn.Linear) and name != "lm_head"}
    torch.save(weights, path + ".weights.pt")
    out[path] = res
print("RESULT" + json.dumps(out))
"""


def tiny_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, max_position_embeddings=64, initializer_range=0.08,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def quantized_checkpoint(float_path: Path, path: Path, **config) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_path, dtype=torch.float32)
    shard = config.pop("max_shard_size", None)
    config.setdefault("observer", "minmax")
    pq.quantize(model, pq.PiecewiseQuantConfig(**config), progress=False)
    if config.get("act_mode") == "static_per_tensor":
        g = torch.Generator().manual_seed(0)
        pq.calibrate_activation_scales(model, [torch.randint(3, 512, (2, 16), generator=g) for _ in range(2)])
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def run_cli(*argv: str, capsys=None) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (piecewise checkpoint, exported checkpoint)} for every scheme of SCHEMES, exported by the CLI."""
    root = tmp_path_factory.mktemp("export")
    float_path = tiny_llama(root / "float")
    out = {}
    for name, config in SCHEMES.items():
        src = quantized_checkpoint(float_path, root / name, **config)
        dst = root / f"{name}-ct"
        assert cli.main(["export", "--model", str(src), "--output", str(dst)]) == 0
        out[name] = (src, dst)
    return out


@pytest.fixture(scope="module")
def stock(exported):
    """Each export loaded by stock transformers in a subprocess with our import hook off."""
    env = dict(os.environ, PIECEWISE_QUANT_NO_AUTOLOAD="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    paths = [str(dst) for _, dst in exported.values()]
    proc = subprocess.run([sys.executable, "-c", STOCK_LOADER, json.dumps(PROMPT), str(NEW_TOKENS), *paths],
                          env=env, capture_output=True, text=True, timeout=900)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert proc.returncode == 0 and line, proc.stderr[-5000:]
    res = json.loads(line[len("RESULT"):])
    return {name: res[str(dst)] | {"weights": torch.load(str(dst) + ".weights.pt")} for name, (_, dst) in exported.items()}


@torch.no_grad()
def ours(path: Path, model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, dict]:
    from transformers import AutoModelForCausalLM

    m = model if model is not None else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    res = {"tokens": [], "logits": []}
    for p in PROMPT:
        ids = torch.tensor([p])
        res["logits"].append(m(ids).logits[0])
        g = m.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
        res["tokens"].append(g[0, len(p):].tolist())
    return m, res


def ct_int8_activations(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """compressed-tensors' int8 fake quantization of activations (its calculate_qparams/quantize):
    dynamic per token with scale max|x| / 127.5, or the static ``input_scale``; round half to even,
    clamp to [-128, 127]."""
    xf = x.float()
    if scale is None:
        s = xf.abs().amax(-1, keepdim=True) / 127.5
        s = torch.where(s == 0, torch.full_like(s, torch.finfo(torch.float32).eps), s)
    else:
        s = scale.float()
    return (torch.clamp(torch.round(xf / s), -128, 127) * s).to(x.dtype)


def with_ct_activation_rounding(path: Path) -> torch.nn.Module:
    """Our W8A8 checkpoint with its dequantized weights and compressed-tensors' activation rounding."""
    from transformers import AutoModelForCausalLM

    from piecewise_quant.quantization import dequantize_layers

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    scales = {n: q.act_scale for n, q in pq.quantized_layers(m).items()}
    dequantize_layers(m)
    for n, scale in scales.items():
        m.get_submodule(n).register_forward_pre_hook(lambda mod, args, s=scale: (ct_int8_activations(args[0], s),))
    return m


@pytest.mark.parametrize("name", list(SCHEMES))
def test_stock_transformers_loads_export_with_same_weights_and_tokens(name, exported, stock):
    src, dst = exported[name]
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == EXPECTED_FORMAT[name]
    ct.QuantizationConfig.model_validate(qc)  # the package's own schema accepts it
    model, want = ours(src)
    got = stock[name]
    layers = pq.quantized_layers(model)
    assert layers
    for lname, q in layers.items():  # exactly our dequantized weights
        assert torch.equal(got["weights"][lname], q.dequantize(torch.float32)), lname
    floats = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for lname in floats:  # a layer left float stays float and equal
        assert torch.equal(got["weights"][lname], model.get_submodule(lname).weight.float()), lname
    if name.startswith("w8a8"):
        # transformers' compressed-tensors rounds activations with scale max|x| / 127.5 where we (and vLLM)
        # use / 127: the same exported weights, run with its rounding, give its outputs
        _, want = ours(src, with_ct_activation_rounding(src))
    assert got["tokens"] == want["tokens"]
    diff = max(float((torch.tensor(g) - w).abs().max()) for g, w in zip(got["logits"], want["logits"]))
    assert diff < LOGIT_TOL, diff


def test_export_tensors_and_config_layout(exported):
    from safetensors import safe_open

    _, dst = exported["w4_asym_g32"]
    with safe_open(str(dst / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        assert fh.metadata() == {"format": "pt"}  # no piecewise marker: float loaders see a plain checkpoint
        base = "model.layers.0.self_attn.q_proj"
        assert fh.get_tensor(f"{base}.weight_packed").dtype == torch.int32
        assert fh.get_slice(f"{base}.weight_packed").get_shape() == [128, 16]
        assert fh.get_slice(f"{base}.weight_scale").get_shape() == [128, 4]
        assert fh.get_slice(f"{base}.weight_zero_point").get_shape() == [16, 4]
        assert fh.get_tensor(f"{base}.weight_shape").tolist() == [128, 128]
    assert not any(k.endswith((".qweight", ".scales", ".qzeros")) for k in keys)
    _, mixed = exported["mixed"]
    qc = json.loads((mixed / "config.json").read_text())["quantization_config"]
    assert sorted(g["format"] for g in qc["config_groups"].values()) == ["naive-quantized", "pack-quantized", "pack-quantized"]
    assert qc["ignore"] == ["model.layers.1.mlp.gate_proj", "lm_head"]
    assert (mixed / "generation_config.json").is_file()
    src, sharded = exported["w4_sym_g32_sharded"]  # shards keep their names; the index maps every tensor
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert shards == sorted(p.name for p in src.glob("*.safetensors")) and len(shards) > 1
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    on_disk = {}
    for name in shards:
        with safe_open(str(sharded / name), "pt") as fh:
            on_disk.update({k: name for k in fh.keys()})
    assert index == on_disk


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_int32_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (24, 40), generator=g)
    signed = (codes - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(ex.pack_int32(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(ex.pack_int32(codes, bits, dim=0), pack_to_int32(signed, bits, packed_dim=0))


# ---- refusals: before loading or writing anything ------------------------------------------------


@pytest.fixture(scope="module")
def refused_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("refused")
    float_path = tiny_llama(root / "float")
    return {
        "float": float_path,
        "piecewise": quantized_checkpoint(float_path, root / "pw", grid="piecewise", bits=4, group_size=32),
        "u3": quantized_checkpoint(float_path, root / "u3", grid="uniform", bits=3, group_size=32),
        "w4a8": quantized_checkpoint(float_path, root / "w4a8", grid="uniform", bits=4, group_size=32, act_bits=8),
        "pw_mixed": quantized_checkpoint(float_path, root / "pwm", grid="uniform", bits=4, group_size=32,
                                         overrides={"*.down_proj": {"grid": "piecewise"}}),
        "outliers": quantized_checkpoint(float_path, root / "out", grid="uniform", bits=4, group_size=32, outliers=1),
        "lowrank": quantized_checkpoint(float_path, root / "lr", grid="uniform", bits=4, group_size=32, low_rank=4),
        "rotated": quantized_checkpoint(float_path, root / "rot", grid="uniform", bits=4, group_size=32, rotation="quarot"),
        "w8a8_asym": quantized_checkpoint(float_path, root / "w8a8a", grid="uniform", bits=8, group_size="channel",
                                          symmetric=True, act_bits=8, act_mode="dynamic_per_token_asym"),
    }


@pytest.mark.parametrize("name, words", [
    ("piecewise", ["no other engine has the piecewise grid", "--grid uniform --bits 4"]),
    ("u3", ["3-bit", "--bits 4"]),
    ("w4a8", ["W4A8", "--bits 8 --group-size channel --act-bits 8"]),
    ("float", ["not a piecewise-quant checkpoint", "quantize it first"]),
    ("pw_mixed", ["2 of 14 quantized layers", "down_proj", "piecewise"]),
    ("outliers", ["dense-and-sparse outliers", "without outliers="]),
    ("lowrank", ["low-rank branch (low_rank=4)", "without low_rank="]),
    ("rotated", ["online rotations", "['R4']", "'R1', 'R2'"]),
    ("w8a8_asym", ["asymmetric activations", "act_mode='dynamic_per_token'"]),
])
def test_unexportable_checkpoints_are_refused_with_the_reason(name, words, refused_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli("export", "--model", str(refused_checkpoints[name]), "--output", str(out), capsys=capsys)
    assert code == 2, err
    last = err[err.rindex("error: "):]  # after any loading output
    assert last.startswith(("error: cannot export", "error: --model")), err
    for w in words:
        assert w in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_bad_output_fails_before_loading(refused_checkpoints, tmp_path, capsys):
    src = refused_checkpoints["u3"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    code, _, err = run_cli("export", "--model", str(src), "--output", str(busy), capsys=capsys)
    assert code == 2 and "exists and is not empty" in err and "--overwrite" in err
    assert (busy / "keep.txt").read_text() == "x"
    code, _, err = run_cli("export", "--model", str(src), "--output", str(src), "--overwrite", capsys=capsys)
    assert code == 2 and "--output must differ from --model" in err
    code, _, err = run_cli("export", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), capsys=capsys)
    assert code == 2 and "no such directory" in err


def test_overwrite_replaces_a_previous_export(exported, capsys):
    src, dst = exported["w4_sym_g32"]
    (dst / "stale.safetensors").write_bytes(b"")
    code, out, err = run_cli("export", "--model", str(src), "--output", str(dst), "--overwrite", capsys=capsys)
    assert code == 0, err
    assert not (dst / "stale.safetensors").exists()
    assert "14 (14 pack-quantized)" in out


# ---- GGUF ----------------------------------------------------------------------------------------

BUNDLED = Path(__file__).resolve().parents[2] / "assets" / "tiny-llama-pydoc"
# Q4_0 by default, Q8_0 for down_proj, one layer left float
GGUF_PLAN = dict(grid="uniform", bits=4, group_size=32, symmetric=True,
                 overrides={"*.down_proj": {"bits": 8}, "model.layers.1.mlp.up_proj": {"grid": "none"}})


@pytest.fixture(scope="module")
def gguf_export(tmp_path_factory):
    """A tiny Llama (the bundled tokenizer, vocab 2048) quantized with GGUF_PLAN and exported by the CLI."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, max_position_embeddings=64, initializer_range=0.08,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(root / "float")
    src = quantized_checkpoint(root / "float", root / "q", **GGUF_PLAN)
    AutoTokenizer.from_pretrained(BUNDLED).save_pretrained(src)
    dst = root / "q-gguf"
    assert cli.main(["export", "--model", str(src), "--output", str(dst), "--format", "gguf"]) == 0
    return src, dst / "model.gguf"


def test_gguf_reads_back_with_our_exact_weights(gguf_export):
    import gguf
    from transformers import AutoModelForCausalLM

    src, path = gguf_export
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    heads = {"q_proj": 4, "k_proj": 2}  # llama.cpp's converter reorders q/k rows per head

    def expected(name: str, w: torch.Tensor) -> torch.Tensor:
        kind = name.rsplit(".", 1)[-1]
        return w[ex.llama_permute_rows(w.shape[0], heads[kind])] if kind in heads else w

    layers = pq.quantized_layers(model)
    assert len(layers) == 13
    for name, q in layers.items():
        t = tensors[names.get_name(name + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type == (gguf.GGMLQuantizationType.Q8_0 if name.endswith("down_proj") else gguf.GGMLQuantizationType.Q4_0)
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(q.out_features, q.in_features)
        assert torch.equal(got, expected(name, q.dequantize(torch.float32))), name
    for key, value in model.state_dict().items():  # float tensors as stored (F32), the float layer included
        if key.rsplit(".", 1)[0] in layers:
            continue
        t = tensors[names.get_name(key, try_suffixes=(".weight", ".bias"))]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        got = torch.from_numpy(np.asarray(t.data).copy()).reshape(value.shape)
        assert torch.equal(got, expected(key.rsplit(".", 1)[0], value)), key
    assert len(tensors) == len(model.state_dict()) - 13 * 1  # qweight+scales of a layer -> one tensor

    def field(key):
        f = reader.fields[key]
        return bytes(f.parts[-1]).decode() if f.types[0] == gguf.GGUFValueType.STRING else f.parts[-1].tolist()[0]

    assert field("general.architecture") == "llama" and field("llama.block_count") == 2
    assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
    assert field("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.eos_token_id") == 1
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 2048
    assert len(reader.fields["tokenizer.ggml.merges"].data) > 0


@pytest.mark.parametrize("changes, words", [
    ({"symmetric": False}, ["zero points", "Q4_1", "symmetric:true"]),
    ({"group_size": 64}, ["group size 64", "--group-size 32"]),
    ({"grid": "piecewise", "symmetric": None}, ["GGUF has no such grid", "--grid uniform --bits 4 --group-size 32"]),
])
def test_gguf_refuses_what_q4_0_q8_0_cannot_hold_exactly(changes, words, refused_checkpoints, tmp_path, capsys):
    pytest.importorskip("gguf")
    plan = {**dict(grid="uniform", bits=4, group_size=32, symmetric=True), **changes}
    src = quantized_checkpoint(refused_checkpoints["float"], tmp_path / "q", **{k: v for k, v in plan.items() if v is not None})
    code, _, err = run_cli("export", "--model", str(src), "--output", str(tmp_path / "out"), "--format", "gguf", capsys=capsys)
    assert code == 2, err
    last = err[err.rindex("error: "):]
    assert last.startswith("error: cannot export to GGUF"), err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "out").exists()
