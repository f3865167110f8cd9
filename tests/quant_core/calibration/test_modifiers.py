"""Calibration recipes as modifier lists: the list form builds the same config (and the same
calibrated model) as the flat keywords, runs in pipeline order whatever the listed order, and bad
modifier configs fail with messages that say what to change."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import piecewise_quant as pq
from piecewise_quant.calibration import (
    GPTQ,
    LET,
    LWC,
    Algorithm,
    MixedPrecision,
    RefineBreakpoints,
    SmoothQuant,
    StaticActScales,
)
from piecewise_quant.qlinear import QuantLinear

DATA = dict(n_samples=4, seq_len=16, batch_size=2)


@pytest.mark.parametrize("flat, listed", [
    ({}, []),
    ({"smoothquant": 0.5}, [SmoothQuant(0.5)]),
    ({"gptq": True}, [GPTQ()]),
    ({"lwc": True}, [LWC()]),
    ({"lwc": True, "let": True}, [LET(), LWC()]),
    ({"gptq": True, "act_order": False, "true_sequential": False, "damp": 0.1}, [GPTQ(False, False, 0.1)]),
    ({"lwc": True, "gptq": True, "epochs": 2, "lwc_lr": 1e-3}, [LWC(lr=1e-3, epochs=2), GPTQ()]),
    ({"refine_breakpoints": True, "smoothquant": 0.8}, [RefineBreakpoints(), SmoothQuant(0.8)]),
    ({"mixed_precision_budget": 3.5, "mixed_precision_bits": (2, 4)}, [MixedPrecision(3.5, bits=[2, 4])]),
    ({"algorithm": "best-of-two"}, [Algorithm("best-of-two")]),
])
def test_the_list_form_builds_the_same_config_as_the_flat_keywords(flat, listed):
    by_keywords = pq.CalibrationConfig(**DATA, **flat)
    by_list = pq.CalibrationConfig(modifiers=listed, **DATA)
    assert by_list == by_keywords
    assert by_list.to_dict() == by_keywords.to_dict()  # the saved config.json does not change
    assert pq.CalibrationConfig.coerce(by_list.to_dict()) == by_keywords  # and old loaders read it
    # the recipe read back: pipeline order, static activation scales always last
    assert by_keywords.recipe == tuple(sorted(listed, key=lambda m: m.order)) + (StaticActScales(),)
    assert pq.CalibrationConfig(modifiers=by_keywords.recipe, **DATA) == by_keywords


def test_presets_are_modifier_lists():
    assert pq.CalibrationConfig.preset("aware").recipe == (StaticActScales(),)
    assert pq.CalibrationConfig.preset("omniquant").recipe == (LET(), LWC(), StaticActScales())
    assert pq.CalibrationConfig.preset("gptq", n_samples=8) == pq.CalibrationConfig(modifiers=[GPTQ()], n_samples=8)
    assert pq.CalibrationConfig.preset("aware", modifiers=[GPTQ()]) == pq.CalibrationConfig.preset("gptq")


def test_dataclasses_replace_changes_data_and_algorithm_fields_as_before():
    cal = pq.CalibrationConfig(modifiers=[GPTQ(damp=0.05), LWC()], n_samples=3)
    assert dataclasses.replace(cal, n_samples=5) == pq.CalibrationConfig(gptq=True, damp=0.05, lwc=True, n_samples=5)
    assert dataclasses.replace(cal, gptq=False).recipe == (LWC(), StaticActScales())
    assert dataclasses.replace(pq.CalibrationConfig(), gptq=True).recipe == (GPTQ(), StaticActScales())


def test_the_listed_order_does_not_change_the_pipeline():
    a = pq.CalibrationConfig(modifiers=[GPTQ(), StaticActScales(), SmoothQuant(0.5), MixedPrecision(4)])
    b = pq.CalibrationConfig(modifiers=[MixedPrecision(4), SmoothQuant(0.5), GPTQ()])
    assert a == b
    assert [type(m) for m in a.recipe] == [MixedPrecision, SmoothQuant, GPTQ, StaticActScales]


@pytest.mark.parametrize("make, message", [
    (lambda: GPTQ(damp=-1), r"GPTQ\.damp must be a positive number"),
    (lambda: GPTQ(act_order="yes"), r"GPTQ\.act_order must be True or False"),
    (lambda: LWC(epochs=-1), r"LWC\.epochs must be an integer >= 0"),
    (lambda: SmoothQuant(1.5), r"SmoothQuant\.alpha .* must be in \[0, 1\]"),
    (lambda: MixedPrecision(1.5, bits=(2, 4)),
     r"MixedPrecision\.budget .* at least the smallest allowed bits \(2\)"),
    (lambda: MixedPrecision(4, grids=("nf4",)), r"MixedPrecision\.grids must be a non-empty subset"),
    (lambda: Algorithm(""), r"Algorithm\.name must be the name of a registered calibration algorithm"),
    (lambda: pq.CalibrationConfig(modifiers=["gptq"]), r"must be modifier configs such as GPTQ\(\)"),
    (lambda: pq.CalibrationConfig(modifiers=GPTQ()), r"must be a list such as \[GPTQ\(\), StaticActScales\(\)\]"),
    (lambda: pq.CalibrationConfig(modifiers=[GPTQ(), GPTQ(damp=0.1)]), r"GPTQ is listed twice"),
    (lambda: pq.CalibrationConfig(modifiers=[LWC(epochs=1), LET(epochs=2)]),
     r"LET and LWC disagree on epochs|LWC and LET disagree on epochs"),
    (lambda: pq.CalibrationConfig(gptq=True, modifiers=[LWC()]),
     r"either as modifiers=\[\.\.\.\] or as keywords, not both; got modifiers and gptq"),
    (lambda: pq.CalibrationConfig(modifiers=[GPTQ(), RefineBreakpoints()]), r"refine_breakpoints and gptq do not combine"),
    (lambda: pq.CalibrationConfig(modifiers=[SmoothQuant(), LET()]), r"choose smoothquant or let, not both"),
    (lambda: pq.CalibrationConfig(modifiers=[GPTQ(), Algorithm("x")]), r"set gptq=False"),
])
def test_bad_modifier_configs_say_what_to_change(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _calibrated(cal: pq.CalibrationConfig):
    model = _tiny_llama()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    config = pq.PiecewiseQuantConfig(bits=3, group_size=32, act_bits=8, act_mode="static_per_tensor", calibration=cal)
    report = pq.calibrate(model, config, ids, progress=False)
    return report, {n: m.quantized_tensors() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_the_list_form_calibrates_exactly_like_the_flat_keywords():
    flat_report, flat = _calibrated(pq.CalibrationConfig(lwc=True, gptq=True, epochs=1, **DATA))
    # listed against the pipeline order: LWC's clipping still fixes GPTQ's group parameters
    list_report, listed = _calibrated(pq.CalibrationConfig(modifiers=[GPTQ(), LWC(epochs=1)], **DATA))
    assert {r.method for r in list_report.layers.values()} == {"gptq+lwc"}
    assert [b.rel_error for b in list_report.blocks] == [b.rel_error for b in flat_report.blocks]
    assert flat.keys() == listed.keys()
    for name, tensors in flat.items():
        for key, value in tensors.items():
            assert torch.equal(value, listed[name][key]), f"{name}.{key}"


def test_calibration_functions_stay_short():
    """No function of the calibration package longer than 60 lines (its docstring not counted)."""
    root = Path(pq.__file__).parent / "calibration"
    long = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if ast.get_docstring(node) is not None:
                    n -= node.body[0].end_lineno - node.body[0].lineno + 1
                if n > 60:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
