"""Untrusted module-name patterns: linear-time matching, limits, early errors, unmatched patterns."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import piecewise_quant as pq
from piecewise_quant.patterns import MAX_PATTERN_LENGTH, MAX_PATTERNS, MAX_SCANNED_PATTERNS, PatternSet, compile_pattern


def test_catastrophic_backtracking_regex_matches_in_linear_time():
    # Python's re needs ~2**60 steps for this; a backtracking matcher would hang the subprocess
    code = (
        "from piecewise_quant.config import PiecewiseQuantConfig\n"
        "c = PiecewiseQuantConfig(overrides={'re:(.|.)*z': {'bits': 8}}, modules_to_not_convert=['re:(a|aa)*b'])\n"
        "name = 'model.layers.0.mlp.down_proj' + 'a' * 60\n"
        "print(c.spec_for(name).bits, c.spec_for(name + 'z').bits)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["4", "8"]


@pytest.mark.parametrize(
    "pattern, name, expected",
    [
        ("*.down_proj", "model.layers.0.mlp.down_proj", True),
        ("*.down_proj", "down_proj", False),
        ("lm_head", "model.lm_head", True),
        ("lm_head", "model.xlm_head", False),
        ("*layers.[0-2].*", "model.layers.1.q", True),
        ("*layers.[!0-2].*", "model.layers.1.q", False),
        (r"re:model\.layers\.[1-5]\..*", "model.layers.3.mlp.up_proj", True),
        (r"re:model\.layers\.[1-5]\..*", "model.layers.0.mlp.up_proj", False),
        (r"re:(q|k|v)_proj", "q_proj", True),
        (r"re:\w+\.\d+", "layers.12", True),
        ("re:a{2,3}", "aaaa", False),
    ],
)
def test_pattern_semantics_match_fnmatch_and_re_fullmatch(pattern, name, expected):
    assert compile_pattern(pattern)(name) is expected


@pytest.mark.parametrize(
    "pattern, needle",
    [
        (r"re:(a)\1", "backreference"),
        ("re:(?=a)a", "lookahead"),
        ("re:(?i)lm_head", "inline flags"),
        ("re:[", "not a valid regular expression"),
        ("re:(a{100}){100}", "too complex"),
        ("x" * (MAX_PATTERN_LENGTH + 1), "longer than"),
    ],
)
def test_unsupported_or_oversized_patterns_fail_at_config_time(pattern, needle):
    with pytest.raises(ValueError, match=needle):
        pq.PiecewiseQuantConfig(overrides={pattern: {"bits": 8}})
    with pytest.raises(ValueError, match=needle):
        pq.PiecewiseQuantConfig(modules_to_not_convert=[pattern])


def test_invalid_regex_in_modules_to_not_convert_is_a_config_error():
    with pytest.raises(ValueError, match=r"modules_to_not_convert: pattern 're:\(' is not a valid regular expression"):
        pq.PiecewiseQuantConfig.from_dict({"modules_to_not_convert": ["re:("]})


def test_pattern_count_limits():
    with pytest.raises(ValueError, match=f"more than the {MAX_PATTERNS} allowed"):
        PatternSet([f"layer{i}" for i in range(MAX_PATTERNS + 1)])
    with pytest.raises(ValueError, match="glob/regex patterns"):
        PatternSet([f"*.layer{i}" for i in range(MAX_SCANNED_PATTERNS + 1)])


def test_a_hundred_thousand_exact_override_names_are_cheap():
    names = [f"blocks.{i}.proj" for i in range(100_000)]
    config = pq.PiecewiseQuantConfig(group_size=32, observer="minmax", modules_to_not_convert=[],
                                     overrides=[[n, {"bits": 8, "grid": "uniform"}] for n in names])
    model = nn.Sequential(nn.Linear(32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 99,999 names match no layer of this model
        pq.quantize(model, config, progress=False)
    assert config.spec_for("blocks.99999.proj").bits == 8
    assert config.spec_for("x.blocks.5.proj").grid == "uniform"  # dotted-suffix match of a plain name


def test_first_matching_pattern_wins_across_plain_and_glob():
    s = PatternSet(["*.down_proj", "model.layers.0.mlp.down_proj", "re:.*"])
    assert s.first("model.layers.0.mlp.down_proj") == 0
    s = PatternSet(["model.layers.0.mlp.down_proj", "*.down_proj"])
    assert s.first("model.layers.0.mlp.down_proj") == 0
    assert s.first("model.layers.1.mlp.down_proj") == 1


def _model():
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("up_proj", nn.Linear(32, 64))
    m.add_module("down_proj", nn.Linear(64, 32))
    return m


def test_override_pattern_that_matches_nothing_warns_naming_it():
    config = pq.PiecewiseQuantConfig(group_size=32, observer="minmax", modules_to_not_convert=[],
                                     overrides={"*.down_prj": {"bits": 8}})
    with pytest.warns(pq.PiecewiseQuantWarning, match=r"overrides pattern '\*\.down_prj' matches no Linear layer.*down_proj"):
        pq.quantize(_model(), config, progress=False)


def test_skip_pattern_that_matches_nothing_warns_and_strict_raises_before_any_change():
    config = pq.PiecewiseQuantConfig(group_size=32, observer="minmax", modules_to_not_convert=["lm_haed"])
    with pytest.warns(pq.PiecewiseQuantWarning, match="modules_to_not_convert pattern 'lm_haed'"):
        pq.quantize(_model(), config, progress=False)
    strict = pq.PiecewiseQuantConfig(group_size=32, modules_to_not_convert=["lm_haed"], strict=True)
    model = _model()
    with pytest.raises(ValueError, match="lm_haed.*strict=True"):
        pq.quantize(model, strict, progress=False)
    assert not pq.quantized_layers(model)
    assert pq.PiecewiseQuantConfig.from_dict(strict.to_dict()).strict is True


def test_default_skip_list_does_not_warn_on_models_without_lm_head():
    with warnings.catch_warnings():
        warnings.simplefilter("error", pq.PiecewiseQuantWarning)
        pq.quantize(_model(), pq.PiecewiseQuantConfig(group_size=32, observer="minmax"), progress=False)


def test_quant_method_is_matched_case_insensitively_by_the_core():
    assert pq.PiecewiseQuantConfig.from_dict({"quant_method": "Piecewise", "bits": 3}).bits == 3
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        pq.PiecewiseQuantConfig.from_dict({"quant_method": "gptq"})


def test_config_with_compiled_matchers_pickles_and_deepcopies():
    import copy
    import pickle

    config = pq.PiecewiseQuantConfig(overrides={"re:.*q_proj": {"bits": 8}})
    assert config.spec_for("a.q_proj").bits == 8
    assert pickle.loads(pickle.dumps(config)) == config
    assert copy.deepcopy(config).spec_for("a.q_proj").bits == 8
