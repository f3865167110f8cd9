"""``PiecewiseHfConfig``: the transformers-side wrapper of the core config."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

import piecewise_quant as pq

transformers = pytest.importorskip("transformers")

from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402

from piecewise_quant.integrations.transformers import PiecewiseHfConfig, PiecewiseMethod, as_core_config  # noqa: E402

CORE = pq.PiecewiseQuantConfig(
    bits=3, group_size=64, modules_to_not_convert=["lm_head", "*.gate"], overrides={"*.down_proj": {"bits": 8}}
)


def test_to_dict_is_exactly_the_core_dict():
    hf = PiecewiseHfConfig.from_core(CORE)
    assert isinstance(hf, QuantizationConfigMixin)
    assert hf.to_dict() == CORE.to_dict() == hf.to_diff_dict() == dict(hf)
    assert json.loads(hf.to_json_string()) == CORE.to_dict()
    assert hf.quant_method == "piecewise" and hf.quant_method is PiecewiseMethod.PIECEWISE
    assert hf.quant_method.value == "piecewise" and f"{hf.quant_method}" == "piecewise"
    assert "PiecewiseHfConfig" in repr(hf)


def test_from_dict_round_trips_and_validates():
    again = PiecewiseHfConfig.from_dict(CORE.to_dict())
    assert again.core == CORE and again == CORE
    cfg, unused = PiecewiseHfConfig.from_dict(CORE.to_dict(), return_unused_kwargs=True, bits=4, foo=1)
    assert cfg.bits == 4 and unused == {"foo": 1}
    with pytest.raises(ValueError, match="schema version"):
        PiecewiseHfConfig.from_dict({**CORE.to_dict(), "version": CORE.version + 1})
    with pytest.raises(ValueError, match="unknown quantization_config fields"):
        PiecewiseHfConfig.from_dict({**CORE.to_dict(), "nonsense": 1})
    with pytest.raises(ValueError, match="quant_method"):
        PiecewiseHfConfig.from_dict({**CORE.to_dict(), "quant_method": "gptq"})


def test_fields_read_and_write_through_to_a_validated_core():
    hf = PiecewiseHfConfig(bits=4, grid="uniform")
    assert (hf.bits, hf.grid, hf.symmetric) == (4, "uniform", False)
    hf.bits = 8
    assert hf.core.bits == 8 and hf.to_dict()["bits"] == 8
    with pytest.raises(ValueError, match="bits"):
        hf.bits = 0
    assert hf.update(group_size=32, not_a_field=1) == {"not_a_field": 1}
    assert hf.group_size == 32
    with pytest.raises(ValueError):
        hf.quant_method = "gptq"
    with pytest.raises(AttributeError):
        hf.no_such_attribute  # noqa: B018
    assert getattr(hf, "dequantize", False) is False  # transformers probes this


def test_copy_and_pickle_keep_the_core():
    hf = PiecewiseHfConfig.from_core(CORE)
    for other in (copy.deepcopy(hf), copy.copy(hf), pickle.loads(pickle.dumps(hf))):
        assert isinstance(other, PiecewiseHfConfig) and other.core == CORE


def test_as_core_config_accepts_every_form():
    hf = PiecewiseHfConfig.from_core(CORE)
    assert as_core_config(CORE) is CORE
    assert as_core_config(hf) is hf.core
    assert as_core_config(CORE.to_dict()) == CORE
    with pytest.raises(TypeError, match="PiecewiseQuantConfig"):
        as_core_config(42)
    with pytest.raises(TypeError):
        PiecewiseHfConfig(core=CORE, bits=4)
