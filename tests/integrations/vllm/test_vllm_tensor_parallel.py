"""Tensor parallelism: weights, scales, zero points and breakpoint ids are cut per rank by the
piecewise parameters' loaders (``--tensor-parallel-size 2`` on CPU, one worker per core), and
the shard arithmetic, including grouped-query KV-head replication, is checked directly."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.vllm]


@pytest.mark.slow
def test_two_ranks_answer_like_one_when_no_activation_is_quantized_per_rank(vllm_tp2_results, vllm_results):
    """W4A16: the two ranks' partial sums add up to what one rank computes (bit-close)."""
    tp2, tp1 = vllm_tp2_results["bundled_w4"], vllm_results["bundled_w4"]
    assert "error" not in tp2, tp2.get("traceback", tp2.get("error"))
    assert tp2["tokens"] == tp1["tokens"]
    assert _max_diff(tp2, tp1) < 1e-4


@pytest.mark.slow
def test_two_ranks_serve_mixed_schemes_like_transformers(vh, vllm_tp2_results, vllm_results, checkpoints):
    """The mixed GQA model: every scheme cut across two ranks. Its down_proj quantizes activations
    per token at run time, and under row parallelism each rank scales its own half of the input
    (as vLLM's own int8/fp8 methods do), so logits move by a few hundredths; greedy tokens match
    transformers up to near ties (logit gap < 0.1)."""
    from transformers import AutoModelForCausalLM

    tp2 = vllm_tp2_results["gqa_mixed"]
    assert "error" not in tp2, tp2.get("traceback", tp2.get("error"))
    assert _max_diff(tp2, vllm_results["gqa_mixed"]) < 0.05
    vh.register_transformers()
    model = AutoModelForCausalLM.from_pretrained(checkpoints["gqa_mixed"], dtype=torch.float32).eval()
    vh.assert_same_generation(tp2["tokens"], vh.hf_reference(model, vh.prompt_ids()), tie=0.1)


def _max_diff(a: dict, b: dict) -> float:
    return max(abs(x - y) for p, q in zip(a["prompt_logprobs"], b["prompt_logprobs"]) for x, y in zip(p, q))


@pytest.mark.parametrize("tp_size, kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_qkv_rows_per_rank_follow_kv_head_replication(vh, tp_size, kv_heads):
    """8 query heads and ``kv_heads`` KV heads of 16 dims over ``tp_size`` ranks: every rank's
    q/k/v rows are the heads vLLM's attention gives that rank (KV heads replicated when there
    are fewer KV heads than ranks)."""
    from vllm.model_executor.layers.linear import QKVParallelLinear

    from piecewise_quant import PiecewiseQuantConfig
    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig
    from piecewise_quant.integrations.vllm.linear import PiecewiseLinearMethod

    head, heads = 16, 8
    cfg = PiecewiseVllmConfig(PiecewiseQuantConfig(bits=4, group_size=32), mode="prequantized")
    names = [f"l.{p}_proj" for p in "qkv"]
    method = PiecewiseLinearMethod(cfg, "l.qkv_proj", names, [cfg.core.spec_for(n) for n in names])
    replicas = max(1, tp_size // kv_heads)
    kv_per_rank = max(1, kv_heads // tp_size)
    seen_k = set()
    for rank in range(tp_size):
        layer = vh.fake_layer(QKVParallelLinear, tp_rank=rank, tp_size=tp_size, num_kv_head_replicas=replicas)
        parts = [heads // tp_size * head, kv_per_rank * head, kv_per_rank * head]
        shards = method._shards(layer, 64, parts, 64)
        q, k, v = shards
        assert q.full_out == heads * head and k.full_out == v.full_out == kv_heads * head
        assert q.rows == (rank * parts[0], (rank + 1) * parts[0])
        kv_rank = rank // replicas
        assert k.rows == v.rows == (kv_rank * parts[1], (kv_rank + 1) * parts[1])
        assert all(s.cols == (0, 64) for s in shards)
        seen_k.add(k.rows)
    assert len(seen_k) == kv_heads  # every KV head is held by some rank


def test_row_parallel_ranks_take_input_columns(vh):
    from vllm.model_executor.layers.linear import RowParallelLinear

    from piecewise_quant import PiecewiseQuantConfig
    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig
    from piecewise_quant.integrations.vllm.linear import PiecewiseLinearMethod

    cfg = PiecewiseVllmConfig(PiecewiseQuantConfig(bits=4, group_size=32), mode="prequantized")
    method = PiecewiseLinearMethod(cfg, "l.o_proj", ["l.o_proj"], [cfg.core.spec_for("l.o_proj")])
    for rank in range(2):
        layer = vh.fake_layer(RowParallelLinear, tp_rank=rank, tp_size=2)
        (s,) = method._shards(layer, 64, [96], 128)
        assert s.rows == (0, 96) and s.cols == (rank * 64, rank * 64 + 64) and s.full.in_features == 128


def test_online_rotations_refuse_the_tensor_parallel_split_they_cannot_take():
    from piecewise_quant.args import OnlineRotation
    from piecewise_quant.integrations.vllm.linear import _check_rotation_tp

    _check_rotation_tp("down_proj", OnlineRotation(True, False, 0), row_parallel=True, tp_size=1)
    _check_rotation_tp("q_proj", OnlineRotation(True, False, 0), row_parallel=False, tp_size=2)  # input whole
    with pytest.raises(NotImplementedError, match="rotates its input online"):
        _check_rotation_tp("down_proj", OnlineRotation(True, False, 0), row_parallel=True, tp_size=2)
    with pytest.raises(NotImplementedError, match="rotates its output online"):
        _check_rotation_tp("q_proj", OnlineRotation(False, True, 0), row_parallel=False, tp_size=2)
    # ViDiT-Q balance: a smoothing scale before the input rotation; served where the input stays whole
    balance = OnlineRotation(True, False, 0, balance=True)
    _check_rotation_tp("q_proj", balance, row_parallel=False, tp_size=2)
    _check_rotation_tp("down_proj", balance, row_parallel=True, tp_size=1)
    with pytest.raises(NotImplementedError, match="rotates its input online"):
        _check_rotation_tp("down_proj", balance, row_parallel=True, tp_size=2)
