import json

import pytest
import torch
from torch import nn

import piecewise_quant as pq
from piecewise_quant.config import SCHEMA_VERSION


def test_defaults_match_the_documented_signature():
    c = pq.PiecewiseQuantConfig()
    assert (c.grid, c.bits, c.group_size, c.act_bits) == ("piecewise", 4, 128, None)
    assert c.quant_method == "piecewise" and c.version == SCHEMA_VERSION
    fp8 = pq.PiecewiseQuantConfig(grid="fp8")
    assert (fp8.bits, fp8.group_size) == (8, "channel")
    assert pq.PiecewiseQuantConfig(grid="uniform").symmetric is False
    assert pq.PiecewiseQuantConfig(group_size=None).group_size == "channel"


def test_json_round_trip_is_exact():
    c = pq.PiecewiseQuantConfig(
        bits=3, group_size=64, grid="uniform", symmetric=True, act_bits=8, act_format="fp8",
        act_mode="static_per_tensor", act_clip_ratio=0.9, act_topk=2, modules_to_not_convert=["lm_head", "*.gate"],
        overrides={"*.down_proj": {"bits": 8}, "re:.*layers\\.0\\..*": {"grid": "piecewise", "bits": 4}},
    )
    text = c.to_json_string()
    d = json.loads(text)
    assert d["quant_method"] == "piecewise" and d["version"] == SCHEMA_VERSION
    assert list(d) == sorted(d)
    again = pq.PiecewiseQuantConfig.from_json_string(text)
    assert again == c
    assert again.to_dict() == c.to_dict()


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 5}, "bits"),  # passes QuantSpec, rejected by the format at quantize time (see below)
        ({"grid": "nf5"}, "grid"),
        ({"act_clip_ratio": -0.5}, "act_clip_ratio"),
        ({"act_clip_ratio": 1.5}, "act_clip_ratio"),
        ({"act_topk": -1}, "act_topk"),
        ({"act_bits": 6}, "act_bits"),
        ({"act_bits": 4, "act_format": "fp8"}, "act_format"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": "rows"}, "group_size"),
        ({"scale_dtype": "float64"}, "scale_dtype"),
        ({"grid": "uniform", "act_bits": 8, "act_mode": "per_batch"}, "act_mode"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(kwargs, field):
    model = nn.Sequential(nn.Linear(64, 8))
    with pytest.raises(ValueError, match=field) as info:
        pq.quantize(model, pq.PiecewiseQuantConfig(**kwargs), progress=False)
    assert "allowed" in str(info.value) or "must be" in str(info.value)
    assert isinstance(model[0], nn.Linear)  # nothing changed


def test_group_size_that_does_not_divide_names_the_layer():
    model = nn.Sequential(nn.Linear(128, 16), nn.Linear(16, 96))
    model.add_module("odd", nn.Linear(96, 4))
    with pytest.raises(ValueError, match="'odd'.*group_size=64.*in_features=96"):
        pq.quantize(model, pq.PiecewiseQuantConfig(group_size=64, overrides={"1": {"group_size": 16}}), progress=False)
    assert all(isinstance(m, nn.Linear) for m in model)  # checked before anything was replaced


def test_overrides_and_skips_resolve_by_pattern():
    c = pq.PiecewiseQuantConfig(
        overrides={"*.down_proj": {"bits": 8, "grid": "uniform"}, "re:.*\\.q_proj": {"grid": "fp8"}},
        modules_to_not_convert=["lm_head", "model.layers.1.*"],
    )
    assert c.spec_for("model.layers.0.mlp.down_proj").bits == 8
    assert c.spec_for("model.layers.0.mlp.down_proj").grid == "uniform"
    assert c.spec_for("model.layers.0.mlp.down_proj").group_size == 128
    q = c.spec_for("model.layers.0.self_attn.q_proj")
    assert (q.grid, q.bits, q.group_size) == ("fp8", 8, "channel")
    assert c.spec_for("lm_head") is None and c.spec_for("model.lm_head") is None
    assert c.spec_for("model.layers.1.mlp.up_proj") is None
    assert c.spec_for("model.layers.0.mlp.up_proj") == c.default_spec
    assert pq.PiecewiseQuantConfig(overrides={"x": {"grid": "none"}}).spec_for("x") is None


def test_bad_overrides_raise_at_construction():
    with pytest.raises(ValueError, match="unknown fields.*'bitz'"):
        pq.PiecewiseQuantConfig(overrides={"*": {"bitz": 3}})
    with pytest.raises(ValueError, match="overrides\\['\\*'\\].*bits"):
        pq.PiecewiseQuantConfig(overrides={"*": {"bits": 11}})
    with pytest.raises(ValueError, match="regular expression"):
        pq.PiecewiseQuantConfig(overrides={"re:(": {"bits": 8}})


def test_newer_schema_version_and_foreign_method_are_refused():
    d = pq.PiecewiseQuantConfig().to_dict()
    with pytest.raises(ValueError, match="schema version 99.*upgrade"):
        pq.PiecewiseQuantConfig.from_dict({**d, "version": 99})
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        pq.PiecewiseQuantConfig.from_dict({**d, "quant_method": "gptq"})
    with pytest.raises(ValueError, match="unknown quantization_config fields \\['frobnicate'\\]"):
        pq.PiecewiseQuantConfig.from_dict({**d, "frobnicate": 1})


def test_unknown_grid_lists_allowed_ones():
    with pytest.raises(ValueError, match="unknown grid 'nf5'; allowed: 'fp8', 'mxfp4', 'nvfp4', 'piecewise', 'uniform'"):
        pq.quantize(nn.Sequential(nn.Linear(64, 4)), pq.PiecewiseQuantConfig(grid="nf5"), progress=False)


def test_non_linear_override_target_is_a_clear_error():
    model = nn.Sequential(nn.Linear(64, 8), nn.Conv1d(8, 8, 1))
    with pytest.raises(ValueError, match="'1' is a Conv1d; only torch.nn.Linear"):
        pq.quantize(model, pq.PiecewiseQuantConfig(group_size=32, overrides={"1": {"bits": 8}}), progress=False)


def test_model_without_linear_layers_is_an_error():
    with pytest.raises(ValueError, match="no nn.Linear"):
        pq.quantize(nn.Sequential(nn.ReLU()), pq.PiecewiseQuantConfig(), progress=False)


def test_output_embeddings_stay_float_by_default():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(64, 64)
            self.head = nn.Linear(64, 10)

        def get_output_embeddings(self):
            return self.head

    m = pq.quantize(Tiny(), pq.PiecewiseQuantConfig(group_size=32), progress=False)
    assert isinstance(m.head, nn.Linear) and isinstance(m.body, pq.QuantLinear)
    m2 = pq.quantize(Tiny(), pq.PiecewiseQuantConfig(group_size=32, modules_to_not_convert=[]), progress=False)
    assert isinstance(m2.head, pq.QuantLinear)


def test_multihead_attention_out_proj_is_left_alone():
    mha = nn.Sequential(nn.MultiheadAttention(64, 4))
    with pytest.raises(ValueError, match="no nn.Linear"):
        pq.quantize(mha, pq.PiecewiseQuantConfig(group_size=32), progress=False)


def test_gpt2_style_conv1d_models_get_a_clear_error():
    class Conv1D(nn.Module):  # the shape of transformers.pytorch_utils.Conv1D
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(64, 192))

    model = nn.Sequential(Conv1D())
    with pytest.raises(ValueError, match="Conv1D layers.*not supported"):
        pq.quantize(model, pq.PiecewiseQuantConfig(group_size=32), progress=False)


def test_override_order_survives_a_host_that_sorts_json_keys():
    """transformers writes config.json with sort_keys=True; the first-match order must survive."""
    import json

    cfg = pq.PiecewiseQuantConfig(overrides={"model.layers.1.o_proj": {"bits": 2}, "*.o_proj": {"grid": "fp8"}})
    assert cfg.spec_for("model.layers.1.o_proj").bits == 2
    stored = json.loads(json.dumps(cfg.to_dict(), sort_keys=True))
    back = pq.PiecewiseQuantConfig.from_dict(stored)
    assert back == cfg
    assert back.spec_for("model.layers.1.o_proj").bits == 2 and back.spec_for("model.layers.0.o_proj").grid == "fp8"
    # version-1 configs stored a mapping; they still load
    v1 = {**stored, "version": 1, "overrides": {"*.o_proj": {"grid": "fp8"}}}
    assert pq.PiecewiseQuantConfig.from_dict(v1).spec_for("a.o_proj").grid == "fp8"
    with pytest.raises(ValueError, match="twice"):
        pq.PiecewiseQuantConfig(overrides=[["x", {"bits": 2}], ["x", {"bits": 3}]])
