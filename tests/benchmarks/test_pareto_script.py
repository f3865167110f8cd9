"""benchmarks/pareto.py: the stored results re-render to the committed table and plot, every
planned point fits its model, and the 3-bit outlier points fit 3.3 bits per weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pq_bench import load_script

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parent.parent.parent
SCRIPT = REPO / "benchmarks" / "pareto.py"


def _load():
    return load_script(SCRIPT, "pareto_script")


def test_committed_results_render_to_the_committed_table(tmp_path, capsys):
    pareto = _load()
    md, png = tmp_path / "p.md", tmp_path / "p.png"
    assert pareto.main(["--from-json", str(REPO / "docs/results/pareto.json"), "--md", str(md), "--plot", str(png)]) == 0
    assert md.read_text() == (REPO / "docs/results/pareto.md").read_text()
    assert png.stat().st_size > 10_000
    data = json.loads((REPO / "docs/results/pareto.json").read_text())
    for model in ("llama", "minilm"):
        planned = {(p.family, p.label) for p in pareto.points(model)}
        assert {(r["family"], r["label"]) for r in data[model]["rows"]} == planned


@pytest.mark.parametrize("model, dims", [("llama", (256, 768)), ("minilm", (384, 1536))])
def test_points_fit_the_models(model, dims):
    import piecewise_quant as pq
    from piecewise_quant.quantization import layer_spec_for

    pareto = _load()
    for p in pareto.points(model):
        spec = p.config(8, 32, None).default_spec
        bpw = [pq.get_format(spec.grid).bits_per_weight(layer_spec_for("l", spec, inn, 64)) for inn in dims]
        if p.family == "+ outliers" and p.bits == 3:
            assert max(bpw) <= 3.3, (p, bpw)


def test_seed_table_has_one_column_per_seed_with_mean_and_count():
    pareto = _load()

    def run(ppls):
        rows = [{"family": "f", "label": lbl, "bpw": 3.25, "ppl": v} for lbl, v in ppls.items()]
        return {"llama": {"float": {"ppl": 10.0}, "rows": rows}}

    runs = {"1": run({"a": 10.01, "b": 10.1}), "0": run({"a": 10.05})}
    lines = pareto.seed_table(runs).splitlines()
    assert lines[0].startswith("| family | point | bits/weight | seed 0 | seed 1 | mean | within +0.03 |")
    assert lines[2] == "| f | a | 3.250 | +0.050 | +0.010 | +0.030 | 1 of 2 |"
    assert lines[3] == "| f | b | 3.250 |  | +0.100 | +0.100 | 0 of 1 |"


@pytest.mark.parametrize("name", ["pareto_seeds", "pareto_seeds20"])
def test_committed_seed_runs_render_to_the_committed_table(tmp_path, name):
    pareto = _load()
    md = tmp_path / "s.md"
    assert pareto.main(["--seeds", str(REPO / f"docs/results/{name}.json"), "--md", str(md)]) == 0
    assert md.read_text() == (REPO / f"docs/results/{name}.md").read_text()


def test_seed_table_refuses_bad_input(tmp_path, capsys):
    pareto = _load()
    minilm_only = tmp_path / "m.json"
    minilm_only.write_text(json.dumps({"minilm": {"float": {}, "rows": []}}))
    for arg, words in ((f"x={minilm_only}", "integer seeds"), (f"0={tmp_path / 'none.json'}", "none.json"),
                       (f"0={minilm_only}", "no Llama results")):
        with pytest.raises(SystemExit):
            pareto.main(["--seeds", arg])
        assert words in capsys.readouterr().err
