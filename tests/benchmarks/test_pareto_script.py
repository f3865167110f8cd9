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
