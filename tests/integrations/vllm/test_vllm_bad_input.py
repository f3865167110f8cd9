"""Checkpoints that do not match their config fail at load time with an error naming the
tensor or field."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.mark.parametrize(
    "job, needles",
    [
        ("bad_missing", ["model.layers.0.self_attn.k_proj.scales", "missing"]),
        ("bad_shape", ["model.layers.1.mlp.down_proj.qweight", "shape"]),
        # the edited config.json no longer matches the plan hash the weights were saved with
        ("bad_grid", ["not the one its tensors were written with"]),
        ("bad_version", ["version"]),
        ("other_method", ["gptq", "piecewise"]),
    ],
)
def test_bad_checkpoints_are_refused_by_name(vllm_results, job, needles):
    result = vllm_results[job]
    assert "error" in result, f"{job} loaded without error"
    for needle in needles:
        assert needle in result["error"], result["error"]
