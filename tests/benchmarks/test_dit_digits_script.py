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


def test_eval_seeds_judge_every_row_per_seed_against_the_float_images_of_that_seed(repo_root, monkeypatch):
    from types import SimpleNamespace

    import numpy as np
    from pq_bench import load_script

    mod = load_script(repo_root / "benchmarks" / "dit_digits.py", "dit_digits_bench")
    assert mod.eval_seeds(1) == [0] and mod.eval_seeds(3) == [0, 100000, 200000]
    with pytest.raises(SystemExit, match="at least 1"):
        mod.eval_seeds(0)

    state = {"quant": False}
    calls = []

    def generate(pipe, per_class, steps, guidance, seed):
        calls.append((state["quant"], seed))
        # float images depend on the seed; the quantized model adds a seed-independent offset of 0.1
        img = np.full((10 * per_class, 8, 8), 0.2 + seed / 1e6 + (0.1 if state["quant"] else 0.0))
        return img, np.repeat(np.arange(10), per_class)

    class Judge:
        real_accuracy, real_split_fd = 0.98, 0.3

        def accuracy(self, images, labels):
            return float(images.mean())

        def fd(self, images):
            return 10 * float(images.mean())

    pipe = SimpleNamespace(
        transformer=SimpleNamespace(parameters=lambda: [], buffers=lambda: []),
        enable_quant=lambda cfg, **kw: state.update(quant=True) or SimpleNamespace(
            components={"transformer": SimpleNamespace(bits_per_weight=4.5, total_bytes=100)}),
        disable_quant=lambda: state.update(quant=False))
    monkeypatch.setattr(mod, "generate", generate)
    monkeypatch.setattr(mod, "DigitsJudge", Judge)
    monkeypatch.setattr(mod, "load_model", lambda path: None)
    monkeypatch.setattr(mod, "make_pipeline", lambda model: pipe)
    monkeypatch.setattr(mod, "recipes", lambda quick: [("float", None, {}), ("q", object(), {})])
    res = mod.evaluate(repo_root, per_class=2, steps=4, guidance=2.0, quick=True, progress=False, n_seeds=3)
    # float: seed 0, the other seed (reused for the row's second seed), seed 200000; q: its three seeds
    assert calls == [(False, 0), (False, 100000), (False, 200000), (True, 0), (True, 100000), (True, 200000)]
    assert res["settings"]["row_seeds"] == [0, 100000, 200000]
    flt, q = res["rows"]
    assert [s["seed"] for s in q["seeds"]] == [0, 100000, 200000]
    assert [s["accuracy"] for s in flt["seeds"]] == pytest.approx([0.2, 0.3, 0.4])
    assert [s["accuracy"] for s in q["seeds"]] == pytest.approx([0.3, 0.4, 0.5])
    assert q["accuracy_mean"] == pytest.approx(0.4) and q["fd_mean"] == pytest.approx(4.0)
    # the same offset against each seed's own float images: one PSNR, 20 dB
    assert [s["psnr_vs_float"] for s in q["seeds"]] == pytest.approx([20.0] * 3)
    assert all(np.isinf(s["psnr_vs_float"]) for s in flt["seeds"])
    res.pop("samples")
    text = mod.table(res)
    assert "| q | 4.500 | 100 | 0.300 | 3.00 | 20.0 | 0.400 (0.300-0.500) | 4.00 (3.00-5.00) |" in text
    assert "accuracy, 3 seeds: mean (min-max) |" in text.splitlines()[0]
    one = mod.evaluate(repo_root, per_class=2, steps=4, guidance=2.0, quick=True, progress=False)
    one.pop("samples")
    assert "seeds" not in one["rows"][1] and "seeds" not in mod.table(one).splitlines()[0]
