"""``benchmarks/rotation.py``: the calibration-window count reaches every calibrated llama row
(the quality runs themselves take minutes; their pieces are the tested ``calibrate`` and rotations)."""

from __future__ import annotations

from pathlib import Path

from pq_bench import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "rotation.py"


def test_llama_windows_set_every_calibrated_rows_sample_count():
    mod = load_script(SCRIPT, "rotation_bench")
    for windows in (32, 7):
        rows = mod.llama_rows(windows)
        cals = [kw["calibration"] for _, _, kw, _ in rows if kw.get("calibration") is not None]
        assert len(cals) >= len(rows) - 1  # only the RTN row is data-free
        assert {(c.n_samples, c.seq_len) for c in cals} == {(windows, 256)}
    assert mod.llama_rows() == mod.llama_rows(32)


def test_rotation_seed_reaches_the_balance_rows_and_the_w4a4_cost_table_reports_overheads():
    mod = load_script(SCRIPT, "rotation_bench")
    rows = [r for r in mod.with_seed(mod.llama_rows(), 3) if "balance" in r[1]]
    assert len(rows) == 10 and all(r[1].endswith(", seed 3") for r in rows)
    assert {mod.pq.PiecewiseQuantConfig(**kw).rotation.seed for _, _, kw, _ in rows} == {3}
    assert {mod.pq.PiecewiseQuantConfig(**kw).rotation.rotations for _, _, kw, _ in rows} == {("balance",)}
    table = mod.tables([{"layer": "down", "shape": "768 -> 256", "a4_plain_us": 50.0, "a4_r4_us": 60.0,
                         "a4_balance_us": 55.0}])
    assert "| down | 768 -> 256 | 50.0 | 60.0 | +20.0% | 55.0 | +10.0% |  |  |  |" in table
