"""The calibration benchmark runs end to end (quick mode) and its numbers say what the docs say:
GPTQ beats round-to-nearest and SmoothQuant recovers the outlier model at W8A8."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_llama_run_prints_a_table_where_calibration_wins(repo_root):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/calibration_quality.py", "--quick", "--models", "llama", "--no-peer"],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"[+-]\d+\.\d+", cells[4]):
            rows[(cells[0], cells[1])] = float(cells[4])
    rtn = rows[("W4A16 g128", "RTN uniform (min/max)")]
    gptq = rows[("W4A16 g128", "piecewise + GPTQ")]
    sq = rows[("outlier W8A8 static", "+ SmoothQuant")]
    assert gptq < rtn / 3, rows
    assert abs(sq) < 0.05, rows
