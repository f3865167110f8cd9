"""``benchmarks/lowrank.py``: the cost part on a small layer (the quality part calibrates the
bundled model 20 times; its pieces are the tested ``calibrate`` and ``perplexity``)."""

from __future__ import annotations

import math
from pathlib import Path

from pq_bench import load_script

from piecewise_quant.kernels import cpu_backend

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lowrank.py"


def _module():
    return load_script(SCRIPT, "lowrank_bench")


def test_cost_rows_time_the_layer_with_and_without_the_branch():
    rows: list[dict] = []
    _module().run_cost(rows, size=256, repeat=2, ranks=(4, 8))
    assert [(r["rank"], r["m"]) for r in rows] == [(4, 1), (4, 64), (8, 1), (8, 64)]
    for r in rows:
        for key in ("dense_ms", "with_low_rank_ms", "branch_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["bpw"] == r["bpw_dense"] + 16 * r["rank"] * 512 / 256**2
        if r["m"] == 64:  # above the kernel's 16 rows: F.linear only
            assert r["branch_kernel_ms"] is None
        elif cpu_backend.status()["available"]:
            assert math.isfinite(r["branch_kernel_ms"]) and r["branch_kernel_ms"] > 0
