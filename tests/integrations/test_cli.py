"""The ``piecewise-quant`` command line: quantize, eval, inspect, bench, and user mistakes.

One data-free 4-bit checkpoint of the bundled model is written once per module and shared.
Exit-code checks of user mistakes run the CLI in a subprocess (``python -m``) so the real exit
status and stderr are seen; they fail before torch is imported, so they are quick.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from piecewise_quant.integrations import cli

CLI = [sys.executable, "-m", "piecewise_quant.integrations.cli"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def _ppl(out: str) -> float:
    return float(re.search(r"^perplexity\s+([0-9.]+)$", out, re.M).group(1))


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory, tiny_llama_path) -> Path:
    out = tmp_path_factory.mktemp("cli") / "pw4"
    assert cli.main(["quantize", "--model", str(tiny_llama_path), "--output", str(out)]) == 0
    return out


def test_quantize_writes_a_checkpoint_that_reloads(quantized_dir, capsys):
    from transformers import AutoModelForCausalLM

    import piecewise_quant as pq

    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (quantized_dir / f).is_file(), f
    model = AutoModelForCausalLM.from_pretrained(quantized_dir)
    layers = pq.quantized_layers(model)
    assert len(layers) == 42  # 6 blocks x (q, k, v, o, gate, up, down); lm_head stays float
    spec = next(iter(layers.values())).spec
    assert (spec.grid, spec.bits, spec.group_size) == ("piecewise", 4, 128)
    assert pq.model_size_report(model).bits_per_weight == pytest.approx(4 + 20 / 128)


def test_quantize_summary_and_options(tmp_path, tiny_llama_path, capsys):
    out = tmp_path / "u3"
    rc = cli.main(["quantize", "--model", str(tiny_llama_path), "--output", str(out),
                   "--grid", "uniform", "--bits", "3", "--group-size", "64"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "quantized layers     42" in stdout
    assert "bits/weight          3.297" in stdout  # 3 + (16 + 3) / 64: codes, float16 scale, 3-bit zero point
    import json

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["grid"], qc["bits"], qc["group_size"]) == ("uniform", 3, 64)


def test_quantize_fp4_takes_the_formats_block_by_default(tmp_path, tiny_llama_path, capsys):
    import json

    out = tmp_path / "mx"
    assert cli.main(["quantize", "--model", str(tiny_llama_path), "--output", str(out), "--grid", "mxfp4"]) == 0
    assert "bits/weight          4.250" in capsys.readouterr().out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["grid"], qc["bits"], qc["group_size"]) == ("mxfp4", 4, 32)


def test_quantize_calibrated_on_a_text_file(tmp_path, tiny_llama_path, capsys):
    from transformers import AutoModelForCausalLM

    import piecewise_quant as pq
    from piecewise_quant.evaluate import calibration_text

    text = tmp_path / "calib.txt"
    text.write_text(calibration_text()[:30000], encoding="utf-8")
    out = tmp_path / "cal"
    rc = cli.main(["quantize", "--model", str(tiny_llama_path), "--output", str(out), "--bits", "3",
                   "--calibration-text", str(text), "--n-samples", "4", "--calibration", "aware", "--rotation", "quip",
                   "--tune-scales"])
    assert rc == 0
    assert f"calibration=aware on {text} rotation=quip" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(pq.quantized_layers(model)) == 42
    import json

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 3 and qc["calibration"]["n_samples"] == 4 and qc["calibration"]["gptq"] is False
    assert qc["calibration"]["tune_scales"] is True
    assert qc["rotation"]["rotations"] == ["input", "output"]


def test_quantize_with_an_activation_clip_search(tmp_path, tiny_llama_path):
    import json

    from transformers import AutoModelForCausalLM

    out = tmp_path / "clip"
    rc = cli.main(["quantize", "--model", str(tiny_llama_path), "--output", str(out), "--act-bits", "4",
                   "--act-mode", "dynamic_per_token_asym", "--calibration", "aware", "--n-samples", "4",
                   "--act-clip-search"])
    assert rc == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["calibration"]["act_clip_search"] is True
    chosen = {name: changes["act_clip_ratio"] for name, changes in qc["overrides"] if "act_clip_ratio" in changes}
    assert chosen  # 42 layers with 4-bit activations: some choose to clip
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, ratio in chosen.items():
        assert model.get_submodule(name).act_quantizer.args.clip_ratio == ratio


def test_quantize_with_rotation_trials_saves_the_kept_seed(tmp_path, tiny_llama_path):
    import json

    out = tmp_path / "trials"
    rc = cli.main(["quantize", "--model", str(tiny_llama_path), "--output", str(out), "--act-bits", "4",
                   "--rotation", "quarot", "--calibration", "aware", "--n-samples", "4", "--rotation-trials", "2"])
    assert rc == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["rotation"]["seed"] in (0, 1)
    assert "rotation_trials" not in qc["calibration"]  # the checkpoint is that one seed's calibration


def test_eval_float_and_quantized(quantized_dir, tiny_llama_path, capsys):
    assert cli.main(["eval", "--model", str(tiny_llama_path), "--max-windows", "8"]) == 0
    out_f = capsys.readouterr().out
    assert cli.main(["eval", "--model", str(quantized_dir), "--max-windows", "8"]) == 0
    out_q = capsys.readouterr().out
    assert "(float)" in out_f and "quantized, 4.156 bits/weight" in out_q
    assert "8 windows of 256" in out_q
    ppl_f, ppl_q = _ppl(out_f), _ppl(out_q)
    assert 1 < ppl_f < 100
    assert ppl_f * 0.97 < ppl_q < ppl_f * 1.05  # 4-bit piecewise keeps the bundled model's quality


def test_eval_text_file(tmp_path, tiny_llama_path, capsys):
    from piecewise_quant.evaluate import calibration_text

    text = tmp_path / "corpus.txt"
    text.write_text(calibration_text()[:20000], encoding="utf-8")
    assert cli.main(["eval", "--model", str(tiny_llama_path), "--text", str(text), "--seq-len", "64", "--max-windows", "4"]) == 0
    out = capsys.readouterr().out
    assert f"{text}:" in out and "4 windows of 64" in out
    assert 1 < _ppl(out) < 100


def test_inspect_table(quantized_dir, tiny_llama_path, capsys):
    assert cli.main(["inspect", "--model", str(quantized_dir)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| model.layers.")]
    assert len(rows) == 42
    q = next(r for r in rows if r.startswith("| model.layers.0.self_attn.q_proj |"))
    cells = [c.strip() for c in q.strip("|").split("|")]
    assert cells[:7] == ["model.layers.0.self_attn.q_proj", "piecewise", "4", "128", "4.156", "-", "-"]
    from piecewise_quant.kernels import cpu_backend
    expected_kernel = "reference" if not cpu_backend.status()["available"] else "cpu "
    assert cells[7].startswith(expected_kernel), cells[7]  # the machine decides which CPU kernel runs
    assert "--reference" in out

    assert cli.main(["inspect", "--model", str(quantized_dir), "--reference", str(tiny_llama_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| model.layers.")]
    errors = [float(r.strip("| ").split(" | ")[6]) for r in rows]
    assert len(errors) == 42 and all(0.01 < e < 0.2 for e in errors)  # 4-bit: a few percent


def test_inspect_plot_writes_png(quantized_dir, tiny_llama_path, tmp_path, capsys):
    png = tmp_path / "plots" / "down.png"
    rc = cli.main(["inspect", "--model", str(quantized_dir), "--reference", str(tiny_llama_path),
                   "--layer", "model.layers.1.mlp.down_proj", "--plot", str(png), "--row", "3", "--group", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith("| model.layers.")]) == 1
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize("grid,bits,group_size", [("piecewise", 3, 32), ("uniform", 4, 64), ("uniform", 2, "tensor")])
def test_group_levels_hold_every_dequantized_weight(grid, bits, group_size):
    import piecewise_quant as pq

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 16))
    pq.quantize(model, pq.PiecewiseQuantConfig(grid=grid, bits=bits, group_size=group_size,
                                                modules_to_not_convert=[]), progress=False)
    q = pq.quantized_layers(model)["0"]
    w = q.dequantize(torch.float32)
    gs = q.layer_spec.group_size
    for row, group in [(0, 0), (5, 1), (15, q.layer_spec.n_groups - 1)] if gs != -1 else [(0, 0)]:
        levels, breakpoints = cli.group_levels(q, row, group)
        assert levels.numel() == 2**bits
        values = w.reshape(-1) if gs == -1 else w[row, group * gs : (group + 1) * gs]
        dist = (values.unsqueeze(1) - levels.unsqueeze(0)).abs().min(dim=1).values
        assert float(dist.max()) <= 1e-6 * float(levels.abs().max())
        if grid == "piecewise":
            lo, hi = breakpoints
            assert lo == -hi and 0 < hi <= float(levels.abs().max())
            centre = levels[(levels >= lo - 1e-7) & (levels <= hi + 1e-7)]
            steps = centre.diff()
            assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-4)  # the dense centre is uniform
        else:
            assert breakpoints is None


def test_bench_prints_table(quantized_dir, capsys):
    assert cli.main(["bench", "--model", str(quantized_dir), "--seq-len", "16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| float32 (dequantized copy) | 32.000 |" in out
    assert re.search(r"^\| piecewise 4-bit \| 4\.156 \| [0-9.]+ \| [0-9,]+ \| [0-9.]+x \|$", out, re.M)


def test_bench_prepack_int8_runs_w8a8_layers_on_onednn_and_refuses_other_models(tmp_path, tiny_llama_path,
                                                                                 quantized_dir, capsys):
    from transformers import AutoModelForCausalLM

    import piecewise_quant as pq
    from piecewise_quant.kernels import cpu_backend

    assert cli.main(["bench", "--model", str(quantized_dir), "--seq-len", "16", "--repeats", "1",
                     "--prepack-int8"]) == 2
    ok, why = cpu_backend.onednn_int8_status()
    if not ok:  # refused first for the CPU (no VNNI), with the reason
        assert why in capsys.readouterr().err
        pytest.skip(why)
    assert "--prepack-int8: the model has no W8A8 layer" in capsys.readouterr().err
    config = pq.PiecewiseQuantConfig(grid="uniform", bits=8, group_size="channel", symmetric=True, act_bits=8)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=config)
    model.save_pretrained(tmp_path / "w8a8")
    args = ["bench", "--model", str(tmp_path / "w8a8"), "--seq-len", "32", "--repeats", "1"]
    assert cli.main(args) == 0
    assert "kernels: cpu int8 GEMM (torch._int_mm): 42 layers" in capsys.readouterr().out
    assert cli.main(args + ["--prepack-int8"]) == 0
    assert "kernels: cpu int8 GEMM (oneDNN u8s8, prepacked): 42 layers" in capsys.readouterr().out


def test_inspect_unknown_layer_is_a_user_error(quantized_dir, capsys):
    assert cli.main(["inspect", "--model", str(quantized_dir), "--layer", "model.layers.0.mlp.down_prj"]) == 2
    err = capsys.readouterr().err
    assert "error: --layer 'model.layers.0.mlp.down_prj'" in err and "did you mean model.layers.0.mlp.down_proj" in err
    assert "Traceback" not in err


def test_inspect_float_model_is_a_user_error(tiny_llama_path, capsys):
    assert cli.main(["inspect", "--model", str(tiny_llama_path)]) == 2
    assert "has no piecewise-quant layers" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "--model", "no/such/dir"], "error: --model no/such/dir: no such directory"),
        (["quantize", "--model", "EMPTY", "--output", "OUT"], "not a Hugging Face model directory"),
        (["quantize", "--model", "MODEL", "--output", "OUT", "--bits", "5"],
         "error: bits=5 is not supported by grid 'piecewise'"),
        (["quantize", "--model", "MODEL", "--output", "OUT", "--grid", "nf4"], "error: unknown grid 'nf4'"),
        (["quantize", "--model", "MODEL", "--output", "OUT", "--group-size", "big"], "error: --group-size must be"),
        (["quantize", "--model", "MODEL", "--output", "OUT", "--calibration", "magic"], "unknown calibration preset 'magic'"),
        (["quantize", "--model", "MODEL", "--output", "FULL"], "exists and is not empty"),
        (["eval", "--model", "MODEL", "--text", "missing.txt"], "error: --text missing.txt: cannot be read as UTF-8 text"),
        (["eval", "--model", "MODEL", "--text", "binary.bin"], "cannot be read as UTF-8 text"),
        (["quantize", "--model", "MODEL", "--output", "OUT", "--calibration-text", "missing.txt"], "error: --calibration-text"),
        (["eval", "--seq-len", "0"], "--seq-len: must be a positive integer"),
        (["quantize", "--model", "MODEL", "--output", "OUT", "--tune-scales"], "--tune-scales tunes a calibrated model"),
        (["quantize", "--model", "MODEL", "--output", "OUT", "--act-bits", "4", "--act-clip-search"],
         "--act-clip-search chooses clip ratios on calibration data"),
        (["quantize", "--model", "MODEL", "--output", "OUT", "--calibration", "gptq", "--act-clip-search"],
         "--act-clip-search chooses the clip ratio of dynamic activations"),
        (["quantize", "--model", "MODEL", "--output", "OUT", "--rotation", "quarot", "--rotation-trials", "2"],
         "--rotation-trials compares calibrated models"),
        (["quantize", "--model", "MODEL", "--output", "OUT", "--calibration", "gptq", "--rotation-trials", "2"],
         "--rotation-trials tries rotation seeds"),
        (["quantize", "--model", "MODEL", "--output", "OUT", "--rotation-trials", "0"], "must be a positive integer"),
    ],
)
def test_user_mistakes_exit_2_without_traceback(args, message, tmp_path, tiny_llama_path):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "x").write_text("x")
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00\x81" * 10)
    subst = {"MODEL": str(tiny_llama_path)}
    proc = run_cli(*[subst.get(a, a) for a in args], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "OUT").exists()


def test_help_is_fast_and_has_examples(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in ("quantize", "eval", "inspect", "bench", "export", "demo", "serve"):
        assert command in proc.stdout
    code = "import sys; from piecewise_quant.integrations import cli; cli.build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("command", ["quantize", "eval", "inspect", "bench", "export", "demo"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: piecewise-quant {command}" in out
    if command != "demo":
        assert "examples:" in out and f"piecewise-quant {command} --model" in out


def test_quantize_with_static_activations_sets_their_scales(tmp_path, tiny_llama_path, capsys):
    """Static activation scales need data: the command calibrates them on the bundled text, so
    the saved W8A8 checkpoint runs (a zero scale would refuse to)."""
    from transformers import AutoModelForCausalLM

    import piecewise_quant as pq

    out = tmp_path / "w8a8"
    assert cli.main(["quantize", "--model", str(tiny_llama_path), "--output", str(out), "--bits", "8", "--grid", "uniform",
                     "--act-bits", "8", "--act-mode", "static_per_tensor", "--n-samples", "4"]) == 0
    assert "static activation scales of 42 layers" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    scales = [float(q.act_scale) for q in pq.quantized_layers(model).values()]
    assert len(scales) == 42 and all(s > 0 for s in scales)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_kernel_label_names_the_path_of_outliers_and_of_a_low_rank_branch(monkeypatch):
    import piecewise_quant as pq
    from piecewise_quant.integrations.cli.common import kernel_label
    from piecewise_quant.kernels import cpu_backend
    from piecewise_quant.quantization import layer_spec_for

    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    lin = torch.nn.Linear(128, 32)
    with torch.no_grad():
        lin.weight.copy_(w)
    spec_out = pq.QuantSpec(grid="uniform", bits=3, group_size=64, outliers=1)
    spec_lr = pq.QuantSpec(grid="uniform", bits=4, group_size=64, low_rank=4)
    with_outliers = pq.QuantLinear.from_linear(lin, layer_spec_for("o", spec_out, 128, 32), pq.get_format("uniform"))
    with_branch = pq.QuantLinear.from_linear(lin, layer_spec_for("l", spec_lr, 128, 32), pq.get_format("uniform"))
    plain = pq.QuantLinear.from_linear(lin, layer_spec_for("p", pq.QuantSpec(grid="uniform", bits=4, group_size=64),
                                                          128, 32), pq.get_format("uniform"))
    assert "+" not in kernel_label(plain)
    if cpu_backend.status()["available"]:
        assert kernel_label(with_outliers).endswith(" + outliers (C kernel)")
        assert kernel_label(with_branch, rows=1).endswith(" + low-rank (C kernel)")
    assert kernel_label(with_branch, rows=64).endswith(" + low-rank (F.linear)")  # prefill: torch's GEMM
    monkeypatch.setenv("PIECEWISE_QUANT_KERNEL_BACKEND", "reference")
    assert kernel_label(with_outliers).endswith(" + outliers (torch.sparse)")
    assert kernel_label(with_branch, rows=1).endswith(" + low-rank (F.linear)")
