"""Tampered piecewise checkpoints: every load refuses them with an error naming the problem, and
an intact one reloads exactly. (transformers; the vLLM and diffusers hosts share these checks,
see their own test folders.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import piecewise_quant as pq
from piecewise_quant.checkpoint import MARKER_PLAN, CheckpointMismatchError


def load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def rewrite_tensors(path: Path, edit) -> None:
    f = path / "model.safetensors"
    with safe_open(str(f), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata=meta)


def edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def edit_plan(path: Path, edit) -> None:
    """Edit quantization_config and re-stamp the marker, as an attacker who knows the format would:
    then only the tensor checks stand between the edit and a wrong model."""
    edit_config(path, lambda cfg: edit(cfg["quantization_config"]))
    from piecewise_quant.checkpoint import plan_hash

    plan = json.loads((path / "config.json").read_text())["quantization_config"]
    new = plan_hash(pq.PiecewiseQuantConfig.from_dict(plan))
    rewrite_tensors(path, lambda t: None)
    f = path / "model.safetensors"
    with safe_open(str(f), framework="pt") as fh:
        meta = dict(fh.metadata())
    meta[MARKER_PLAN] = new
    save_file(load_file(str(f)), str(f), metadata=meta)


def test_intact_checkpoint_is_marked_and_reloads_exactly(saved_checkpoint, tiny_llama_path):
    with safe_open(str(saved_checkpoint / "model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["piecewise_quant.format"] == "piecewise-quant" and len(meta[MARKER_PLAN]) == 64
    model = load(saved_checkpoint)
    assert isinstance(model.model.layers[0].mlp.down_proj, pq.QuantLinear)


@pytest.mark.parametrize("key", ["model.norm.weight", "model.embed_tokens.weight", "model.layers.3.input_layernorm.weight"])
def test_a_deleted_float_tensor_is_an_error_naming_it(checkpoint_copy, key):
    rewrite_tensors(checkpoint_copy, lambda t: t.pop(key))
    with pytest.raises(CheckpointMismatchError, match=f"tensor '{key}' is missing"):
        load(checkpoint_copy)


def test_an_extra_tensor_is_an_error_naming_it(checkpoint_copy):
    rewrite_tensors(checkpoint_copy, lambda t: t.__setitem__("model.layers.0.mlp.extra", torch.zeros(3)))
    with pytest.raises(CheckpointMismatchError, match="'model.layers.0.mlp.extra' is in the checkpoint but not in the model"):
        load(checkpoint_copy)


def test_nan_scales_are_refused(checkpoint_copy):
    key = "model.layers.0.self_attn.q_proj.scales"
    rewrite_tensors(checkpoint_copy, lambda t: t[key].view(-1)[:3].fill_(float("nan")))
    with pytest.raises(CheckpointMismatchError, match=f"'{key}' holds 3 NaN/Inf"):
        load(checkpoint_copy)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda q: q.update(grid="uniform", symmetric=True), id="grid-piecewise-to-uniform-symmetric"),
        pytest.param(lambda q: q.update(overrides=[["*.down_proj", {"grid": "none"}]]), id="override-marks-layer-float"),
        pytest.param(lambda q: q.update(bits=8), id="bits"),
        pytest.param(lambda q: q.update(modules_to_not_convert=["lm_head", "re:model\\.layers\\.[2-5]\\..*"]), id="skip-list"),
    ],
)
def test_an_edited_plan_is_detected_by_the_marker(checkpoint_copy, edit):
    edit_config(checkpoint_copy, lambda cfg: edit(cfg["quantization_config"]))
    with pytest.raises(CheckpointMismatchError, match="not the one its tensors were written with"):
        load(checkpoint_copy)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda q: q.update(grid="uniform", symmetric=True), "breakpoint_ids' is in the checkpoint but not in the model"),
        (lambda q: q.update(overrides=[["*.down_proj", {"grid": "none"}]]), "down_proj.qweight' is in the checkpoint"),
        (lambda q: q.update(modules_to_not_convert=["lm_head", "re:model\\.layers\\.[2-5]\\..*"]),
         "model.layers.1.self_attn.q_proj.qweight' is missing"),
    ],
)
def test_an_edited_plan_with_a_forged_marker_is_caught_by_the_tensors(checkpoint_copy, edit, needle):
    edit_plan(checkpoint_copy, edit)
    with pytest.raises(CheckpointMismatchError, match=needle):
        load(checkpoint_copy)


def test_fewer_hidden_layers_in_config_is_an_error(checkpoint_copy):
    edit_config(checkpoint_copy, lambda cfg: cfg.update(num_hidden_layers=4))
    with pytest.raises(CheckpointMismatchError, match="model.layers.5.*is in the checkpoint but not in the model"):
        load(checkpoint_copy)


def test_quant_method_with_other_case_is_refused_with_a_fix(checkpoint_copy):
    edit_config(checkpoint_copy, lambda cfg: cfg["quantization_config"].update(quant_method="Piecewise"))
    with pytest.raises(CheckpointMismatchError, match="quant_method 'Piecewise'.*write \"piecewise\""):
        load(checkpoint_copy)


def test_stripped_quantization_config_is_refused(checkpoint_copy):
    edit_config(checkpoint_copy, lambda cfg: cfg.pop("quantization_config"))
    with pytest.raises(CheckpointMismatchError, match="config.json has no quantization_config"):
        load(checkpoint_copy)


def test_truncated_weights_file_is_a_clear_error(checkpoint_copy):
    f = checkpoint_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointMismatchError, match="not a readable safetensors file.*interrupted save"):
        load(checkpoint_copy)


def test_core_quantized_model_saved_with_save_pretrained_is_marked(tiny_llama_path, tmp_path, rel):
    model = load(tiny_llama_path)
    pq.quantize(model, rel.SUBSET, progress=False)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata()["piecewise_quant.format"] == "piecewise-quant"
    edit_config(tmp_path, lambda cfg: cfg.pop("quantization_config"))
    with pytest.raises(CheckpointMismatchError, match="no quantization_config"):
        load(tmp_path)


def test_float_load_with_autoload_off_is_refused_in_a_fresh_interpreter(saved_checkpoint, rel):
    code = (
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(saved_checkpoint)!r})\n"
    )
    proc = rel.run_python(code, env_extra={"PIECEWISE_QUANT_NO_AUTOLOAD": "1"})
    assert proc.returncode != 0
    assert "CheckpointMismatchError" in proc.stderr and "PIECEWISE_QUANT_NO_AUTOLOAD" in proc.stderr


def test_unreadable_weights_file_says_permission_denied(saved_checkpoint, monkeypatch):
    import os

    from piecewise_quant.checkpoint import read_headers

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith(".safetensors") else real(p, mode))
    with pytest.raises(CheckpointMismatchError, match="not readable by this user \\(permission denied"):
        read_headers([str(saved_checkpoint / "model.safetensors")])
