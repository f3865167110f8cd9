"""``benchmarks/outlier_overhead.py`` on a small layer: every row times the dense layer, the layer
with outliers and the torch.sparse anchor, after checking that the two sparse paths agree."""

from __future__ import annotations

import math
from pathlib import Path

from pq_bench import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "outlier_overhead.py"


def test_rows_time_both_sparse_paths():
    rows = load_script(SCRIPT, "outlier_overhead_bench").measure(3, 2, size=256, repeat=2)
    assert [r["m"] for r in rows] == [1, 64]
    for r in rows:
        for key in ("dense_ms", "with_outliers_ms", "torch_sparse_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["bpw"] == r["bpw_dense"] + 2 * 24 / 128


def test_the_sweep_times_the_sparse_add_alone():
    rows = load_script(SCRIPT, "outlier_overhead_bench").sweep(256, 2, rows=(1, 5))
    assert [r["m"] for r in rows] == [1, 5]
    for r in rows:
        assert math.isfinite(r["torch_sparse_us"]) and r["torch_sparse_us"] > 0
        assert math.isfinite(r["kernel_us"]) and r["kernel_us"] > 0
