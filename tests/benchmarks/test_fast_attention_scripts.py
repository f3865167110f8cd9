"""``benchmarks/fast_attention.py --quick`` and ``benchmarks/fast_attention_quality.py --quick`` run
end to end (tiny shapes, a 20-step training run), so the scripts behind docs/fast-attention.md
cannot rot; their JSON agrees with what they print."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}


def test_speed_script_quick(repo_root, tmp_path):
    out = tmp_path / "fa.json"
    proc = subprocess.run([sys.executable, "benchmarks/fast_attention.py", "--quick", "--out", str(out)],
                          cwd=repo_root, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    kinds = {(r["tokens"], r["kind"]) for r in data["kernel"]}
    assert {(256, "dense SDPA"), (256, "window 1-D"), (1024, "window 2-D")} <= kinds
    assert all(0 < r["keys_fraction"] <= 1 and r["seconds"] > 0 for r in data["kernel"])
    assert len(data["forward"]) == 6 and data["forward"][0]["speedup"] == 1.0
    assert "| 256 | window 1-D |" in proc.stdout


@pytest.mark.slow
def test_quality_script_quick(repo_root, tmp_path):
    pytest.importorskip("sklearn")
    proc = subprocess.run([sys.executable, "benchmarks/fast_attention_quality.py", "--quick", "--out", str(tmp_path)],
                          cwd=repo_root, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "fast_attention_quality.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names[0] == "float" and "W8A8 dynamic per-token" in names and names[-1].startswith("W8A8 + fast attention")
    fa = [r for r in data["rows"] if "threshold" in r and "window_shape" in r]
    assert {r["threshold"] for r in fa} == {0.0, 0.15}
    zero = [r for r in fa if r["threshold"] == 0.0]
    assert all(r["flops_saved"] == pytest.approx(0.0) and r["psnr_vs_float"] == float("inf") for r in zero)
    assert (tmp_path / "fast_attention_quality.png").stat().st_size > 1000


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_speed_script_quick_joint_attention(repo_root, tmp_path, model):
    out = tmp_path / "fa.json"
    proc = subprocess.run([sys.executable, "benchmarks/fast_attention.py", "forward", "--quick", "--model", model,
                           "--out", str(out)], cwd=repo_root, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())[f"forward_{model}"]
    assert len(rows) == (6 if model == "sd3" else 4) and rows[0]["speedup"] == 1.0
    saved = {r["method"].split(" (")[0]: r["flops_saved"] for r in rows}
    assert saved["full, also caching the window residual"] < 0 < saved["WA-RS"] < saved["AST"] == 1.0
    assert rows[0]["attention_layers"] == (1 if model == "sd3" else 2) and rows[0]["text_tokens"] == 8
