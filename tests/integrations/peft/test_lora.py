"""LoRA (PEFT) on QuantLinear: dispatch, "all-linear", forward against a float reference, packed
base during training, merges (float exact, re-quantized = quantize(W_q + delta)), exact unmerge,
save/reload in a fresh process without registering by hand, transformers Trainer, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from piecewise_quant.qlinear import QuantLinear  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randomize_lora_b(model, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _ids(vocab=128, shape=(2, 12), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_autoload_registered_and_idempotent():
    from peft.tuners.lora.model import LoraModel

    from piecewise_quant._autoload import HOOKS
    from piecewise_quant.integrations import peft as pq_peft

    assert HOOKS["peft.tuners.lora.model"] == ("piecewise_quant.integrations.peft", "register_with_peft")
    assert pq_peft.is_registered()  # `import peft` above fired the hook
    wrapped = LoraModel.__dict__["_create_new_module"].__func__
    pq_peft.register_with_peft()
    assert LoraModel.__dict__["_create_new_module"].__func__ is wrapped  # not wrapped twice
    pq_peft.unregister_from_peft()
    try:
        assert not pq_peft.is_registered()
        assert LoraModel.__dict__["_create_new_module"].__func__ is wrapped.__wrapped__
    finally:
        pq_peft.register_with_peft()
    assert pq_peft.is_registered()


def test_explicit_targets_wrap_quantlinear_without_float_copy(tiny_quantized_llama):
    from piecewise_quant.integrations.peft import QuantLoraLinear

    model = tiny_quantized_llama()
    base = model.model.layers[0].self_attn.q_proj
    ptr = base.qweight.data_ptr()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLoraLinear) and layer.get_base_layer() is base
    assert base.qweight.data_ptr() == ptr
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.k_proj, QuantLinear)  # not targeted
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(n.endswith("q_proj.base_layer.weight") for n, _ in pm.named_parameters())


@pytest.mark.parametrize("quantize_lm_head", [False, True])
def test_all_linear_targets_every_quantlinear_but_the_lm_head(tiny_quantized_llama, quantize_lm_head):
    import piecewise_quant as pq
    from piecewise_quant.integrations.peft import QuantLoraLinear

    model = tiny_quantized_llama()
    if quantize_lm_head:
        model.lm_head = QuantLinear.from_linear(
            model.lm_head,
            pq.quantization.layer_spec_for("lm_head", pq.PiecewiseQuantConfig(bits=8, group_size=32).default_spec, 64, 128),
            pq.get_format("piecewise"),
        )
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, QuantLoraLinear)}
    expected = {f"model.layers.{i}.{blk}.{p}" for i in range(2) for p in PROJ
                for blk in (["self_attn"] if p in PROJ[:4] else ["mlp"])}
    assert wrapped == expected
    assert not isinstance(pm.base_model.model.lm_head, QuantLoraLinear)


def test_forward_matches_float_reference(tiny_quantized_llama):
    model = tiny_quantized_llama()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"], use_rslora=True))
    _randomize_lora_b(pm)
    layer = pm.base_model.model.model.layers[1].mlp.down_proj
    x = torch.randn(3, 5, 128)
    w = layer.get_base_layer().dequantize(torch.float32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = x @ w.T + (x @ a.T @ b.T) * (8 / 4**0.5)
    torch.testing.assert_close(layer(x), ref, atol=2e-5, rtol=1e-5)
    with pm.disable_adapter():
        torch.testing.assert_close(layer(x), x @ w.T, atol=2e-5, rtol=1e-5)


def test_training_keeps_base_packed_and_frozen(tiny_quantized_llama):
    model = tiny_quantized_llama()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    bases = {n: m for n, m in pm.named_modules() if isinstance(m, QuantLinear)}
    before = {n: {k: v.clone() for k, v in m.quantized_tensors().items()} for n, m in bases.items()}
    shapes = {(m.out_features, m.in_features) for m in bases.values()}
    params = {t.untyped_storage().data_ptr() for t in pm.parameters()}
    float_weight_saved = []

    def pack(t):
        if t.is_floating_point() and tuple(t.shape) in shapes and t.untyped_storage().data_ptr() not in params:
            float_weight_saved.append(tuple(t.shape))
        return t

    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    for _ in range(2):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = pm(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float_weight_saved == []  # backward dequantizes transiently, never keeps a float weight
    for n, m in bases.items():
        for k, v in m.quantized_tensors().items():
            assert torch.equal(v, before[n][k]), (n, k)
    lora_b = [p for n, p in pm.named_parameters() if "lora_B" in n]
    assert all(float(p.detach().abs().max()) > 0 for p in lora_b)  # every adapter got a gradient and moved


def test_merge_float_is_exact_and_requantized_equals_quantize_of_merged_weight(tiny_quantized_llama):
    import copy

    from piecewise_quant.integrations.peft import merge_and_unload

    pm = peft.get_peft_model(tiny_quantized_llama(), peft.LoraConfig(r=4, target_modules="all-linear"))
    _randomize_lora_b(pm)
    ids = _ids()
    with torch.no_grad():
        ref = pm(ids).logits
    layer = pm.base_model.model.model.layers[0].mlp.up_proj
    base = layer.get_base_layer()
    merged_w = base.dequantize(torch.float32) + layer.get_delta_weight("default")
    expected_q = base.fmt.quantize(merged_w, base.layer_spec)

    as_float = merge_and_unload(copy.deepcopy(pm), merge_to="float")
    up = as_float.model.layers[0].mlp.up_proj
    assert type(up) is torch.nn.Linear and not any(isinstance(m, QuantLinear) for m in as_float.modules())
    torch.testing.assert_close(up.weight, merged_w, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(as_float(ids).logits, ref, atol=1e-4, rtol=1e-4)
    assert getattr(as_float.config, "quantization_config", None) is None  # nothing quantized is left

    as_q = merge_and_unload(copy.deepcopy(pm), merge_to="quantized")
    up = as_q.model.layers[0].mlp.up_proj
    assert isinstance(up, QuantLinear) and up.layer_spec == base.layer_spec
    for k, v in expected_q.items():
        assert torch.equal(up.quantized_tensors()[k], v), k
    with torch.no_grad():
        err = (as_q(ids).logits - ref).abs().max()
    assert 0 < float(err) < 1.0  # a second rounding: non-zero but bounded


def test_merge_then_unmerge_restores_the_packed_base_exactly(tiny_quantized_llama):
    from piecewise_quant.integrations.peft import set_merge_target

    pm = peft.get_peft_model(tiny_quantized_llama(), peft.LoraConfig(r=4, target_modules=["o_proj"]))
    _randomize_lora_b(pm)
    ids = _ids()
    layer = pm.base_model.model.model.layers[0].self_attn.o_proj
    base = layer.get_base_layer()
    with torch.no_grad():
        ref = pm(ids).logits
        for target in ("quantized", "float"):
            assert set_merge_target(pm, target) == 2
            pm.merge_adapter()
            assert layer.merged and layer.get_base_layer() is not base
            pm.unmerge_adapter()
            assert layer.get_base_layer() is base
            assert torch.equal(pm(ids).logits, ref)


def test_two_adapters_merged_are_rounded_once(tiny_quantized_llama):
    pm = peft.get_peft_model(tiny_quantized_llama(), peft.LoraConfig(r=4, target_modules=["v_proj"]))
    pm.add_adapter("second", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    _randomize_lora_b(pm)
    layer = pm.base_model.model.model.layers[1].self_attn.v_proj
    base = layer.get_base_layer()
    w = base.dequantize(torch.float32) + layer.get_delta_weight("default") + layer.get_delta_weight("second")
    layer.merge(adapter_names=["default"])
    layer.merge(adapter_names=["second"])
    expected = base.fmt.quantize(w, base.layer_spec)
    assert all(torch.equal(layer.get_base_layer().quantized_tensors()[k], v) for k, v in expected.items())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"use_dora": True}, "use_dora"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ],
)
def test_unsupported_lora_options_raise(tiny_quantized_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        peft.get_peft_model(tiny_quantized_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], **kwargs))


def test_merge_errors_name_the_problem(tiny_quantized_llama, monkeypatch):
    from piecewise_quant.integrations.peft import merge_and_unload, set_merge_target

    pm = peft.get_peft_model(tiny_quantized_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_to must be one of"):
        merge_and_unload(pm, merge_to="int4")
    with pytest.raises(ValueError, match="merge_to must be one of"):
        set_merge_target(pm, "fp8")
    base = pm.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()

    def cannot(weight, layer):
        raise NotImplementedError("this format only loads checkpoints")

    monkeypatch.setattr(base.fmt, "quantize", cannot)
    with pytest.raises(ValueError, match="cannot re-quantize a merged weight.*merge_to='float'"):
        merge_and_unload(pm, merge_to="quantized")
    monkeypatch.undo()
    with pytest.raises(TypeError, match="needs a PEFT model"):
        merge_and_unload(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no LoRA layer on a piecewise-quant QuantLinear"):
        merge_and_unload(peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                                             peft.LoraConfig(r=2, target_modules=["0"])))

    bias_pm = peft.get_peft_model(tiny_quantized_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(RuntimeError, match="lora_bias=True because the base layer has no bias"):
        merge_and_unload(bias_pm, merge_to="float")


_RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
ckpt, adapter, ids_path, out = sys.argv[1:5]
base = AutoModelForCausalLM.from_pretrained(ckpt)
model = PeftModel.from_pretrained(base, adapter).eval()
ids = torch.load(ids_path)
with torch.no_grad():
    logits = model(ids).logits
torch.save(logits, out)
print(json.dumps({"lora_layers": sum(type(m).__name__ == "QuantLoraLinear" for m in model.modules()),
                  "imported_integration_by_hand": False}))
"""


def test_trainer_trains_then_adapter_reloads_in_a_fresh_process(bundled_quantized, tmp_path):
    """transformers Trainer on the quantized bundled model (hf_quantizer.is_trainable) lowers the
    loss; the saved adapter reloads with plain PeftModel.from_pretrained in a new interpreter."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from piecewise_quant.evaluate import calibration_text, heldout_text

    ckpt, tok = bundled_quantized
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.hf_quantizer.is_trainable
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    ids = torch.tensor(tok(calibration_text()[:60000], add_special_tokens=False)["input_ids"])
    train = [{"input_ids": w, "labels": w} for w in ids[: 48 * 64].reshape(48, 64)]
    held = torch.tensor(tok(heldout_text()[:20000], add_special_tokens=False)["input_ids"])[: 4 * 64].reshape(4, 64)

    def held_loss():
        pm.eval()
        with torch.no_grad():
            return float(pm(held, labels=held).loss)

    before = held_loss()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3,
        logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    Trainer(model=pm, args=args, train_dataset=train).train()
    after = held_loss()
    assert after < before - 0.02, (before, after)

    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    from safetensors.torch import load_file

    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)  # no base weights in the adapter
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"

    torch.save(held, tmp_path / "ids.pt")
    with torch.no_grad():
        ref = pm(held).logits
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(ckpt), str(adapter), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["lora_layers"] == 42
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("merge_to, targets", [("float", ["o_proj"]), ("quantized", ["o_proj", "up_proj"])])
def test_merged_model_saves_and_reloads_with_plain_from_pretrained(tiny_quantized_llama, tmp_path, merge_to, targets):
    """A partly float-merged model (its config lists the merged layers as float) and a
    re-quantized one both reload with plain from_pretrained and give the same logits."""
    from transformers import AutoModelForCausalLM

    from piecewise_quant.integrations.peft import merge_and_unload
    from piecewise_quant.integrations.transformers import register_with_transformers

    register_with_transformers()
    pm = peft.get_peft_model(tiny_quantized_llama(), peft.LoraConfig(r=4, target_modules=targets))
    _randomize_lora_b(pm)
    merged = merge_and_unload(pm, merge_to=merge_to)
    ids = _ids()
    with torch.no_grad():
        want = merged(ids).logits
    merged.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    kinds = {type(back.model.layers[0].self_attn.o_proj).__name__, type(back.model.layers[0].mlp.down_proj).__name__}
    assert kinds == ({"Linear", "QuantLinear"} if merge_to == "float" else {"QuantLinear"})
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)
