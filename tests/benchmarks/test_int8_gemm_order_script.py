"""``benchmarks/int8_gemm_order.py`` on a small layer: both operand orders of the W8A8 GEMM give the
same output and are timed, and the backend's choice by shape is reported."""

from __future__ import annotations

import math
from pathlib import Path

from pq_bench import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "int8_gemm_order.py"


def test_both_orders_are_checked_and_timed():
    from piecewise_quant.kernels import cpu_backend

    mod = load_script(SCRIPT, "int8_gemm_order_bench")
    rows = mod.measure({"wide": (96, 64), "tall": (64, 96)}, [17], rounds=1, calls=1)
    assert [(r["layer"], r["dtype"]) for r in rows] == [
        ("wide", "float32"), ("wide", "bfloat16"), ("tall", "float32"), ("tall", "bfloat16")]
    assert [r["chosen"] for r in rows] == ["weight left"] * 2 + ["weight right"] * 2  # out >= in: weight left
    for r in rows:
        for key in ("gemm_right_ms", "gemm_left_ms", "layer_right_ms", "layer_left_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert cpu_backend.INT8_GEMM_WEIGHT_LEFT is None  # the forced order is undone
    assert "| wide (96x64) | 17 | float32 |" in mod.table(rows)
