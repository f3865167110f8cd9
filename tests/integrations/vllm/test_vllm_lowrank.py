"""The vLLM linear method with low-rank (SVDQuant) layers, without an engine: weight creation,
loading per projection (one rank and two, row- and column-parallel), a fused layer whose
projections each keep their own factors, and ``apply``."""

from __future__ import annotations

import pytest
import torch

from piecewise_quant import PiecewiseQuantConfig, lowrank
from piecewise_quant.quantization import layer_spec_for
from piecewise_quant.registry import get_format

CFG = PiecewiseQuantConfig(grid="uniform", bits=4, group_size=32, low_rank=4,
                           overrides={"l.v_proj": {"low_rank": None}, "l.o_proj": {"low_rank": 1.0}})


pytestmark = pytest.mark.usefixtures("no_process_group")


def _quantized(name: str, out: int, inn: int, seed: int):
    spec = CFG.spec_for(name)
    layer = layer_spec_for(name, spec, inn, out)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * 0.05
    w[:, 3] *= 20
    fmt = get_format(spec.grid)
    tensors = fmt.quantize(w, layer)
    return tensors, fmt.dequantize(tensors, layer, torch.float64)


def _method(vh, cls, names, **attrs):
    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig
    from piecewise_quant.integrations.vllm.linear import PiecewiseLinearMethod

    cfg = PiecewiseVllmConfig(CFG, mode="prequantized")
    return PiecewiseLinearMethod(cfg, "l.fused", names, [cfg.core.spec_for(n) for n in names]), vh.fake_layer(cls, **attrs)


def _load(layer, method, tensors_by_shard):
    params = dict(layer.named_parameters())
    for shard_id, tensors in tensors_by_shard:
        for t, v in tensors.items():
            params[t].weight_loader(params[t], v, shard_id)
    method.process_weights_after_loading(layer)


def test_fused_qkv_keeps_one_part_per_low_rank_projection(vh):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    names = ["l.q_proj", "l.k_proj", "l.v_proj"]
    sizes = [64, 32, 32]
    method, layer = _method(vh, QKVParallelLinear, names, tp_rank=0, tp_size=1, num_kv_head_replicas=1)
    method.create_weights(layer, 64, sizes, 64, sum(sizes), torch.float32, weight_loader=None)
    assert {"lowrank_a", "lowrank_b", "qweight", "scales"} <= set(dict(layer.named_parameters()))
    quantized = [_quantized(n, out, 64, i) for i, (n, out) in enumerate(zip(names, sizes))]
    _load(layer, method, [("qkv"[i], t) for i, (t, _) in enumerate(quantized)])
    # q and k have the same scheme but their own factors: not joined; v has no branch
    assert len(layer.pq_parts) == 3
    assert [("lowrank_a" in p.quantized_tensors()) for p in layer.pq_parts] == [True, True, False]
    x = torch.randn(5, 64)
    want = x.double() @ torch.cat([d for _, d in quantized]).t()
    with torch.no_grad():
        assert torch.allclose(method.apply(layer, x).double(), want, atol=2e-5)


@pytest.mark.parametrize("rank", [0, 1])
def test_row_parallel_ranks_cut_b_by_columns_and_their_partial_sums_add_up(vh, rank):
    from vllm.model_executor.layers.linear import RowParallelLinear

    tensors, deq = _quantized("l.o_proj", 48, 128, 7)
    full = layer_spec_for("l.o_proj", CFG.spec_for("l.o_proj"), 128, 48)
    r = lowrank.rank(full)  # a budget of 1 bit per weight: floor(48 * 128 / (16 * 176)) = 2
    method, layer = _method(vh, RowParallelLinear, ["l.o_proj"], tp_rank=rank, tp_size=2)
    method.create_weights(layer, 64, [48], 128, 48, torch.float32, weight_loader=None)
    _load(layer, method, [(None, tensors)])
    (part,) = layer.pq_parts
    assert part.lowrank_a.shape == (48, r) and part.lowrank_b.shape == (r, 64) and part.layer_spec.spec.low_rank == r
    x = torch.randn(3, 64)
    want = x.double() @ deq[:, rank * 64 : rank * 64 + 64].t()
    with torch.no_grad():
        assert torch.allclose(method.apply(layer, x).double(), want, atol=2e-5)


@pytest.mark.parametrize("rank", [0, 1])
def test_column_parallel_ranks_cut_a_by_rows(vh, rank):
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    tensors, deq = _quantized("l.up_proj", 64, 64, 9)
    method, layer = _method(vh, ColumnParallelLinear, ["l.up_proj"], tp_rank=rank, tp_size=2)
    method.create_weights(layer, 64, [32], 64, 64, torch.float32, weight_loader=None)
    _load(layer, method, [(None, tensors)])
    (part,) = layer.pq_parts
    assert part.lowrank_a.shape == (32, 4) and part.lowrank_b.shape == (4, 64)
    x = torch.randn(3, 64)
    want = x.double() @ deq[rank * 32 : rank * 32 + 32].t()
    with torch.no_grad():
        assert torch.allclose(method.apply(layer, x).double(), want, atol=2e-5)


def test_online_quantization_keeps_the_branch(vh):
    from vllm.model_executor.layers.linear import ReplicatedLinear

    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig
    from piecewise_quant.integrations.vllm.linear import PiecewiseLinearMethod

    cfg = PiecewiseVllmConfig(CFG, mode="online")
    method = PiecewiseLinearMethod(cfg, "l.up_proj", ["l.up_proj"], [cfg.core.spec_for("l.up_proj")])
    layer = vh.fake_layer(ReplicatedLinear)
    method.create_weights(layer, 64, [48], 64, 48, torch.float32, weight_loader=lambda p, w: p.data.copy_(w))
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3)) * 0.05
    layer.weight.data.copy_(w)
    method.process_weights_after_loading(layer)
    (part,) = layer.pq_parts
    assert part.lowrank_a.shape == (48, 4)
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.allclose(method.apply(layer, x).double(), x.double() @ part.dequantize(torch.float64).t(), atol=2e-5)


# ---- served by the engine (the shared vLLM run of conftest) ----------------------------------------


@pytest.mark.vllm
@pytest.mark.slow
def test_low_rank_checkpoint_is_served_like_transformers(vh, vllm_results, checkpoints):
    from transformers import AutoModelForCausalLM

    got = vllm_results["gqa_lowrank"]
    assert "error" not in got, got.get("traceback", got.get("error"))
    vh.register_transformers()
    model = AutoModelForCausalLM.from_pretrained(checkpoints["gqa_lowrank"], dtype=torch.float32).eval()
    assert model.model.layers[0].mlp.down_proj.lowrank_a.shape == (128, 2)  # 0.5 bits: floor(128*256*0.5/(16*384))
    ref = vh.hf_reference(model, vh.prompt_ids())
    vh.assert_same_generation(got["tokens"], ref)
    assert vh.max_logprob_diff(got["prompt_logprobs"], ref["prompt_logprobs"]) < 1e-4


@pytest.mark.vllm
@pytest.mark.slow
def test_two_ranks_add_up_the_low_rank_partial_sums(vllm_tp2_results, vllm_results):
    """Row-parallel o_proj/down_proj: each rank's ``(x_j B_j^T) A^T`` is a partial sum; weight-only,
    so two ranks answer like one."""
    tp2, tp1 = vllm_tp2_results["gqa_lowrank"], vllm_results["gqa_lowrank"]
    assert "error" not in tp2, tp2.get("traceback", tp2.get("error"))
    assert tp2["tokens"] == tp1["tokens"]
    diff = max(abs(x - y) for p, q in zip(tp2["prompt_logprobs"], tp1["prompt_logprobs"]) for x, y in zip(p, q))
    assert diff < 1e-4
