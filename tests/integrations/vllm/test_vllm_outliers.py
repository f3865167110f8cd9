"""The vLLM linear method with dense-and-sparse layers, without an engine: weight creation,
loading per projection (one rank and two), joining a fused layer, and ``apply``."""

from __future__ import annotations

import pytest
import torch

from piecewise_quant import PiecewiseQuantConfig, outliers
from piecewise_quant.quantization import layer_spec_for
from piecewise_quant.registry import get_format

CFG = PiecewiseQuantConfig(bits=3, group_size=32, outliers=1, overrides={"l.v_proj": {"grid": "uniform", "outliers": 2}})


pytestmark = pytest.mark.usefixtures("no_process_group")


def _quantized(name: str, out: int, inn: int, seed: int):
    spec = CFG.spec_for(name)
    layer = layer_spec_for(name, spec, inn, out)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * 0.05
    w[torch.rand(out, inn, generator=g) < 0.01] *= 20
    fmt = get_format(spec.grid)
    tensors = fmt.quantize(w, layer)
    return tensors, fmt.dequantize(tensors, layer, torch.float64)


def _method(vh, cls, names, **attrs):
    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig
    from piecewise_quant.integrations.vllm.linear import PiecewiseLinearMethod

    cfg = PiecewiseVllmConfig(CFG, mode="prequantized")
    return PiecewiseLinearMethod(cfg, "l.fused", names, [cfg.core.spec_for(n) for n in names]), vh.fake_layer(cls, **attrs)


def test_fused_qkv_with_outliers_loads_and_applies_dense_plus_sparse(vh):
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.linear import QKVParallelLinear

    names = ["l.q_proj", "l.k_proj", "l.v_proj"]
    sizes = [64, 32, 32]
    method, layer = _method(vh, QKVParallelLinear, names, tp_rank=0, tp_size=1, num_kv_head_replicas=1)
    method.create_weights(layer, 64, sizes, 64, sum(sizes), torch.float32, weight_loader=None)
    params = dict(layer.named_parameters())
    assert {"outlier_idx", "outlier_vals", "qweight", "scales"} <= set(params)
    dense = []
    for i, (name, out) in enumerate(zip(names, sizes)):
        tensors, deq = _quantized(name, out, 64, i)
        dense.append(deq)
        for t, v in tensors.items():
            params[t].weight_loader(params[t], v, "qkv"[i])
    method.process_weights_after_loading(layer)
    assert len(layer.pq_parts) == 2  # q and k joined (same scheme), v on its own
    x = torch.randn(5, 64)
    got = method.apply(layer, x)
    want = x.double() @ torch.cat(dense).t()
    assert torch.allclose(got.double(), want, atol=2e-5)


@pytest.mark.parametrize("rank", [0, 1])
def test_row_parallel_ranks_cut_outliers_by_whole_groups(vh, rank):
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.linear import RowParallelLinear

    method, layer = _method(vh, RowParallelLinear, ["l.o_proj"], tp_rank=rank, tp_size=2)
    method.create_weights(layer, 64, [48], 128, 48, torch.float32, weight_loader=None)
    tensors, deq = _quantized("l.o_proj", 48, 128, 7)
    params = dict(layer.named_parameters())
    for t, v in tensors.items():
        params[t].weight_loader(params[t], v, None)
    method.process_weights_after_loading(layer)
    (part,) = layer.pq_parts
    assert part.outlier_idx.shape == (48, 2) and outliers.has_outliers(part.layer_spec)
    x = torch.randn(3, 64)
    want = x.double() @ deq[:, rank * 64 : rank * 64 + 64].t()
    assert torch.allclose(method.apply(layer, x).double(), want, atol=2e-5)
