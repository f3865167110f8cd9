"""``benchmarks/kernels.py --dry-run``: the whole script path on CPU under the Triton interpreter."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = [pytest.mark.slow, pytest.mark.triton]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"
CASE_NAMES = ("W4A16 g128 uniform", "W4A16 g128 piecewise", "W3A16 g128 uniform", "W3A16 g128 piecewise",
              "W8A16 g128 uniform", "W8A8 int8", "W8A8 fp8")


def test_dry_run_prints_and_writes_every_case(tmp_path):
    out = tmp_path / "kernels.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--no-progress", "--m", "1,16,17",
                           "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert text in proc.stdout
    assert "dry run, interpreter, timings meaningless" in text
    rows = [line for line in text.splitlines() if line.startswith("| W")]
    assert len(rows) == len(CASE_NAMES) * 3
    for name in CASE_NAMES:
        assert sum(row.startswith(f"| {name} |") for row in rows) == 3, name
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["dry_run"] is True and data["peak_gbps"] is None
    assert {r["case"] for r in data["rows"]} == set(CASE_NAMES)
    assert sorted({r["m"] for r in data["rows"]}) == [1, 16, 17]
    for r in data["rows"]:
        for key in ("ms", "fp16_ms", "speedup", "gbps", "tflops"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["ideal_fraction"] is None
        assert r["rel_err"] < 2e-3, r  # float16 activations against the reference


def test_without_a_gpu_it_refuses_the_real_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
