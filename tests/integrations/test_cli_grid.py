"""``piecewise-quant eval --grid`` (the W x A x KV grid): settings are read as papers write them,
mistakes fail before any model loads, and a small grid gives tables, JSON and a heat map whose
numbers agree with the library's own measurements."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from piecewise_quant.args import KVArgs
from piecewise_quant.integrations import cli
from piecewise_quant.integrations.transformers import kv_grid


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_path)


def test_settings_are_parsed_as_written():
    s = kv_grid.parse_setting("W4A8KV4", head_dim=48)
    assert (s.wa, s.kv_name, s.kv_protocol) == ("W4A8", "KV4", "fake")
    assert s.weights == dict(bits=4, grid="piecewise", act_bits=8)
    # QLLM-Eval: asymmetric, per token in groups of the head size, no residual window
    assert s.kv == KVArgs(bits=4, key_axis="token", group_size=48, residual_length=0, symmetric=False)
    kivi = kv_grid.parse_setting("kivi2", head_dim=48, weight_grid="uniform")
    assert (kivi.wa, kivi.weights, kivi.kv_protocol) == ("float", None, "cache")
    assert kivi.kv == KVArgs(bits=2, key_axis="channel", group_size=32, residual_length=128)
    fp8 = kv_grid.parse_setting("W8KVfp8", head_dim=64, weight_grid="uniform")
    assert fp8.weights == dict(bits=8, grid="uniform") and fp8.kv.format == "fp8" and fp8.kv_name == "KVfp8"
    assert kv_grid.parse_setting("float", 64).weights is None
    names = [s.name for s in kv_grid.parse_settings(",".join(kv_grid.DEFAULT_SETTINGS), 64)]
    assert names == list(kv_grid.DEFAULT_SETTINGS)


@pytest.mark.parametrize(
    "text, message",
    [
        ("W4,bogus", "grid setting 'bogus' is not understood"),
        ("A8", "activation bits need weight bits too"),
        ("W5", "grid setting 'W5'"),
        ("KV5", "kv_cache.bits must be one of"),
        ("W4,w4", "listed twice"),
        (" , ", "no grid setting given"),
    ],
)
def test_bad_settings_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        kv_grid.parse_settings(text, 64)


def test_help_lists_the_library_default():
    from piecewise_quant.integrations.cli import grid

    assert grid.DEFAULT == ",".join(kv_grid.DEFAULT_SETTINGS)


def test_repetition_counts_repeated_4grams_and_lines():
    class Tok:
        def decode(self, ids):
            return "\n".join(str(i) for i in ids)

    rep4, rep_line = kv_grid.repetition([[1, 2, 3, 4, 1, 2, 3, 4], [5, 6, 7, 8]], Tok())
    assert rep4 == pytest.approx((1 / 5 + 0) / 2)  # 4-grams 1234 2341 3412 4123 1234: one repeat in five
    assert rep_line == pytest.approx((4 / 8 + 0) / 2)


def test_cache_perplexity_with_everything_in_the_window_is_the_float_perplexity(tiny_llama):
    from piecewise_quant.evaluate import perplexity

    model, tok = tiny_llama
    ids = torch.tensor(tok("def f(x):\n    return x + 1\n" * 60, add_special_tokens=False)["input_ids"])[: 2 * 128]
    windows = ids.reshape(2, 128)
    ref = perplexity(model, input_ids=ids, window=128)
    # a residual window as long as the text: no token is ever quantized, only fed in chunks of 32
    got = kv_grid.perplexity_through_cache(model, windows, KVArgs(bits=2, residual_length=256))
    assert got == pytest.approx(ref, rel=1e-4)
    assert kv_grid.perplexity_through_cache(model, windows, KVArgs(bits=2, residual_length=0)) > 1.05 * ref


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--grid", "W4,W9"], "error: --grid: grid setting 'W9'"),
        (["--grid", "--plot", "NOFOLDER/x.png"], "error: --plot NOFOLDER/x.png: its folder NOFOLDER does not exist"),
        (["--grid", "--json", "."], "error: --json .: is a directory"),
        (["--markdown", "out.md"], "error: --markdown belongs to --grid"),
        (["--grid", "--seq-len", "16"], "error: --grid needs --seq-len above 32"),
    ],
)
def test_grid_mistakes_fail_before_loading(extra, message, tiny_llama_path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", "--model", str(tiny_llama_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_grid_refuses_a_quantized_model_and_names_the_plot_extra(tmp_path, tiny_llama_path, capsys, monkeypatch):
    qdir = tmp_path / "q"
    qdir.mkdir()
    cfg = json.loads((tiny_llama_path / "config.json").read_text())
    (qdir / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "piecewise"}}))
    assert cli.main(["eval", "--model", str(qdir), "--grid"]) == 2
    assert "is already quantized (quant_method 'piecewise'); pass the float checkpoint" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["eval", "--model", str(tiny_llama_path), "--grid", "--plot", str(tmp_path / "g.png")]) == 2
    assert "--plot needs matplotlib, which is not installed: pip install 'piecewise-quant[plot]'" in capsys.readouterr().err


def test_small_grid_end_to_end(tmp_path, tiny_llama_path, capsys):
    pytest.importorskip("matplotlib")
    md, js, png = tmp_path / "g.md", tmp_path / "g.json", tmp_path / "g.png"
    argv = ["eval", "--model", str(tiny_llama_path), "--grid", "float,W4,KV4,KIVI2,W4A8KV4", "--weight-grid", "uniform",
            "--max-windows", "2", "--prompts", "2", "--new-tokens", "8", "--kv-context", "192",
            "--markdown", str(md), "--json", str(js), "--plot", str(png)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    data = json.loads(js.read_text())
    rows = {r["setting"]: r for r in data["rows"]}
    assert list(rows) == ["float", "W4", "KV4", "KIVI2", "W4A8KV4"]
    assert rows["float"]["ppl_delta_pct"] == 0 and rows["float"]["ppl"] == data["float_ppl"]
    # every W/A part x every KV part has a perplexity, and the rows read theirs from that matrix
    assert set(data["ppl"]) == {"float", "W4", "W4A8"} and set(data["ppl"]["W4"]) == {"-", "KV4", "KV2 (KIVI)"}
    assert rows["W4A8KV4"]["ppl"] == data["ppl"]["W4A8"]["KV4"] and rows["KIVI2"]["ppl"] == data["ppl"]["float"]["KV2 (KIVI)"]
    assert rows["KIVI2"]["ppl"] > rows["float"]["ppl"] and rows["W4A8KV4"]["ppl"] > rows["float"]["ppl"]
    # measured bytes: a 4-bit per-token cache is well under the float one; 4-bit weights well under float
    assert rows["KV4"]["kv_bytes_per_token"] < 0.2 * rows["float"]["kv_bytes_per_token"]
    assert rows["W4"]["weight_bytes"] < 0.5 * rows["float"]["weight_bytes"]
    assert all(0 <= r["rep4"] <= 1 and 0 <= r["rep_line"] <= 1 for r in rows.values())
    assert data["kv_context"] == 192 and data["windows"] == 2
    assert "| W4A8KV4 | int4 K/token V/token g64 r0 | fake |" in out and md.read_text() == out.split("heat map")[0]
    assert png.stat().st_size > 1000
