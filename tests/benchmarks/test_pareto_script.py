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


def test_seed_table_renders_minilm_runs_as_a_second_table():
    pareto = _load()
    minilm = {"float": {}, "rows": [{"family": "f", "label": "a", "bpw": 3.288, "cos_heldout": 0.96, "cos_ood": 0.94}]}
    other = {"float": {}, "rows": [{"family": "f", "label": "a", "bpw": 3.288, "cos_heldout": 0.97, "cos_ood": 0.95}]}
    lines = pareto.seed_table({"0": {"minilm": minilm}, "1": {"minilm": other}}).splitlines()
    assert lines[0] == "| family | point | bits/weight | seed 0 | seed 1 | mean held-out | mean out-of-domain |"
    assert lines[2] == "| f | a | 3.288 | 0.9600 / 0.9400 | 0.9700 / 0.9500 | 0.9650 | 0.9450 |"
    both = pareto.seed_table({"0": {"minilm": minilm, "llama": {"float": {"ppl": 10.0}, "rows": []}}})
    assert both.index("within +0.03") < both.index("mean held-out")  # the Llama table first


@pytest.mark.parametrize("name", ["pareto_seeds", "pareto_seeds20", "pareto_seeds_model_scope", "pareto_seeds_damp"])
def test_committed_seed_runs_render_to_the_committed_table(tmp_path, name):
    pareto = _load()
    md = tmp_path / "s.md"
    assert pareto.main(["--seeds", str(REPO / f"docs/results/{name}.json"), "--md", str(md)]) == 0
    assert md.read_text() == (REPO / f"docs/results/{name}.md").read_text()


def test_seed_runs_of_one_seed_are_put_side_by_side(tmp_path, capsys):
    pareto = _load()
    for name, label, ppl in (("a", "block", 10.02), ("b", "model", 10.01)):
        row = {"family": "mixed precision", "label": label, "bpw": 3.291, "ppl": ppl}
        (tmp_path / f"{name}.json").write_text(json.dumps({"llama": {"float": {"ppl": 10.0}, "rows": [row]}}))
    assert pareto.main(["--seeds", f"0={tmp_path / 'a.json'}+{tmp_path / 'b.json'}"]) == 0
    out = capsys.readouterr().out
    assert "| mixed precision | block | 3.291 | +0.020 |" in out and "| mixed precision | model | 3.291 | +0.010 |" in out


def test_seed_table_refuses_bad_input(tmp_path, capsys):
    pareto = _load()
    neither = tmp_path / "m.json"
    neither.write_text(json.dumps({"bert": {"float": {}, "rows": []}}))
    listed = tmp_path / "l.json"
    listed.write_text(json.dumps([1, 2]))
    for arg, words in ((f"x={neither}", "integer seeds"), (f"0={tmp_path / 'none.json'}", "none.json"),
                       (f"0={neither}", "no Llama or MiniLM results"), (f"0={neither}+{listed}", "not the --json output")):
        with pytest.raises(SystemExit):
            pareto.main(["--seeds", arg])
        assert words in capsys.readouterr().err


def test_damp_reaches_the_calibrated_points_only_and_is_named_in_their_label(capsys):
    pareto = _load()
    for p in pareto.points("llama"):
        damped = pareto.dataclasses.replace(p, damp=0.1)
        cal = damped.config(8, 32, None).calibration
        if p.family in ("uniform", "piecewise"):
            assert cal is None
            continue
        assert cal.damp == 0.1 and p.config(8, 32, None).calibration.damp == 0.01, p
        assert damped.label == p.label + ", damp 0.1"
        assert cal.mixed_precision_budget == p.budget and cal.asymmetric == ("GPTAQ" in p.family)
    for bad in ("0", "-0.1", "nan", "inf"):
        with pytest.raises(SystemExit):
            pareto.main(["--models", "llama", "--damp", bad])
        assert "--damp" in capsys.readouterr().err
