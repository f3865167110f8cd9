"""The three plugin snippets of docs/plugins.md (a format, a calibration algorithm, a kernel
backend) work as the page says, registered the way a packaged plugin would be."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

import piecewise_quant as pq
from piecewise_quant import plugins
from piecewise_quant.kernels import registered_backends, select_backend, unregister_backend
from piecewise_quant.registry import sync_kernel_backends

DOC = (Path(__file__).resolve().parents[2] / "docs" / "plugins.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)
HOOKS = ("piecewise_quant_register_formats", "piecewise_quant_register_calibration_algorithms",
         "piecewise_quant_register_kernel_backends")


def _run_snippets(*markers: str) -> dict:
    """Execute, in one namespace and in page order, the python blocks containing each marker."""
    namespace: dict = {}
    for marker in markers:
        found = [b for b in BLOCKS if marker in b]
        assert found, f"docs/plugins.md has no python block containing {marker!r}"
        for block in found:
            exec(compile(block, "docs/plugins.md", "exec"), namespace)
    return namespace


@pytest.fixture
def register():
    """Register a snippet's hook implementations as a plugin; unregister afterwards."""
    pm = plugins.get_plugin_manager()
    added = []

    def add(namespace: dict, name: str):
        plugin = types.SimpleNamespace(**{h: namespace[h] for h in HOOKS if h in namespace})
        pm.register(plugin, name=name)
        added.append(plugin)
        return plugin

    yield add
    for plugin in added:
        pm.unregister(plugin)


def test_every_python_block_is_exercised():
    markers = ("class Int8RowFormat", "def best_of_two", 'algorithm="best-of-two"', "def int8_linear")
    assert all(any(m in b for m in markers) for b in BLOCKS), "a python block of docs/plugins.md is not tested"


def test_documented_format_plugin_quantizes_and_round_trips(register, tmp_path):
    register(_run_snippets("class Int8RowFormat"), "doc-int8-row")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    x = torch.randn(2, 32)
    ref = model(x)
    config = pq.PiecewiseQuantConfig(grid="int8-row", bits=8, group_size="channel")
    pq.quantize(model, config, progress=False)
    assert model[0].bits_per_weight() == 8 + 32 / 32
    with torch.no_grad():
        y = model(x)
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()
    pq.save_quantized(model, tmp_path)
    again = pq.load_quantized(torch.nn.Sequential(torch.nn.Linear(32, 16)), tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x), y)


# ---- calibration algorithm ----------------------------------------------------------------------


def _tiny_llama(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


CAL = dict(n_samples=8, seq_len=64, batch_size=4)


def _ids(tok):
    from piecewise_quant.evaluate import heldout_text

    return torch.tensor(tok(heldout_text(), add_special_tokens=False)["input_ids"][: 4 * 128])


@pytest.mark.slow
def test_documented_calibration_algorithm_drives_every_layer(register, tiny_llama_path, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from piecewise_quant.evaluate import perplexity

    ns = _run_snippets("def best_of_two", 'algorithm="best-of-two"')
    calls = []
    wrapped = ns["best_of_two"]

    def counted(weight, ctx):
        calls.append(ctx.name)
        assert ctx.hessian.shape == (ctx.layer.in_features,) * 2 and ctx.tokens > 0
        chosen = wrapped(weight, ctx)
        # the chosen encoding is never worse than the engine's own (activation-aware) one
        d = lambda t: ctx.fmt.dequantize(t, ctx.layer, torch.float32) - weight  # noqa: E731
        err = lambda t: float(torch.einsum("oi,ij,oj->", d(t), ctx.hessian, d(t)))  # noqa: E731
        assert err(chosen) <= err(ctx.fmt.encode(weight, ctx.params, ctx.layer)) + 1e-9
        return chosen

    ns["best_of_two"] = counted
    exec("@pq.hookimpl\ndef piecewise_quant_register_calibration_algorithms(register):\n"
         "    register('best-of-two', best_of_two)", ns)
    register(ns, "doc-best-of-two")

    model, tok = _tiny_llama(tiny_llama_path)
    ids = _ids(tok)
    ppl_float = perplexity(model, input_ids=ids, window=128)
    config = pq.PiecewiseQuantConfig(**{**ns["config"].to_dict(), "calibration": {**ns["config"].calibration.to_dict(), **CAL}})
    report = pq.calibrate(model, config, tokenizer=tok, progress=False)
    assert {r.method for r in report.layers.values()} == {"best-of-two"}
    assert sorted(calls) == sorted(report.layers)
    ppl = perplexity(model, input_ids=ids, window=128)
    assert ppl < ppl_float * 1.25  # 3-bit

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids[None, :32]).logits, model(ids[None, :32]).logits)


def _algorithm_plugin(register, name, fn):
    plugin = types.SimpleNamespace()

    @pq.hookimpl
    def piecewise_quant_register_calibration_algorithms(register):
        register(name, fn)

    plugin.piecewise_quant_register_calibration_algorithms = piecewise_quant_register_calibration_algorithms
    register(vars(plugin), f"test-{name}")


def test_unknown_algorithm_fails_before_any_work(tiny_llama_path):
    model, tok = _tiny_llama(tiny_llama_path)
    config = pq.PiecewiseQuantConfig(calibration=pq.CalibrationConfig(algorithm="no-such-algorithm", **CAL))
    with pytest.raises(ValueError, match="unknown calibration algorithm 'no-such-algorithm'"):
        pq.calibrate(model, config, tokenizer=tok, progress=False)
    assert not pq.quantized_layers(model)


def test_algorithm_and_gptq_do_not_combine():
    with pytest.raises(ValueError, match="set gptq=False"):
        pq.CalibrationConfig(algorithm="x", gptq=True)
    with pytest.raises(ValueError, match="calibration.algorithm must be"):
        pq.CalibrationConfig(algorithm="")


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda w, ctx: {"qweight": torch.zeros(1, dtype=torch.uint8)}, "returned tensors that do not fit"),
        (lambda w, ctx: {k: v.float().fill_(float("nan")) if v.is_floating_point() else v
                         for k, v in ctx.fmt.encode(w, ctx.params, ctx.layer).items()}, "returned NaN or Inf"),
        (lambda w, ctx: None, "must return a dict"),
    ],
    ids=["wrong-tensors", "nan", "not-a-dict"],
)
def test_bad_algorithm_output_names_the_algorithm(register, tiny_llama_path, bad, message):
    _algorithm_plugin(register, "broken", bad)
    model, tok = _tiny_llama(tiny_llama_path)
    config = pq.PiecewiseQuantConfig(calibration=pq.CalibrationConfig(algorithm="broken", n_samples=2, seq_len=16, batch_size=2))
    with pytest.raises((ValueError, TypeError)) as info:
        pq.calibrate(model, config, tokenizer=tok, progress=False)
    assert "'broken'" in str(info.value) and message in str(info.value)


# ---- kernel backend -----------------------------------------------------------------------------


@pytest.fixture
def int8_backend(register, monkeypatch):
    ns = _run_snippets("def int8_linear")
    register(ns, "doc-int8-backend")
    sync_kernel_backends()
    monkeypatch.delenv("PIECEWISE_QUANT_KERNEL_BACKEND", raising=False)
    yield ns
    unregister_backend("cpu-int8-weight-only")


def test_documented_kernel_backend_runs_and_matches_the_reference(int8_backend, monkeypatch):
    assert "cpu-int8-weight-only" in registered_backends()
    chosen = select_backend("cpu", "uniform_sym", 8, 64, torch.float32, "none")
    assert chosen is not None and chosen.name == "cpu-int8-weight-only"
    other = select_backend("cpu", "uniform_sym", 4, 64, torch.float32, "none")  # 4-bit: not the plugin's
    assert other is None or other.name == "cpu"  # the built-in CPU kernels, where they are installed
    calls = []
    real_mm = torch._weight_int8pack_mm

    def counted_mm(*args):
        calls.append(args[0].shape)
        return real_mm(*args)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", counted_mm)
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64)
    for group_size, runs in (("channel", 2), (16, 0)):  # per-group scales are handed back to the reference
        model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 40))
        config = pq.PiecewiseQuantConfig(grid="uniform", bits=8, symmetric=True, group_size=group_size,
                                         modules_to_not_convert=[])
        q = pq.quantize(model, config, progress=False)
        calls.clear()
        with torch.no_grad():
            y = q(x)
            assert len(calls) == runs
            monkeypatch.setenv("PIECEWISE_QUANT_KERNEL_BACKEND", "reference")
            y_ref = q(x)
            assert len(calls) == runs
            monkeypatch.delenv("PIECEWISE_QUANT_KERNEL_BACKEND")
        assert y.shape == y_ref.shape == (3, 5, 40)
        assert (y - y_ref).abs().max() < 1e-4 * y_ref.abs().max()


def test_documented_kernel_backend_keeps_lora_style_training(int8_backend):
    torch.manual_seed(0)
    q = pq.quantize(torch.nn.Sequential(torch.nn.Linear(64, 32)),
                    pq.PiecewiseQuantConfig(grid="uniform", bits=8, symmetric=True, group_size="channel",
                                            modules_to_not_convert=[]), progress=False)
    x = torch.randn(4, 64, requires_grad=True)
    q(x).square().sum().backward()
    w = q[0].fmt.dequantize(q[0].quantized_tensors(), q[0].layer_spec, torch.float32)
    expected = (2 * (x.detach() @ w.T + q[0].bias.detach())) @ w
    assert torch.allclose(x.grad, expected, rtol=1e-4, atol=1e-4)
