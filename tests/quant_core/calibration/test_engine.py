"""The calibration engine: block-by-block ``calibrate`` on real and tiny models, its algorithms'
effect on the block outputs, data handling, fallbacks and errors."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import piecewise_quant as pq
from piecewise_quant.qlinear import QuantLinear

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def ids(n=8, length=32, seed=0, vocab=128):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def cfg(preset="aware", **kw):
    cal = kw.pop("cal", {})
    kw.setdefault("group_size", 32)
    return pq.PiecewiseQuantConfig(calibration=pq.CalibrationConfig.preset(preset, n_samples=8, seq_len=32, **cal), **kw)


def test_calibrate_quantizes_every_planned_layer_and_reports():
    model = tiny_llama()
    report = pq.calibrate(model, cfg(), ids(), progress=False)
    q = pq.quantized_layers(model)
    assert len(q) == 14 and "lm_head" not in q
    assert set(report.layers) == set(q)
    assert report.blocks_path == "model.layers" and len(report.blocks) == 2
    assert report.n_samples == 8 and report.n_tokens == 8 * 32
    assert report.wall_s > 0 and report.peak_rss_mb > 0 and report.peak_held_mb > 0
    assert all(r.method == "aware" and r.tokens == 8 * 32 for r in report.layers.values())
    assert model.config.quantization_config["calibration"]["n_samples"] == 8
    assert "calibrated 14 layers" in report.summary()
    with torch.no_grad():
        assert torch.isfinite(model(ids(1)).logits).all()


def test_deterministic_for_a_seed():
    states = []
    for _ in range(2):
        model = tiny_llama()
        config = pq.PiecewiseQuantConfig(group_size=32, calibration=pq.CalibrationConfig(
            let=True, lwc=True, gptq=True, epochs=1, n_samples=8, seq_len=32))
        pq.calibrate(model, config, ids(), progress=False)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def _real_two_blocks(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    return model


def _hidden_error(model, ref_hidden, x):
    with torch.no_grad():
        h = model.model(x).last_hidden_state
    return float((h - ref_hidden).pow(2).sum() / ref_hidden.pow(2).sum())


@pytest.fixture(scope="module")
def real_setup(tiny_llama_path):
    from transformers import AutoTokenizer

    from piecewise_quant import evaluate

    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    stream = torch.tensor(tok(evaluate.heldout_text(), add_special_tokens=False)["input_ids"])
    x = stream[: 4 * 128].reshape(4, 128)
    model = _real_two_blocks(tiny_llama_path)
    with torch.no_grad():
        ref = model.model(x).last_hidden_state
    return tok, x, ref


@pytest.mark.slow
def test_gptq_and_lwc_beat_round_to_nearest_at_3_bits(tiny_llama_path, real_setup):
    tok, x, ref = real_setup
    base = dict(bits=3, group_size=128, grid="piecewise")
    rtn = _real_two_blocks(tiny_llama_path)
    pq.quantize(rtn, pq.PiecewiseQuantConfig(grid="uniform", bits=3, group_size=128, observer="minmax"), progress=False)
    err = {"rtn": _hidden_error(rtn, ref, x)}
    for preset in ("aware", "gptq", "lwc"):
        model = _real_two_blocks(tiny_llama_path)
        config = pq.PiecewiseQuantConfig(calibration=pq.CalibrationConfig.preset(preset, n_samples=16, epochs=2), **base)
        pq.calibrate(model, config, tokenizer=tok, progress=False)
        err[preset] = _hidden_error(model, ref, x)
    # measured (held-out text, 2 blocks): rtn 0.0104, aware 0.0073, gptq 0.0007, lwc 0.0073
    assert err["aware"] < 0.85 * err["rtn"], err
    assert err["gptq"] < 0.5 * err["rtn"], err
    assert err["lwc"] < 0.8 * err["rtn"], err


@pytest.mark.slow
def test_smoothquant_and_let_recover_w8a8_on_the_outlier_model(tiny_llama_path, real_setup):
    from piecewise_quant.testing import make_outlier_model

    tok, x, ref = real_setup
    errs = {}
    for preset in ("aware", "smoothquant", "omniquant"):
        model = _real_two_blocks(tiny_llama_path)
        make_outlier_model(model, n_channels=4, factor=100.0)
        config = pq.PiecewiseQuantConfig(
            grid="uniform", bits=8, group_size="channel", act_bits=8, act_mode="static_per_tensor",
            calibration=pq.CalibrationConfig.preset(preset, n_samples=8, epochs=1),
        )
        report = pq.calibrate(model, config, tokenizer=tok, progress=False)
        errs[preset] = (_hidden_error(model, ref, x), [b.folded for b in report.blocks])
    assert errs["aware"][1] == [0, 0]
    assert errs["smoothquant"][1] == [4, 4]  # two norms, v->o, up->down per block
    assert errs["smoothquant"][0] < 0.2 * errs["aware"][0], errs
    assert errs["omniquant"][0] < 0.2 * errs["aware"][0], errs


class _ResidualNormBlock(nn.Module):
    """A block whose norm output also feeds the residual: scaling can NOT be folded into it."""

    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.unused_expert = nn.Linear(d, d)  # never called: receives no calibration tokens

    def forward(self, x):
        h = self.norm(x)
        return h + self.fc(h)


class _Net(nn.Module):
    def __init__(self, d=16, n=2):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.blocks = nn.ModuleList(_ResidualNormBlock(d) for _ in range(n))
        self.head = nn.Linear(d, 50)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def test_unfoldable_scaling_is_reverted_and_unused_layers_fall_back_to_data_free(caplog):
    torch.manual_seed(0)
    model = _Net()
    x = ids(4, 16, vocab=50)
    with torch.no_grad():
        ref = model(x)
    config = pq.PiecewiseQuantConfig(grid="uniform", bits=8, group_size=16, modules_to_not_convert=["head"],
                                     calibration=pq.CalibrationConfig(smoothquant=0.5, n_samples=4, seq_len=16))
    with caplog.at_level(logging.WARNING):
        report = pq.calibrate(model, config, x, progress=False)
    assert [b.folded for b in report.blocks] == [0, 0]
    assert "not folding it" in caplog.text
    assert report.data_free_layers == ["blocks.0.unused_expert", "blocks.1.unused_expert"]
    assert report.layers["blocks.0.unused_expert"].note == "received no calibration tokens"
    for m in pq.quantized_layers(model).values():
        assert torch.isfinite(m.scales.float()).all() and bool((m.scales != 0).all())
    with torch.no_grad():
        assert float((model(x) - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_static_activation_scale_for_a_layer_without_tokens_is_an_error():
    model = _Net()
    config = pq.PiecewiseQuantConfig(grid="uniform", bits=8, group_size=16, act_bits=8, act_mode="static_per_tensor",
                                     modules_to_not_convert=["head"], calibration=pq.CalibrationConfig(n_samples=4, seq_len=16))
    with pytest.raises(ValueError, match=r"blocks\.0\.unused_expert.*no calibration tokens"):
        pq.calibrate(model, config, ids(4, 16, vocab=50), progress=False)


def test_bert_encoder_is_calibrated_and_the_pooler_is_data_free():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64)).eval()
    config = pq.PiecewiseQuantConfig(group_size=32, modules_to_not_convert=[],
                                     calibration=pq.CalibrationConfig(n_samples=4, seq_len=16, smoothquant=0.5))
    batches = [{"input_ids": ids(2, 16, vocab=100, seed=s), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
               for s in (0, 1)]
    report = pq.calibrate(model, config, batches, progress=False)
    assert report.blocks_path == "encoder.layer"
    assert report.data_free_layers == ["pooler.dense"]
    assert [b.folded for b in report.blocks] == [1, 1]  # value -> attention.output.dense
    assert len(pq.quantized_layers(model)) == 13


def test_mixed_precision_plan_meets_the_budget_and_survives_save_and_reload(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    config = cfg(cal={"mixed_precision_budget": 3.5, "mixed_precision_bits": (2, 4, 8)})
    report = pq.calibrate(model, config, ids(), progress=False)
    mp = report.mixed_precision
    assert mp["average_bits_per_weight"] <= 3.5
    bits = {m.spec.bits for m in pq.quantized_layers(model).values()}
    assert len(bits) > 1 and bits <= {2, 4, 8}
    saved = model.config.quantization_config
    assert len(saved["overrides"]) == 14
    model.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    assert not hasattr(again, "piecewise_quant_calibration_report")
    x = ids(1)
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    for name, m in pq.quantized_layers(again).items():
        assert m.spec.bits == pq.quantized_layers(model)[name].spec.bits


def _sensitivities(monkeypatch, model, scope):
    """Every layer's candidate errors as mixed precision measures them with ``scope``."""
    from piecewise_quant.calibration import mixed_precision

    seen = {}
    real = mixed_precision.allocate

    def spy(candidates, n_weights, budget):
        seen.update({name: {(c.bits, c.grid): c.error for c in cands} for name, cands in candidates.items()})
        return real(candidates, n_weights, budget)

    monkeypatch.setattr(mixed_precision, "allocate", spy)
    config = cfg(cal={"mixed_precision_budget": 3.5, "mixed_precision_bits": (2, 4, 8), "mixed_precision_scope": scope})
    report = pq.calibrate(model, config, ids(), progress=False)
    monkeypatch.undo()  # the next call spies on the real allocate, not on this spy
    assert report.mixed_precision["average_bits_per_weight"] <= 3.5
    return seen


def _scaled_last_block(factor):
    """The tiny Llama with its last block's residual branches (``o_proj``, ``down_proj``) scaled."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(factor)
        model.model.layers[1].mlp.down_proj.weight.mul_(factor)
    return model


def test_mixed_precision_model_scope_measures_at_the_last_block(monkeypatch):
    # a last block that rewrites the residual stream (its branches 30x larger than at init): the
    # first block's errors are measured after it, and come out different from the block scope's
    block, whole = (_sensitivities(monkeypatch, _scaled_last_block(30.0), s) for s in ("block", "model"))
    assert block.keys() == whole.keys() and len(block) == 14
    first = [n for n in block if n.startswith("model.layers.0.")]
    for name in set(block) - set(first):  # nothing follows the last block: the same numbers
        assert whole[name] == block[name], name
    changed = [whole[n][c] / block[n][c] for n in first for c in block[n] if block[n][c] > 0]
    assert max(abs(r - 1) for r in changed) > 0.1
    # a last block whose residual branches write zeros passes its input through: its output is the
    # first block's, so the two scopes measure the same error for every layer of the first block
    block, whole = (_sensitivities(monkeypatch, _scaled_last_block(0.0), s) for s in ("block", "model"))
    for name in first:
        for c, err in block[name].items():
            assert whole[name][c] == pytest.approx(err, rel=1e-4, abs=1e-9), (name, c)


def test_mixed_precision_scope_is_checked_and_saved_only_when_not_the_default():
    from piecewise_quant.calibration import MixedPrecision

    with pytest.raises(ValueError, match="mixed_precision_scope must be 'block' or 'model'"):
        pq.CalibrationConfig(mixed_precision_budget=3.5, mixed_precision_scope="network")
    with pytest.raises(ValueError, match="scope must be one of"):
        MixedPrecision(3.5, scope="layer")
    assert "mixed_precision_scope" not in pq.CalibrationConfig(mixed_precision_budget=3.5).to_dict()
    config = pq.PiecewiseQuantConfig(calibration=pq.CalibrationConfig(mixed_precision_budget=3.5,
                                                                      mixed_precision_scope="model"))
    again = pq.PiecewiseQuantConfig.from_json_string(config.to_json_string())
    assert again == config and again.calibration.mixed_precision_scope == "model"
    assert MixedPrecision(3.5, scope="model") in again.calibration.recipe
    listed = pq.CalibrationConfig(modifiers=[MixedPrecision(3.5, scope="model")])
    assert listed.mixed_precision_scope == "model" and listed.mixed_precision_budget == 3.5


def test_from_pretrained_calibrates_after_loading_and_the_checkpoint_reloads_without_calibration(tiny_llama_path, tmp_path):
    from transformers import AutoModelForCausalLM

    config = pq.PiecewiseQuantConfig(bits=4, group_size=128, calibration=pq.CalibrationConfig(n_samples=4, seq_len=64))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=config)
    report = model.piecewise_quant_calibration_report
    assert len(report.layers) == 42 and report.n_samples == 4
    assert all(r.method == "aware" for r in report.layers.values())
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not hasattr(again, "piecewise_quant_calibration_report")
    x = ids(1, 16, vocab=2000)
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_offloaded_model_is_calibrated_block_by_block_like_an_in_memory_one(tiny_llama_path, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    config = pq.PiecewiseQuantConfig(bits=4, group_size=128, calibration=pq.CalibrationConfig(n_samples=4, seq_len=32))
    x = ids(4, 32, vocab=2000)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    pq.calibrate(ref, config, x, progress=False)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(6)})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32, device_map=device_map,
                                                 offload_folder=str(tmp_path))
    assert model.model.layers[1].mlp.down_proj.weight.is_meta
    pq.calibrate(model, config, x, progress=False)
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        assert torch.equal(model(x[:1]).logits, ref(x[:1]).logits)


# ---- data and bad input ----------------------------------------------------------------------


def test_text_data_is_tokenised_and_cut_into_seeded_windows(tiny_llama_path):
    from transformers import AutoTokenizer

    from piecewise_quant.calibration.data import prepare_batches

    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    from piecewise_quant import evaluate

    text = [evaluate.heldout_text()[:20000]]
    a = prepare_batches(text, tokenizer=tok, n_samples=5, seq_len=64, batch_size=2, seed=3)
    b = prepare_batches(text, tokenizer=tok, n_samples=5, seq_len=64, batch_size=2, seed=3)
    c = prepare_batches(text, tokenizer=tok, n_samples=5, seq_len=64, batch_size=2, seed=4)
    assert [t["input_ids"].shape for t in a] == [(2, 64), (2, 64), (1, 64)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_held_aside_samples_never_overlap_the_calibration_samples(tiny_llama_path):
    from transformers import AutoTokenizer

    from piecewise_quant import evaluate
    from piecewise_quant.calibration.data import held_aside_batches, prepare_batches

    stream = torch.arange(10_000)  # a window's first id is its offset
    kw = dict(n_samples=6, seq_len=32, batch_size=4, seed=3)
    cal = torch.cat([b["input_ids"] for b in prepare_batches(stream, **kw)])
    aside = torch.cat([b["input_ids"] for b in held_aside_batches(stream, **kw)])
    assert aside.shape == (6, 32)
    for w in aside:  # each a window of the same 32-token tiling
        assert int(w[0]) % 32 == 0 and torch.equal(w, stream[int(w[0]):int(w[0]) + 32])
    assert not {int(w[0]) for w in cal} & {int(w[0]) for w in aside}
    assert torch.equal(aside, torch.cat([b["input_ids"] for b in held_aside_batches(stream, **kw)]))
    wider = torch.cat([b["input_ids"] for b in held_aside_batches(stream, **kw, n_aside=20)])
    assert wider.shape == (20, 32) and torch.equal(wider[:6], aside)  # fewer windows are a prefix of more
    # text: the same windows as its token ids give
    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    text = evaluate.heldout_text()[:20000]
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    by_text = held_aside_batches([text], tokenizer=tok, **kw)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(by_text, held_aside_batches(ids, **kw)))
    # 2-D ids: the rows after the calibration rows
    rows = torch.arange(80).reshape(10, 8)
    assert torch.equal(held_aside_batches(rows, n_samples=6, batch_size=8)[0]["input_ids"], rows[6:])
    # nothing to hold aside: model-input dicts, or no window beyond the calibration ones
    assert held_aside_batches([{"input_ids": rows}], n_samples=6) is None
    assert held_aside_batches(torch.arange(200), n_samples=6, seq_len=32) is None
    assert held_aside_batches(rows, n_samples=10) is None


def test_short_and_empty_data_are_refused_or_fall_back_as_documented(caplog):
    from piecewise_quant.calibration.data import prepare_batches

    with pytest.raises(ValueError, match="10 tokens, fewer than one sample of seq_len=32"):
        prepare_batches(torch.arange(10), n_samples=4, seq_len=32)
    with pytest.raises(ValueError, match="empty"):
        prepare_batches([], n_samples=4, seq_len=32)
    with pytest.raises(ValueError, match="empty"):
        prepare_batches(torch.zeros(0, 8, dtype=torch.long), n_samples=4, seq_len=32)
    with caplog.at_level(logging.WARNING):
        batches = prepare_batches(torch.arange(100), n_samples=8, seq_len=32, batch_size=8)
    assert batches[0]["input_ids"].shape == (3, 32) and "only 3 windows" in caplog.text
    with pytest.raises(ValueError, match="integer"):
        prepare_batches(torch.rand(4, 8), n_samples=4, seq_len=8)


def test_nan_in_calibration_activations_is_refused():
    model = tiny_llama()
    emb = torch.randn(2, 16, 64)
    emb[0, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pq.calibrate(model, cfg(), [{"inputs_embeds": emb}], progress=False)
    assert not pq.quantized_layers(model)


class _Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, input_ids):
        return self.b(self.a(input_ids.float().unsqueeze(-1).expand(*input_ids.shape, 8)))


def test_models_without_blocks_and_bad_block_paths_get_clear_errors():
    with pytest.raises(ValueError, match=r"no repeated blocks.*CalibrationConfig\(blocks="):
        pq.calibrate(_Flat(), pq.PiecewiseQuantConfig(group_size=8, calibration="aware"), ids(2, 8), progress=False)
    with pytest.raises(ValueError, match="has no submodule"):
        pq.calibrate(tiny_llama(), cfg(cal={"blocks": "model.nope"}), ids(), progress=False)


def test_already_quantized_models_and_bad_recipes_are_refused():
    model = tiny_llama()
    pq.quantize(model, pq.PiecewiseQuantConfig(group_size=32), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        pq.calibrate(model, cfg(), ids(), progress=False)
    with pytest.raises(ValueError, match="below the smallest allowed bits"):
        pq.CalibrationConfig(mixed_precision_budget=1.5)
    with pytest.raises(ValueError, match="unknown calibration preset"):
        pq.PiecewiseQuantConfig(calibration="magic")
    with pytest.raises(ValueError, match="smoothquant or let"):
        pq.CalibrationConfig(smoothquant=0.5, let=True)
    with pytest.raises(ValueError, match="alpha"):
        pq.CalibrationConfig(smoothquant=1.5)
    with pytest.raises(ValueError, match="refine_breakpoints and gptq"):
        pq.CalibrationConfig(gptq=True, refine_breakpoints=True)


def test_calibration_config_round_trips_through_json():
    config = pq.PiecewiseQuantConfig(calibration=pq.CalibrationConfig.preset("gptq", mixed_precision_budget=3.5, let=True))
    again = pq.PiecewiseQuantConfig.from_json_string(config.to_json_string())
    assert again == config and again.calibration.gptq and again.calibration.mixed_precision_budget == 3.5
    assert "calibration" not in pq.PiecewiseQuantConfig().to_dict()


def test_text_without_a_tokenizer_says_how_to_get_one(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    with pytest.raises(ValueError, match=r"needs a tokenizer: pass tokenizer=.*AutoTokenizer\.from_pretrained"):
        pq.calibrate(model, cfg(), ["some calibration text"], progress=False)
    assert not pq.quantized_layers(model)
