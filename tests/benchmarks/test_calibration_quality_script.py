"""The calibration benchmark runs end to end (quick mode) and its numbers say what the docs say:
GPTQ beats round-to-nearest and SmoothQuant recovers the outlier model at W8A8."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_llama_run_prints_a_table_where_calibration_wins(repo_root):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/calibration_quality.py", "--quick", "--models", "llama", "--no-peer"],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"[+-]\d+\.\d+", cells[4]):
            rows[(cells[0], cells[1])] = float(cells[4])
    rtn = rows[("W4A16 g128", "RTN uniform (min/max)")]
    gptq = rows[("W4A16 g128", "piecewise + GPTQ")]
    sq = rows[("outlier W8A8 static", "+ SmoothQuant")]
    assert gptq < rtn / 3, rows
    assert abs(sq) < 0.05, rows


def _recipes_module(repo_root):
    import importlib.util

    sys.path.insert(0, str(repo_root / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_recipes", repo_root / "benchmarks" / "recipes.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(repo_root / "benchmarks"))
    return mod


def test_recipes_evaluation_text_is_disjoint_from_the_calibration_text(repo_root):
    pytest.importorskip("sklearn")
    from piecewise_quant.evaluate import calibration_text, heldout_text

    recipes = _recipes_module(repo_root)
    cal = " ".join(calibration_text().split())
    heldout = recipes.prose_sentences(heldout_text(), 256)
    ood = recipes.prose_sentences(recipes.ood_text())
    assert len(heldout) == 256 and len(ood) >= 100
    # a sentence that also occurs in the calibration text would measure memorised data
    assert not [s for s in ood if s in cal]
    assert not [s for s in ood if s in heldout]
    # the held-out sentences come from the held-out topics; pydoc repeats some text across topics,
    # and the tables say how many of them also occur in the calibration topics
    topics = " ".join(heldout_text().split())
    assert all(s in topics for s in heldout)
    assert recipes.heldout_overlap() == sum(s in cal for s in heldout) < len(heldout) / 2


def test_recipes_markdown_is_rendered_from_the_json(repo_root):
    """docs/results/recipes.md is exactly what ``recipes.py --render`` makes of the JSON next to it."""
    import json

    recipes = _recipes_module(repo_root)
    results = json.loads((repo_root / "docs" / "results" / "recipes.json").read_text())
    md = (repo_root / "docs" / "results" / "recipes.md").read_text()
    assert recipes.render(results) in md
    # every llama row holds both splits; every MiniLM row both sentence sets
    assert all({"ppl_heldout", "kl_ood"} <= set(r) for r in results["llama"]["rows"])
    assert all({"cos_heldout", "cos_ood"} <= set(r) for r in results["minilm"]["rows"])
