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
