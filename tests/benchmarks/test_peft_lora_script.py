"""The PEFT LoRA benchmark runs end to end in quick mode, so the script cannot rot; and its numbers
are sane: the packed base is several times smaller than the float one and no float copy of a base
weight is kept for backward, training lowers the held-out loss for both bases, the float merge
reproduces the adapter model, the re-quantized merge is bounded, and the table matches the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")


@pytest.mark.slow
def test_quick_run_prints_the_tables_and_writes_json(repo_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "peft.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/peft_lora.py", "--quick", "--json", str(out)],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    rows, merge = r["rows"], r["merge"]
    assert set(rows) == {"float", "piecewise-w4-g128"}
    fl, q = rows["float"], rows["piecewise-w4-g128"]
    assert fl["targeted_layers"] == q["targeted_layers"] == 42
    assert 5 < fl["base_weight_bytes"] / q["base_weight_bytes"] < 8  # fp32 vs ~4.16 bits per weight
    assert q["float_weight_copies_saved"] == 0
    assert q["lora_param_bytes"] == fl["lora_param_bytes"]
    for row in rows.values():
        assert row["loss_after"] < row["loss_before"] - 0.02
    assert merge["merge_to='float'"]["max_abs_logit_diff"] < 1e-3
    assert merge["merge_to='float'"]["layer_type"] == "Linear"
    assert merge["merge_to='quantized'"]["layer_type"] == "QuantLinear"
    assert 0 < merge["merge_to='quantized'"]["max_abs_logit_diff"] < 10
    assert merge["merge_to='quantized'"]["perplexity"] < 1.2 * merge["unmerged adapter"]["perplexity"]
    for name, row in merge.items():
        assert f"| {name} |" in proc.stdout and f"{row['perplexity']:.3f}" in proc.stdout
    assert f"{q['loss_after']:.4f}" in proc.stdout
