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
    assert len(rows) == 11 and all(r[1].endswith(", seed 3") for r in rows)
    assert {mod.pq.PiecewiseQuantConfig(**kw).rotation.seed for _, _, kw, _ in rows} == {3}
    assert {mod.pq.PiecewiseQuantConfig(**kw).rotation.rotations for _, _, kw, _ in rows} == {("balance",)}
    table = mod.tables([{"layer": "down", "shape": "768 -> 256", "a4_plain_us": 50.0, "a4_r4_us": 60.0,
                         "a4_balance_us": 55.0}])
    assert "| down | 768 -> 256 | 50.0 | 60.0 | +20.0% | 55.0 | +10.0% |  |  |  |" in table
    anchored = mod.tables([{"layer": "down", "shape": "768 -> 256", "a4_plain_us": 50.0, "a4_r4_us": 60.0,
                            "a4_balance_us": 55.0, "a4_op_us": 70.0, "a4_op_r4_us": 80.0, "a4_asym_r4_us": 20.0,
                            "fp32_us": 40.0, "bf16_us": 20.0}])
    assert "| 70.0 | 80.0 | 20.0 | 40.0 | 20.0 | 2.00x / 1.00x |" in anchored


def test_merge_keeps_one_float_row_and_summarises_each_method_over_its_seeds(tmp_path, capsys):
    import json

    import pytest

    mod = load_script(SCRIPT, "rotation_bench")
    flt = {"model": "llama", "setting": "float", "method": "float32", "ppl": 36.76, "ood_ppl": 97.05}

    def row(method, seed, delta, ood):
        return {"model": "llama", "setting": "W4A4", "method": f"{method}, seed {seed}", "ppl": 36.76 + delta,
                "delta": delta, "ood_ppl": 97.05 + ood, "ood_delta": ood, "bpw": 4.2, "quant_s": 1.0}

    for seed, (a, b) in enumerate([(0.5, 0.6), (0.4, 0.8), (0.6, 0.7)]):
        (tmp_path / f"s{seed}.json").write_text(json.dumps([flt, row("m", seed, a, b), row("n", seed, a + 1, b)]))
    paths = [tmp_path / f"s{k}.json" for k in (2, 0, 1)]
    merged = mod.merge(paths)
    assert sum(r["setting"] == "float" for r in merged) == 1 and len(merged) == 7
    summary = mod.seed_summary(merged)
    assert "| W4A4 | m | +0.500 / +0.400 / +0.600 (seeds 0, 1, 2) | +0.500 | +0.700 |" in summary
    assert "| W4A4 | n | +1.500 / +1.400 / +1.600 (seeds 0, 1, 2) | +1.500 | +0.700 |" in summary
    assert mod.main(["--merge", *map(str, paths), "--json", str(tmp_path / "all.json")]) == 0
    assert json.loads((tmp_path / "all.json").read_text()) == merged
    assert "(seeds 0, 1, 2)" in capsys.readouterr().out
    (tmp_path / "other.json").write_text(json.dumps([{**flt, "ppl": 40.0}]))
    with pytest.raises(SystemExit, match="float perplexities"):
        mod.merge([paths[0], tmp_path / "other.json"])
    with pytest.raises(SystemExit, match="seed 0 appears twice"):
        mod.seed_summary(mod.merge([paths[1], paths[1]]))


def test_exact_selection_takes_one_row_where_a_substring_takes_its_variants():
    mod = load_script(SCRIPT, "rotation_bench")
    rows = mod.llama_rows()
    label = "W4A4 asymmetric A4, piecewise + GPTQ + balance + act clip search"
    assert [f"{r[0]} {r[1]}" for r in mod.select(rows, [label], exact=True)] == [label]
    assert len(mod.select(rows, [label])) == 2  # also the "best of 4 rotation seeds" row
    assert mod.select(rows, []) == rows
    trials = mod.select(rows, ["best of 4 rotation seeds"])
    assert len(trials) == 1 and trials[0][2]["calibration"].rotation_trials == 4
