"""benchmarks/kv_grid.py: --quick runs end to end and writes a sane markdown table, JSON and heat map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pq_bench import load_script

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parent.parent.parent
SCRIPT = REPO / "benchmarks" / "kv_grid.py"


def _load():
    return load_script(SCRIPT, "kv_grid_script")


def test_quick_run(tmp_path, capsys):
    kv_grid = _load()
    md, js, png = tmp_path / "grid.md", tmp_path / "grid.json", tmp_path / "grid.png"
    assert kv_grid.main(["--quick", "--markdown", str(md), "--json", str(js), "--plot", str(png)]) == 0
    data = json.loads(js.read_text())
    rows = {r["setting"]: r for r in data["grid"]["rows"]}
    assert {"float", "KV4", "KIVI2", "W4A8", "W4A8KV4"} <= set(rows)
    assert rows["float"]["ppl_delta_pct"] == 0
    # measured bytes: 4-bit per-token cache well under the float32 one, quantized weights smaller
    assert rows["KV4"]["kv_bytes_per_token"] < 0.2 * rows["float"]["kv_bytes_per_token"]
    assert rows["W4A8"]["weight_bytes"] < 0.5 * rows["float"]["weight_bytes"]
    assert all(0 <= r["rep4"] <= 1 and r["ppl"] > 1 for r in rows.values())
    recall = {(r["ctx"], r["setting"]): r for r in data["targets"]["recall"]["rows"]}
    assert {(512, "float"), (512, "KV4"), (512, "KV2 (KIVI)")} <= set(recall)
    assert all(0 <= r["cache"] <= 1 for r in recall.values())
    assert recall[(512, "float")]["fake"] == recall[(512, "float")]["cache"]  # forward and generate() agree
    # the shipped recall model recalls, and not from the last 128 tokens alone
    assert recall[(512, "float")]["cache"] >= 0.9
    assert recall[(512, "float, last 128 tokens only")]["cache"] <= 0.5
    # the grid's recall column: every quick setting, float recalling
    column = {r["setting"]: r for r in data["targets"]["recall_by_setting"]["rows"]}
    assert set(column) == {"float", "KV4", "KIVI2", "W4A8", "W4A8KV4"} and column["float"]["accuracy"] >= 0.9
    assert all(0 <= r["accuracy"] <= 1 for r in column.values())
    text = md.read_text()
    assert "| setting | KV scheme |" in text and "kv_grid.py --quick" in text
    assert "KV4 recall / float recall" in text and "Recall column" in text
    assert png.stat().st_size > 1000
    assert "| W4A8KV4 |" in capsys.readouterr().out
