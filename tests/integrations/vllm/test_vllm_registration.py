"""Registration through the ``vllm.general_plugins`` entry point, and the config's own checks
(no engine is started here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

pytestmark = [pytest.mark.vllm]


def test_entry_point_is_declared():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "piecewise"]
    assert len(eps) == 1 and eps[0].value == "piecewise_quant.integrations.vllm:register"


def test_vllm_finds_the_method_with_no_user_import():
    """What every vLLM process does at start-up: load the general plugins, then look the
    method up. The script never imports piecewise_quant itself."""
    code = (
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config\n"
        "cls = get_quantization_config('piecewise')\n"
        "print(cls.__module__, 'piecewise' in QUANTIZATION_METHODS)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["piecewise_quant.integrations.vllm.config", "True"]


def test_register_is_idempotent():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from piecewise_quant.integrations.vllm import is_registered, register

    register()
    register()
    assert is_registered()
    assert QUANTIZATION_METHODS.count("piecewise") == 1
    assert get_quantization_config("piecewise").__name__ == "PiecewiseVllmConfig"


def test_online_configs_that_need_calibration_are_refused(tmp_path):
    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig

    static = {"quant_method": "piecewise", "act_bits": 8, "act_mode": "static_per_tensor"}
    with pytest.raises(ValueError, match="static activation scales"):
        PiecewiseVllmConfig.from_config_dict_json(json.dumps(static))
    with pytest.raises(ValueError, match="calibrated recipe"):
        PiecewiseVllmConfig.from_config_dict_json(json.dumps({"calibration": "gptq"}))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        PiecewiseVllmConfig.from_config_file(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{bits: 3")
    with pytest.raises(ValueError, match="not valid JSON"):
        PiecewiseVllmConfig.from_config_file(str(tmp_path / "bad.json"))
    (tmp_path / "r.json").write_text(json.dumps({"bits": 3, "grid": "uniform"}))
    cfg = PiecewiseVllmConfig.from_config_file(str(tmp_path / "r.json"))
    assert cfg.mode == "online" and cfg.core.bits == 3 and cfg.core.grid == "uniform"
    with pytest.raises(ValueError, match="quantization_config_dict_json is invalid: .*bits"):
        PiecewiseVllmConfig.from_config_dict_json(json.dumps({"bits": 11}))


def test_a_kv_cache_scheme_is_refused_not_served_in_full_precision():
    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig

    with pytest.raises(ValueError, match="declares a int4 .* KV cache, which vLLM has no kernel for"):
        PiecewiseVllmConfig.from_config({"quant_method": "piecewise", "bits": 4, "kv_bits": 4})
    with pytest.raises(ValueError, match="int8 .* KV cache, which vLLM has no kernel for"):
        PiecewiseVllmConfig.from_config_dict_json(json.dumps({"kv_cache": {"bits": 8}}))
    with pytest.raises(ValueError, match="int4 piecewise .* KV cache, which vLLM has no kernel for"):
        PiecewiseVllmConfig.from_config({"quant_method": "piecewise", "kv_cache": {"bits": 4, "grid": "piecewise"}})


def test_mode_is_read_from_the_checkpoint(tmp_path):
    """A config.json quantization_config over float tensors (e.g. passed by --hf-overrides) means
    online quantization; over qweight tensors it means pre-quantized."""
    import torch
    from safetensors.torch import save_file

    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig

    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    cfg = PiecewiseVllmConfig.from_config({"quant_method": "piecewise", "bits": 3})
    cfg.maybe_update_config(str(tmp_path))
    assert cfg.mode == "online" and not cfg.prequantized
    save_file({"model.layers.0.mlp.up_proj.qweight": torch.zeros(4, 2, dtype=torch.uint8)}, str(tmp_path / "model.safetensors"))
    cfg = PiecewiseVllmConfig.from_config({"quant_method": "piecewise", "bits": 3})
    cfg.maybe_update_config(str(tmp_path))
    assert cfg.mode == "prequantized"
    online = PiecewiseVllmConfig.from_config_dict_json("{}")
    with pytest.raises(ValueError, match="already quantized"):
        online.maybe_update_config(str(tmp_path))


def test_another_methods_checkpoint_is_named():
    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig

    assert PiecewiseVllmConfig.override_quantization_method({"quant_method": "piecewise"}, None) == "piecewise"
    assert PiecewiseVllmConfig.override_quantization_method({"quant_method": "awq"}, None) is None
    with pytest.raises(ValueError, match="already quantized with 'awq'"):
        PiecewiseVllmConfig.override_quantization_method({"quant_method": "awq"}, "piecewise")


def test_fused_act_scales_are_unified_to_their_maximum():
    import torch

    from piecewise_quant.integrations.vllm.linear import _unify_act_scales

    sets = [{"act_scale": torch.tensor(0.5)}, {"act_scale": torch.tensor(0.8)}, {"qweight": torch.zeros(1)}]
    _unify_act_scales("l.qkv_proj", sets)
    assert float(sets[0]["act_scale"]) == float(sets[1]["act_scale"]) == pytest.approx(0.8)
    assert "act_scale" not in sets[2]


def test_fp4_formats_are_refused_naming_the_format():
    """The vLLM method does not serve FP4 (mxfp4 / nvfp4) weights or activations: the config says
    so, naming the format, before any layer is built (pre-quantized and online alike)."""
    from piecewise_quant.integrations.vllm.config import PiecewiseVllmConfig

    with pytest.raises(ValueError, match="the default scheme uses nvfp4 weights .*vLLM method does not serve"):
        PiecewiseVllmConfig.from_config({"quant_method": "piecewise", "grid": "nvfp4"})
    with pytest.raises(ValueError, match=r"overrides\['\*\.down_proj'\] uses mxfp4 weights"):
        PiecewiseVllmConfig.from_config_dict_json(json.dumps({"overrides": [["*.down_proj", {"grid": "mxfp4"}]]}))
    with pytest.raises(ValueError, match="uses mxfp4 activations"):
        PiecewiseVllmConfig.from_config({"quant_method": "piecewise", "act_bits": 4, "act_format": "mxfp4"})
    assert PiecewiseVllmConfig.from_config({"quant_method": "piecewise", "grid": "uniform"}).core.grid == "uniform"
