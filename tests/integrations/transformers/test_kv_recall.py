"""The associative-recall task (benchmarks/recall_task.py) and the shipped recall model
(assets/tiny-llama-recall): a deterministic generator whose answer is in the context, a
constructed induction circuit that is the same function in random bases, and the shipped model's
measured behaviour: it recalls at 256 tokens, it needs the early context to do so, and an int8 KV
cache keeps its answers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from piecewise_quant.args import KVArgs  # noqa: E402
from piecewise_quant.integrations.transformers import QuantizedKVCache, kv_fake_quant  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
ASSET = REPO / "assets" / "tiny-llama-recall"
KV8 = KVArgs(bits=8, key_axis="token", group_size=64, residual_length=0)


def _load():
    spec = importlib.util.spec_from_file_location("recall_task", REPO / "benchmarks" / "recall_task.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


rt = _load()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return rt.load_model(ASSET)


def test_generator_is_deterministic_and_answer_is_in_context():
    a = rt.eval_prompts(32, 256)
    b = rt.eval_prompts(32, 256)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    prompts, answers, where = a
    assert prompts.shape == (32, 255)
    assert not torch.equal(prompts, rt.eval_prompts(32, 256, seed=rt.EVAL_SEED + 1)[0])
    n_pairs = rt.pairs_for(256)
    ctx = prompts[:, 1 : 1 + 2 * n_pairs].reshape(32, n_pairs, 2)
    keys, values = ctx[..., 0], ctx[..., 1]
    assert ((keys >= rt.KEY0) & (keys < rt.VAL0)).all() and ((values >= rt.VAL0) & (values < rt.VOCAB)).all()
    assert all(len(set(row.tolist())) == n_pairs for row in keys)  # keys distinct: one right answer
    assert (prompts[:, -2] == rt.QUERY).all()
    query = prompts[:, -1]
    rows = torch.arange(32)
    # the query key sits at pair `where`, and the answer is the value stored there
    assert torch.equal(keys[rows, where], query) and torch.equal(values[rows, where], answers)
    # queried pairs spread over the whole context, the first quarter included
    assert where.min() < n_pairs // 8 and where.max() >= n_pairs - n_pairs // 8


def test_training_batch_labels_are_the_queried_values():
    gen = torch.Generator().manual_seed(0)
    ids, labels = rt.make_batch(gen, 3, 6, 4)
    assert ids.shape == (3, 2 + 12 + 8)
    assert (labels != -100).sum() == 3 * 4
    for row, lab in zip(ids.tolist(), labels.tolist()):
        pairs = dict(zip(row[1:13:2], row[2:13:2]))
        assert row[13] == rt.QUERY
        for pos, target in enumerate(lab):
            if target != -100:  # transformers shifts labels: the answer sits at its own position
                assert pos > 13 and row[pos] == target == pairs[row[pos - 1]]
    with pytest.raises(ValueError, match="n_queries"):
        rt.make_batch(gen, 1, 4, 0)
    with pytest.raises(ValueError, match="context"):
        rt.pairs_for(4096)


def test_key_code_keeps_wrong_keys_at_a_quarter():
    code = rt.key_code()
    assert code.shape == (rt.N_KEYS, 32)
    gram = code @ code.T
    assert torch.allclose(gram.diagonal(), torch.ones(rt.N_KEYS))
    off = gram[~torch.eye(rt.N_KEYS, dtype=torch.bool)]
    # every pair of distinct keys: orthogonal, +-1/4, or antipodal (never a second near-match)
    assert torch.isclose(off[:, None], torch.tensor([0.0, 0.25, -0.25, -1.0]), atol=1e-5).any(dim=1).all()


def test_rotated_circuit_is_the_same_function_and_recalls():
    axis = rt.build_model(0).eval()
    rt.induction_init(axis, rotate=False)
    dense = rt.build_model(0).eval()
    rt.induction_init(dense)
    prompts, answers, _ = rt.eval_prompts(16, 256)
    with torch.no_grad():
        a, b = axis(prompts).logits[:, -1], dense(prompts).logits[:, -1]
    # only the mix of layer 1's match dims is inexact under RoPE, and its attention is saturated
    assert (a - b).abs().max() < 1e-4 * a.abs().max()
    assert torch.equal(a.argmax(-1), answers) and torch.equal(b.argmax(-1), answers)
    emb = dense.model.embed_tokens.weight
    assert (emb.abs() < 1e-6).float().mean() < 0.01  # dense: no axis-aligned zeros left
    with pytest.raises(ValueError, match="hidden_size=128"):
        rt.induction_init(rt.build_model(0, hidden_size=64, intermediate_size=128))


def test_shipped_model_recalls_at_256_tokens(model):
    assert model.config.max_position_embeddings >= 1024 and model.config.head_dim == 64
    assert rt.evaluate(model, n=64, context=256) >= 0.9


def test_task_needs_the_early_context(model):
    """Shown only the prompt's last 127 tokens, the model cannot answer queries about pairs before them."""
    prompts, answers, where = rt.eval_prompts(48, 512)
    tail = torch.cat([torch.full((48, 1), rt.BOS), prompts[:, -127:]], dim=1)
    outside = where < rt.pairs_for(512) - 64  # the queried pair is not among the last 127 tokens
    assert outside.sum() >= 30
    full, cut = rt.predict(model, prompts) == answers, rt.predict(model, tail) == answers
    assert full[outside].float().mean() >= 0.9
    assert cut[outside].float().mean() <= 0.1  # chance is 1/64


def test_kv8_cache_keeps_recall(model):
    prompts, answers, _ = rt.eval_prompts(32, 512)
    ref = rt.predict(model, prompts)
    with kv_fake_quant(model, KV8):
        fake = rt.predict(model, prompts)
    cache = rt.predict(model, prompts, generate=True, cache_factory=lambda: QuantizedKVCache(KV8, model.config))
    float_acc = (ref == answers).float().mean()
    assert float_acc >= 0.9
    for pred in (fake, cache):
        assert (pred == ref).sum() >= 31  # int8 K/V: the greedy answers are the float ones
        assert (pred == answers).float().mean() >= float_acc - 1 / 32
