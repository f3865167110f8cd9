"""The README stays true: its two commands are what CI runs, and its Python snippets run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_commands_verbatim():
    commands = _bash_blocks(README)[:2]
    assert len(commands) == 2 and "pytest" in commands[1] and "demo" in commands[0]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"README command not in .ci/run: {command}"


def test_demo_numbers_in_readme_are_the_recorded_table():
    # the README quotes the demo's table; keep the columns the demo prints
    assert ("| model | bits/weight (quantized layers) | bytes on disk | held-out perplexity | vs float | quantize time "
            "| reload exact | decode tokens/s | vs float |") in README


@pytest.mark.slow
def test_readme_python_snippets_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    (tmp_path / "assets").symlink_to(REPO / "assets")
    script = "\n\n".join(blocks)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "tiny-llama-w4" / "config.json").is_file()


@pytest.mark.slow
def test_readme_calibration_claim_reproduces():
    """The perplexity increase the README quotes for its calibration snippet is what that snippet
    gives (same config, same bundled data and held-out text)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import piecewise_quant as pq
    from piecewise_quant.evaluate import heldout_text, perplexity

    n_samples = int(re.search(r'preset\("gptq", n_samples=(\d+)\)', README).group(1))
    claim = float(re.search(r"\(piecewise 3-bit \+ GPTQ, (\d+) samples\) adds \+([0-9.]+) perplexity", README).group(2))
    assert f"{n_samples} samples" in README
    path = REPO / "assets" / "tiny-llama-pydoc"
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(tok(heldout_text(), add_special_tokens=False)["input_ids"])
    base = perplexity(AutoModelForCausalLM.from_pretrained(path).eval(), input_ids=ids)
    model = AutoModelForCausalLM.from_pretrained(path)
    config = pq.PiecewiseQuantConfig(bits=3, group_size=128, calibration=pq.CalibrationConfig.preset("gptq", n_samples=n_samples))
    pq.calibrate(model, config, tokenizer=tok, progress=False)
    delta = perplexity(model.eval(), input_ids=ids) - base
    assert delta == pytest.approx(claim, abs=0.01)
