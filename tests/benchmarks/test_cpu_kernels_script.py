"""``benchmarks/cpu_kernels.py --dry-run`` on the W8A8 cases: the prepacked case runs oneDNN's GEMM
from the rows where the backend routes it there, and oneDNN's own GEMM is an anchor row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pq_bench import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_kernels.py"


def test_dry_run_times_the_prepacked_w8a8_case_beside_the_anchors(tmp_path):
    from piecewise_quant.kernels import cpu_backend

    if not cpu_backend.status()["available"]:
        pytest.skip(cpu_backend.status()["reason"])
    mod = load_script(SCRIPT, "cpu_kernels_bench")
    out = tmp_path / "w8a8.md"
    assert mod.main(["--dry-run", "--cases", "W8A8", "--m", "1,32", "--no-progress", "--output", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    cases = {(r["case"], r["act"], r["m"]): r for r in rows}
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in rows)
    assert cases[("torch._int_mm (int8)", "int8", 32)]["backend"] == "torch"
    assert cases[("W8A8 int8 dynamic", "float32", 32)]["backend"] == "cpu int8 GEMM (torch._int_mm)"
    prepacked = [("W8A8 int8 dynamic, prepacked (oneDNN)", act, 32) for act in ("float32", "bfloat16")]
    if cpu_backend.onednn_int8_status()[0]:
        assert ("oneDNN qlinear u8s8 (int8, prepacked)", "int8", 32) in cases
        assert all(cases[key]["backend"] == "cpu int8 GEMM (oneDNN u8s8, prepacked)" for key in prepacked)
        assert "oneDNN" not in cases[("W8A8 int8 dynamic, prepacked (oneDNN)", "float32", 1)]["backend"]
    else:
        assert not any("oneDNN" in case for case, _, _ in cases)  # skipped, with the progress bar still full
