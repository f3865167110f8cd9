"""optimum: ``optimum-cli piecewise quantize`` (a portion of optimum's PEP 420 namespace
``optimum.commands.register``) and ``PiecewiseQuantizer(OptimumQuantizer)``.

The CLI runs in a subprocess so optimum's real discovery, exit status and stderr are seen. In an
editable install setuptools' finder maps ``optimum.commands.register`` to
``integrations/optimum_register``, and a wheel install puts ``piecewise.py`` in site-packages'
``optimum/commands/register``; only when neither exposes it does the test put a copy of the
register file on ``PYTHONPATH``, never both (the command would be registered twice). The wheel layout is checked in tests/packaging.
"""  # noqa: E501 (wrapping the docstring would change the string)

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("optimum.commands.base")

REPO = Path(__file__).resolve().parents[2]
REGISTER = REPO / "integrations" / "optimum_register" / "piecewise.py"
_SCRIPT = Path(sys.executable).with_name("optimum-cli")
OPTIMUM_CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "optimum.commands.optimum_cli"]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    spec = importlib.util.find_spec("optimum.commands.register")
    locations = [] if spec is None else [Path(p) for p in spec.submodule_search_locations or []]
    if not any((p / REGISTER.name).is_file() for p in locations):  # neither installed nor editable-mapped
        root = tmp_path_factory.mktemp("ns")
        target = root / "optimum" / "commands" / "register"  # no __init__.py anywhere: PEP 420
        target.mkdir(parents=True)
        shutil.copy(REGISTER, target / "piecewise.py")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def run_optimum_cli(*args: str, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*OPTIMUM_CLI, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=180)


def test_register_folder_is_a_namespace_portion_and_imports_light():
    assert not (REGISTER.parent / "__init__.py").exists()
    src = REGISTER.read_text()
    head = src.split("class ")[0]
    for heavy in ("import torch", "import transformers", "from transformers", "import piecewise_quant"):
        assert heavy not in head, f"{heavy!r} at module level: optimum-cli imports this file at every start"


def test_help_lists_piecewise_quantize(cli_env, tmp_path):
    r = run_optimum_cli("piecewise", "--help", env=cli_env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage: optimum-cli piecewise" in r.stdout
    assert "quantize" in r.stdout and "quantize a causal LM with piecewise-quant" in r.stdout


def test_optimum_cli_quantize_writes_a_checkpoint_that_reloads(cli_env, tmp_path, tiny_llama_path):
    from transformers import AutoModelForCausalLM

    import piecewise_quant as pq

    out = tmp_path / "u3"
    r = run_optimum_cli("piecewise", "quantize", "--model", str(tiny_llama_path), "--output", str(out),
                        "--grid", "uniform", "--bits", "3", "--group-size", "64", env=cli_env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"piecewise-quant quantize: {tiny_llama_path} -> {out}" in r.stdout  # progress: what it is doing
    assert "grid=uniform bits=3 group_size=64 (data-free)" in r.stdout
    for line in ("quantized layers     42", "bits/weight          3.297", "model bytes", "quantize time", f"saved to {out}"):
        assert line in r.stdout, r.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    layers = pq.quantized_layers(model)
    assert len(layers) == 42
    spec = next(iter(layers.values())).spec
    assert (spec.grid, spec.bits, spec.group_size) == ("uniform", 3, 64)
    assert (out / "tokenizer.json").is_file()


def test_user_mistake_exits_2_without_traceback(cli_env, tmp_path):
    r = run_optimum_cli("piecewise", "quantize", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o"),
                        env=cli_env, cwd=tmp_path)
    assert r.returncode == 2
    assert f"error: --model {tmp_path / 'missing'}: no such directory" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_piecewise_quantizer_round_trip(tmp_path, tiny_llama_path):
    import torch
    from optimum.quantization_base import OptimumQuantizer
    from transformers import AutoModelForCausalLM

    import piecewise_quant as pq
    from piecewise_quant.integrations.optimum import PiecewiseQuantizer

    quantizer = PiecewiseQuantizer.from_pretrained(tiny_llama_path, bits=4, group_size=128)
    assert isinstance(quantizer, OptimumQuantizer)
    path = quantizer.quantize(tmp_path / "pw4", progress=False)
    assert path == tmp_path / "pw4" and (path / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    spec = next(iter(pq.quantized_layers(reloaded).values())).spec
    assert (spec.grid, spec.bits, spec.group_size) == ("piecewise", 4, 128)
    assert pq.model_size_report(reloaded).bits_per_weight == pytest.approx(4 + 20 / 128)
    probe = torch.arange(64).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(quantizer.model(probe).logits, reloaded(probe).logits)


def test_piecewise_quantizer_errors(tmp_path, tiny_llama_path):
    from piecewise_quant.integrations.optimum import PiecewiseQuantizer

    with pytest.raises(FileNotFoundError, match="no such directory"):
        PiecewiseQuantizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        PiecewiseQuantizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown PiecewiseQuantConfig option"):
        PiecewiseQuantizer.from_pretrained(tiny_llama_path, bitz=4)
    with pytest.raises(ValueError):
        PiecewiseQuantizer.from_pretrained(tiny_llama_path, grid="uniform", bits=7)  # bits the grid lacks
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        PiecewiseQuantizer.from_pretrained(tiny_llama_path).quantize(tmp_path / "full")
    with pytest.raises(ValueError, match="file_prefix"):
        PiecewiseQuantizer.from_pretrained(tiny_llama_path).quantize(tmp_path / "o", file_prefix="model")
