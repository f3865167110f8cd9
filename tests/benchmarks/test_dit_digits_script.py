"""The DiT digits benchmark runs end to end in quick mode (a 20-step training run, a handful of
generated images per configuration), so the script cannot rot; and its numbers are sane: 8-bit
rows stay close to float, the table and the JSON agree."""

from __future__ import annotations

import json
import math

import pytest
from pq_bench import quick_table_rows

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")


@pytest.mark.slow
def test_quick_run_prints_the_table_and_writes_json_and_png(repo_root, tmp_path):
    rows, _ = quick_table_rows(repo_root, "benchmarks/dit_digits.py", tmp_path)
    assert list(rows) == [
        "float", "W8A8 static, shared scales", "W8A8 static, per-timestep scales", "W8A8 dynamic per-token",
        "W4A16 uniform g16", "W4A16 piecewise g16",
    ]
    data = json.loads((tmp_path / "dit_digits.json").read_text())
    assert (tmp_path / "dit_digits.png").stat().st_size > 1000
    assert (tmp_path / "model" / "config.json").is_file()
    by_name = {r["name"]: r for r in data["rows"]}
    assert set(by_name) == set(rows)
    for name, r in by_name.items():
        assert f"{r['accuracy']:.3f}" == rows[name][3] and f"{r['fd']:.2f}" == rows[name][4]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["fd"] >= 0
    assert math.isinf(by_name["float"]["psnr_vs_float"])
    # same noise: 8-bit weights and activations barely move the images, 4-bit weights more
    for name in ("W8A8 static, shared scales", "W8A8 static, per-timestep scales", "W8A8 dynamic per-token"):
        assert by_name[name]["psnr_vs_float"] > 30, by_name[name]
        assert by_name[name]["psnr_vs_float"] > by_name["W4A16 uniform g16"]["psnr_vs_float"]
    assert 8.0 < by_name["W8A8 dynamic per-token"]["bits_per_weight"] < 9.0
    assert 4.0 < by_name["W4A16 piecewise g16"]["bits_per_weight"] < 5.5
    assert by_name["W4A16 piecewise g16"]["weight_bytes"] < by_name["float"]["weight_bytes"]
    assert 0.9 < data["judge"]["real_test_accuracy"] <= 1.0
