"""quantize() and calibrate() finish or leave the model exactly as it was; quantizing twice, odd
models and bad calibration data fail before any work with a message naming the problem."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import piecewise_quant as pq
from piecewise_quant.calibration import engine


def _ids(n=4, length=16, vocab=256):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def test_interrupted_quantize_leaves_the_model_as_it_was(rel, monkeypatch):
    model = rel.tiny_llama(layers=2)
    before = rel.fingerprint(model)
    real = pq.QuantLinear.from_linear.__func__
    calls = {"n": 0}

    def flaky(cls, linear, layer, fmt):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(cls, linear, layer, fmt)

    monkeypatch.setattr(pq.QuantLinear, "from_linear", classmethod(flaky))
    with pytest.raises(KeyboardInterrupt):
        pq.quantize(model, pq.PiecewiseQuantConfig(bits=4, group_size=32, observer="minmax"), progress=False)
    rel.assert_unchanged(model, before)
    assert "quantization_config" not in model.config.to_dict() or model.config.quantization_config is None


def test_quantizing_twice_is_an_error(rel):
    model = rel.tiny_llama(layers=1)
    pq.quantize(model, pq.PiecewiseQuantConfig(bits=3, group_size=32, observer="minmax"), progress=False)
    before = rel.fingerprint(model)
    with pytest.raises(ValueError, match="already quantized .* QuantLinear layers"):
        pq.quantize(model, pq.PiecewiseQuantConfig(bits=8, group_size=32), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        pq.calibrate(model, pq.PiecewiseQuantConfig(bits=8, group_size=32), _ids(), progress=False)
    rel.assert_unchanged(model, before)
    assert model.config.quantization_config["bits"] == 3


@pytest.mark.parametrize("fail_at", [0, 1, 2])
@pytest.mark.parametrize("recipe", ["smoothquant", "gptq"])
def test_calibrate_interrupted_at_every_block_restores_the_model(rel, monkeypatch, fail_at, recipe):
    """Block ``fail_at`` is fully calibrated (layers swapped, scales folded into the norms, GPTQ
    weight updates) and then the run is interrupted: the model must come back unchanged."""
    model = rel.tiny_llama(layers=3)
    model.train()  # calibrate switches to eval; the restore must switch back
    before = rel.fingerprint(model)
    real = engine._calibrate_block
    seen = {"n": 0}

    def interrupted(*args, **kwargs):
        out = real(*args, **kwargs)
        if seen["n"] == fail_at:
            raise KeyboardInterrupt
        seen["n"] += 1
        return out

    monkeypatch.setattr(engine, "_calibrate_block", interrupted)
    config = pq.PiecewiseQuantConfig(bits=4, group_size=32, act_bits=8, act_mode="static_per_tensor",
                                     calibration=pq.CalibrationConfig.preset(recipe, n_samples=4, seq_len=16, batch_size=2))
    with pytest.raises(KeyboardInterrupt):
        pq.calibrate(model, config, _ids(), progress=False)
    rel.assert_unchanged(model, before)
    assert getattr(model.config, "quantization_config", None) is None


def test_calibrate_failing_in_the_mixed_precision_pass_restores_the_model(rel, monkeypatch):
    """The sensitivity pass writes each candidate's fake-quantized weight into the layer while it
    runs the block: fail right then."""
    model = rel.tiny_llama(layers=2)
    before = rel.fingerprint(model)
    real = engine.run_block
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # 1: float outputs, 2: statistics, 3: the first candidate's probe
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "run_block", failing)
    cal = pq.CalibrationConfig(n_samples=2, seq_len=16, mixed_precision_budget=3.5, mixed_precision_bits=(2, 4))
    with pytest.raises(RuntimeError, match="disk on fire"):
        pq.calibrate(model, pq.PiecewiseQuantConfig(group_size=32, calibration=cal), _ids(2), progress=False)
    rel.assert_unchanged(model, before)


def test_calibrate_prints_nothing_and_its_report_has_the_per_layer_table(rel, capsys):
    model = rel.tiny_llama(layers=1)
    report = pq.calibrate(model, pq.PiecewiseQuantConfig(bits=4, group_size=32, calibration=pq.CalibrationConfig(
        n_samples=2, seq_len=16)), _ids(2), progress=False)
    assert capsys.readouterr().out == ""
    text = repr(report)
    assert text == str(report)
    assert "| model.layers.0.self_attn.q_proj | piecewise | 4 | 4.625 | 32 | aware |  |" in text
    assert text.startswith("calibrated 7 layers in 1 blocks")


# ---- odd models ---------------------------------------------------------------------------------


def test_tied_lm_head_keeps_the_tie(rel):
    model = rel.tiny_llama(layers=1, tie=True)
    with pytest.warns(pq.PiecewiseQuantWarning, match=r"lm_head \(tied to model.embed_tokens\)"):
        pq.quantize(model, pq.PiecewiseQuantConfig(group_size=32, observer="minmax", modules_to_not_convert=[]),
                    progress=False)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight


def test_zero_size_linear_is_refused_naming_it():
    model = nn.Sequential(nn.Linear(256, 0))
    with pytest.raises(ValueError, match=r"layer '0' has in_features=256, out_features=0.*modules_to_not_convert"):
        pq.quantize(model, pq.PiecewiseQuantConfig(), progress=False)


def test_meta_device_model_is_refused_before_any_work(rel):
    with torch.device("meta"):
        model = rel.tiny_llama(layers=1)
    with pytest.raises(ValueError, match="meta device"):
        pq.quantize(model, pq.PiecewiseQuantConfig(), progress=False)
    with pytest.raises(ValueError, match="meta device"):
        pq.calibrate(model, pq.PiecewiseQuantConfig(), _ids(), progress=False)


def test_unquantizable_moe_experts_are_counted_and_named_once(rel):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         num_experts=8, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pq.quantize(model, pq.PiecewiseQuantConfig(group_size=32, observer="minmax"), progress=False)
    msgs = [str(w.message) for w in caught if issubclass(w.category, pq.PiecewiseQuantWarning)]
    assert len(msgs) == 1 and "model.layers.0.mlp.experts.gate_up_proj" in msgs[0]
    report = pq.model_size_report(model)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert dict(report.unsupported)["model.layers.1.mlp.experts.down_proj"] == 8 * 64 * 32
    assert report.float_matrix_weights >= experts
    assert report.bits_per_weight == pytest.approx(4.625)  # the quantized layers alone
    assert report.overall_bits_per_weight > 20  # most weights are float experts


# ---- bad calibration data -----------------------------------------------------------------------


def test_token_ids_beyond_the_vocabulary_are_refused_before_any_work(rel):
    model = rel.tiny_llama(layers=1)
    before = rel.fingerprint(model)
    with pytest.raises(ValueError, match=r"token id 300, but the model's vocabulary has 256 entries.*another model's tokenizer"):
        pq.calibrate(model, pq.PiecewiseQuantConfig(group_size=32), torch.tensor([[1, 2, 300, 4]]), progress=False)
    rel.assert_unchanged(model, before)


def test_mismatched_tokenizer_is_caught_by_the_vocabulary_check(rel, tiny_llama_path):
    from transformers import AutoTokenizer

    model = rel.tiny_llama(layers=1)  # vocab 256; the bundled tokenizer has 2048 ids
    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    config = pq.PiecewiseQuantConfig(group_size=32, calibration=pq.CalibrationConfig(n_samples=2, seq_len=16))
    with pytest.raises(ValueError, match="vocabulary has 256 entries"):
        pq.calibrate(model, config, "def read(path):\n    return open(path).read()\n" * 20, tokenizer=tok, progress=False)


def test_dict_batches_with_wrong_keys_name_the_accepted_inputs(rel):
    model = rel.tiny_llama(layers=1)
    with pytest.raises(ValueError, match=r"input\(s\) \['ids'\] that LlamaForCausalLM.forward does not take.*input_ids"):
        pq.calibrate(model, pq.PiecewiseQuantConfig(group_size=32), [{"ids": _ids(1)}], progress=False)


def test_lists_instead_of_tensors_are_accepted_or_refused_clearly(rel):
    model = rel.tiny_llama(layers=1)
    config = pq.PiecewiseQuantConfig(group_size=32, calibration=pq.CalibrationConfig(n_samples=2, seq_len=8))
    batch = {"input_ids": _ids(2, 8).tolist()}
    report = pq.calibrate(model, config, [batch], progress=False)
    assert report.n_samples == 2
    with pytest.raises(ValueError, match="not a rectangular array of numbers"):
        pq.calibrate(rel.tiny_llama(layers=1), config, [{"input_ids": [[1, 2, 3], [4]]}], progress=False)
