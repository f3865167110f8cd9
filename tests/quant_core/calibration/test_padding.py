"""Padding positions of padded calibration batches never enter statistics: ranges, mean squares,
GPTQ Hessians and static activation scales of a padded batch equal those of the same sequences
run one by one without padding."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import BertConfig, BertModel  # noqa: E402

from piecewise_quant.calibration.blocks import capture_block_inputs, run_block  # noqa: E402
from piecewise_quant.calibration.gptq import HessianAccumulator  # noqa: E402
from piecewise_quant.calibration.state import collect_stats  # noqa: E402
from piecewise_quant.token_mask import token_mask  # noqa: E402

LAYERS = {"attention.self.query": "q", "intermediate.dense": "fc1"}


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=64)).eval()


def _stats(model, batches):
    block = model.encoder.layer[0]
    inputs = capture_block_inputs(model, block, batches)
    return collect_stats(block, lambda h: run_block(block, inputs, h), inputs.hidden, LAYERS, hessian=True)


def test_padded_batch_gives_the_statistics_of_its_real_tokens(bert):
    g = torch.Generator().manual_seed(1)
    short, long = torch.randint(5, 100, (1, 5), generator=g), torch.randint(5, 100, (1, 9), generator=g)
    padded = torch.zeros(2, 9, dtype=torch.long)
    padded[0, :5], padded[1] = short[0], long[0]
    mask = (padded != 0).long()
    got = _stats(bert, [{"input_ids": padded, "attention_mask": mask}])
    ref = _stats(bert, [{"input_ids": short}, {"input_ids": long}])
    for name in LAYERS:
        a, b = got[name], ref[name]
        assert a.tokens == b.tokens == 14
        for field in ("amax", "amin", "sumsq", "xtx"):
            assert torch.allclose(getattr(a, field), getattr(b, field), rtol=1e-4, atol=1e-4), (name, field)
    unmasked = _stats(bert, [{"input_ids": padded}])  # what the padding did before: 18 rows
    assert unmasked["attention.self.query"].tokens == 18


def test_hessian_accumulator_and_static_observation_drop_padding():
    from piecewise_quant.activation import ActQuantizer
    from piecewise_quant.args import ActArgs

    x = torch.randn(2, 6, 8)
    x[1, 4:] = 100.0  # padding rows with a huge value
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    acc, ref = HessianAccumulator(8), HessianAccumulator(8)
    with token_mask(mask):
        acc.add(x)
    ref.add(x[mask])
    assert acc.n_tokens == 10 and torch.equal(acc.hessian, ref.hessian)
    buffers = {"act_scale": torch.zeros(())}
    q = ActQuantizer(ActArgs(format="int", bits=8, strategy="tensor", dynamic=False), "layer", buffers)
    q.start()
    with token_mask(mask):
        q._observe(x)
    q.finish()
    assert float(buffers["act_scale"]) == pytest.approx(float(x[mask].abs().max()) / 127, rel=1e-6)
