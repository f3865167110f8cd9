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
        free = [m for _, m, kw, _ in rows if kw.get("calibration") is None]
        assert free and all("RTN" in m for m in free)  # only round-to-nearest rows are data-free
        assert {(c.n_samples, c.seq_len) for c in cals} == {(windows, 256)}
    assert mod.llama_rows() == mod.llama_rows(32)


def test_rotation_seed_reaches_the_balance_rows_and_the_w4a4_cost_table_reports_overheads():
    mod = load_script(SCRIPT, "rotation_bench")
    rows = [r for r in mod.with_seed(mod.llama_rows(), 3) if "balance" in r[1]]
    assert len(rows) == 12 and all(r[1].endswith(", seed 3") for r in rows)
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
    assert "MiniLM" not in summary  # no MiniLM rows, no MiniLM table
    cos = [{"model": "minilm", "setting": "W3A16 g128", "method": method, "cos_mean": c, "bpw": 3.1}
           for method, c in (("p, RTN + quip, seed 1", 0.84), ("p, RTN", 0.89), ("p, RTN + quip, seed 0", 0.86))]
    both = mod.seed_summary(merged + cos)
    assert both.startswith(summary) and "| W3A16 g128 | p, RTN | 0.8900 (seeds 0) | 0.8900 |" in both
    assert "| W3A16 g128 | p, RTN + quip | 0.8600 / 0.8400 (seeds 0, 1) | 0.8500 |" in both


def test_exact_selection_takes_one_row_where_a_substring_takes_its_variants():
    mod = load_script(SCRIPT, "rotation_bench")
    rows = mod.llama_rows()
    label = "W4A4 asymmetric A4, piecewise + GPTQ + balance + act clip search"
    assert [f"{r[0]} {r[1]}" for r in mod.select(rows, [label], exact=True)] == [label]
    assert len(mod.select(rows, [label])) == 3  # also the "best of 4" and "best of 8 rotation seeds" rows
    assert mod.select(rows, []) == rows
    trials = mod.select(rows, ["best of 4 rotation seeds"])
    assert len(trials) == 1 and trials[0][2]["calibration"].rotation_trials == 4


def test_trial_summary_keeps_the_closest_seed_of_every_subset_and_windows_are_prefixes():
    import argparse
    import itertools
    import statistics

    import pytest

    mod = load_script(SCRIPT, "rotation_bench")
    deltas = [0.5, 0.4, 0.6, 0.45, 0.55]
    # kl_calibration ranks seeds backwards, the held-aside score forwards (seed 1 best, seed 2 worst)
    rows = [{"model": "llama", "setting": "W4A4", "method": f"m, seed {s}", "delta": d, "ood_delta": 2 * d,
             "kl_calibration": 1.0 - d, "kl_held_aside": d,
             "kl_held_aside_batches": [d] * 4 + [(1.0 - d) / 2] * 4 + [d] * 8} for s, d in enumerate(deltas)]
    # a row without a rotation, scored once beside them (seed-less label), is left out of the summary
    once = {**rows[0], "method": "base", "delta": 0.3}
    text = mod.trial_summary(rows + [once], sizes=(2,))
    assert "| base |" not in text
    assert mod.spearman(deltas, deltas) == pytest.approx(1.0) and mod.spearman(deltas, [-d for d in deltas]) == -1.0
    best = statistics.mean(min(sub) for sub in itertools.combinations(deltas, 2))
    worst = statistics.mean(max(sub) for sub in itertools.combinations(deltas, 2))
    share = sum(min(sub) <= 0.5 for sub in itertools.combinations(deltas, 2)) / 10
    assert (f"| W4A4 | m | kl_held_aside | +1.00 | 2 | {best:+.3f} | {2 * best:+.3f} | {share:.0%} | "
            "+0.400 (seed 1) / +0.450 (seed 3) |") in text
    assert f"| W4A4 | m | kl_calibration | -1.00 | 2 | {worst:+.3f} | {2 * worst:+.3f} | 30% |" in text
    assert f"| W4A4 | m | one seed alone (5 seeds) | | 1 | {statistics.mean(deltas):+.3f} | +1.000 | 60% |" in text
    # 32 windows: the first 4 batches (ranked forwards), whose split half (batches 4-7) ranks backwards
    assert f"| 32 | -1.00 | +1.00 | {best:+.3f} ({2 * best:+.3f}), {share:.0%} |" in text
    assert f"| oracle (held-out Δ) | | +1.00 | {best:+.3f} ({2 * best:+.3f}), {share:.0%} |" in text
    # 64 windows (batches 0-7) rank forwards, and so do batches 8-15; 128 windows have no second half
    assert f"| 64 | +1.00 | +1.00 | {best:+.3f} ({2 * best:+.3f}), {share:.0%} |" in text and "| 128 |  | +1.00 |" in text
    assert mod._seeds("3") == [3] and mod._seeds("2-4") == [2, 3, 4]
    rows = ["W3A16 g128 piecewise + GPTQ", "W3A16 g128 piecewise + GPTQ + quip"]  # without and with a rotation
    labels = [f"{r[0]} {r[1]}" for r in mod.pick_rows(mod.llama_rows(), rows, True, [1, 2, 3])]
    assert labels == [rows[0]] + [f"{rows[1]}, seed {s}" for s in (1, 2, 3)]
    for bad in ("4-2", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            mod._seeds(bad)


def test_rtn_rows_pair_each_setting_with_and_without_quip_and_run_data_free(monkeypatch):
    mod = load_script(SCRIPT, "rotation_bench")
    rtn = mod.rtn_rows()
    assert rtn == [r for r in mod.llama_rows() if ", RTN" in r[1]] == [r for r in mod.minilm_rows() if ", RTN" in r[1]]
    assert len(rtn) == 16 and all(kw.get("calibration") is None for _, _, kw, _ in rtn)
    for plain, quip in zip(rtn[::2], rtn[1::2]):
        assert plain[0] == quip[0] and quip[1] == plain[1] + " + quip"
        assert {**plain[2], "rotation": "quip"} == quip[2] and "rotation" not in plain[2]
    assert {(kw["grid"], kw["bits"], kw["group_size"]) for _, _, kw, _ in rtn} == {
        (g, b, s) for g in ("piecewise", "uniform") for b, s in ((3, 128), (2, 64), (3, "channel"), (2, "channel"))}

    # MiniLM: a data-free row is quantized, not calibrated (calibrate() would run the default recipe)
    import torch

    calls = []

    class Bench:
        model, tokenizer = torch.nn.Sequential(torch.nn.Linear(4, 4)), None

        def __init__(self, n):
            pass

        def evaluate(self, model):
            return {"cos_mean": 1.0}

    monkeypatch.setattr(mod, "MiniLMBench", Bench)
    monkeypatch.setattr(mod, "quantized_bpw", lambda model: (3.0,))
    monkeypatch.setattr(mod.pq, "quantize", lambda model, cfg, progress: calls.append(("quantize", cfg.rotation)))
    monkeypatch.setattr(mod.pq, "calibrate", lambda model, cfg, *a, **k: calls.append(("calibrate", cfg.rotation)))
    out: list = []
    gptq = [r for r in mod.minilm_rows() if r[1] == "piecewise + GPTQ"][:1]
    mod.run_minilm(rtn[:2] + gptq, out)
    assert [c[0] for c in calls] == ["quantize", "quantize", "calibrate"]
    assert calls[0][1] is None and calls[1][1].rotations == ("input", "output")
    assert [r["method"] for r in out] == ["piecewise, RTN", "piecewise, RTN + quip", "piecewise + GPTQ"]
