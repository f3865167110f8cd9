"""Save, then reload a piecewise checkpoint with plain ``from_pretrained``; corrupt checkpoints fail
with an error naming the tensor."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch
from torch import nn

import piecewise_quant as pq

transformers = pytest.importorskip("transformers")

Q = "model.layers.0.self_attn.q_proj"  # a piecewise layer of the saved checkpoint
DOWN = "model.layers.0.mlp.down_proj"  # the 8-bit uniform override


def _reload(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def test_reload_in_process_is_exact(piecewise_saved, piecewise_on_load, tfh):
    saved = torch.load(piecewise_saved / "logits.pt")
    model = _reload(piecewise_saved)
    assert model.config.quantization_config.to_dict() == tfh.PIECEWISE_CFG.to_dict()
    got = {n: m for n, m in model.named_modules() if isinstance(m, pq.QuantLinear)}
    want = {n: m for n, m in piecewise_on_load.named_modules() if isinstance(m, pq.QuantLinear)}
    assert set(got) == set(want)
    for name, q in got.items():
        assert q.layer_spec == want[name].layer_spec
        for t, value in want[name].quantized_tensors().items():
            mine = q.quantized_tensors()[t]
            assert mine.dtype == value.dtype and torch.equal(mine, value), f"{name}.{t}"
    assert model.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(tfh.logits_of(model, saved["ids"]), saved["logits"])


def test_reload_in_a_fresh_interpreter_without_importing_piecewise_quant(piecewise_saved, tmp_path, tfh):
    out = tmp_path / "fresh_logits.pt"
    code = textwrap.dedent(
        f"""
        import sys
        # the .pth hook ran at start-up: cheap, no torch or transformers
        assert "piecewise_quant._autoload" in sys.modules, sorted(sys.modules)
        assert "torch" not in sys.modules and "transformers" not in sys.modules

        import torch
        from transformers import AutoModelForCausalLM

        heavy = sorted(m for m in sys.modules if m.startswith((
            "piecewise_quant.qlinear", "piecewise_quant.quantiz", "piecewise_quant.kernels",
            "piecewise_quant.formats")))
        assert not heavy, heavy
        model = AutoModelForCausalLM.from_pretrained({str(piecewise_saved)!r})
        q = model.model.layers[0].self_attn.q_proj
        assert type(q).__name__ == "QuantLinear" and type(q).__module__ == "piecewise_quant.qlinear", type(q)
        data = torch.load({str(piecewise_saved / "logits.pt")!r})
        with torch.no_grad():
            torch.save(model(data["ids"]).logits, {str(out)!r})
        print("RELOADED-OK")
        """
    )
    proc = tfh.run_python(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RELOADED-OK" in proc.stdout
    saved = torch.load(piecewise_saved / "logits.pt")
    assert torch.equal(torch.load(out), saved["logits"])


def test_reload_in_bfloat16(piecewise_saved, tfh):
    saved = torch.load(piecewise_saved / "logits.pt")
    model = _reload(piecewise_saved, dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    assert q.compute_dtype == torch.bfloat16
    assert q.scales.dtype == torch.float16  # stored tensors keep their dtype
    assert q.breakpoint_ids.dtype == torch.uint8
    logits = tfh.logits_of(model, saved["ids"])
    assert logits.dtype == torch.bfloat16
    ref = saved["logits"]
    assert ((logits.float() - ref).abs().max() / ref.abs().max()) < 0.05


# ---- corrupt checkpoints ------------------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("logits.pt"))
    return dst


def _edit_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "model.safetensors"))
    edit(sd)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def _set(key, fn):
    return lambda sd: sd.__setitem__(key, fn(sd[key]))


TENSOR_CASES = {
    "missing scales": (lambda sd: sd.pop(f"{Q}.scales"), f"{Q}.scales", "missing"),
    "missing breakpoint_ids": (lambda sd: sd.pop(f"{Q}.breakpoint_ids"), f"{Q}.breakpoint_ids", "missing"),
    "missing qzeros": (lambda sd: sd.pop(f"{DOWN}.qzeros"), f"{DOWN}.qzeros", "missing"),
    "scales wrong shape": (_set(f"{Q}.scales", lambda t: torch.cat([t, t], dim=1)), f"{Q}.scales", "shape"),
    "qweight wrong shape": (_set(f"{Q}.qweight", lambda t: t[:-1]), f"{Q}.qweight", "shape"),
    "scales float32": (_set(f"{Q}.scales", lambda t: t.float()), f"{Q}.scales", "dtype F32"),
    "qweight int8": (_set(f"{Q}.qweight", lambda t: t.view(torch.int8)), f"{Q}.qweight", "dtype I8"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_corrupt_tensor_fails_naming_it(case, piecewise_saved, tmp_path):
    from piecewise_quant.integrations.transformers import CheckpointMismatchError

    edit, tensor, what = TENSOR_CASES[case]
    broken = _copy(piecewise_saved, tmp_path / "broken")
    _edit_tensors(broken, edit)
    with pytest.raises(CheckpointMismatchError) as info:
        _reload(broken)
    message = str(info.value)
    assert repr(tensor) in message and what in message, message
    assert isinstance(info.value, ValueError)


def test_float_checkpoint_under_a_piecewise_config_is_refused(piecewise_saved, tiny_llama_path, tmp_path):
    broken = _copy(piecewise_saved, tmp_path / "float-weights")
    shutil.copy(tiny_llama_path / "model.safetensors", broken / "model.safetensors")
    with pytest.raises(ValueError, match=rf"'{Q}\.qweight' is missing.*float '{Q}\.weight' instead"):
        _reload(broken)


def test_missing_tensor_in_a_bin_checkpoint_is_caught_after_loading(piecewise_saved, tmp_path):
    """No safetensors headers to check: the post-load check still names the missing tensor."""
    from safetensors.torch import load_file

    broken = _copy(piecewise_saved, tmp_path / "bin")
    sd = load_file(str(broken / "model.safetensors"))
    (broken / "model.safetensors").unlink()
    del sd[f"{Q}.scales"]
    torch.save(sd, broken / "pytorch_model.bin")
    with pytest.raises(ValueError, match=rf"'{Q}\.scales' was not found in the checkpoint"):
        _reload(broken)


def _edit_config(path, **changes):
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"].update(changes)
    cfg_path.write_text(json.dumps(cfg))


def test_unknown_grid_in_config_fails_naming_layer_and_grid(piecewise_saved, tmp_path):
    broken = _copy(piecewise_saved, tmp_path / "grid")
    _edit_config(broken, overrides={"*.down_proj": {"bits": 8, "grid": "nf5"}})
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.mlp\.down_proj'.*grid 'nf5'"):
        _reload(broken)


def test_newer_schema_version_is_refused(piecewise_saved, tmp_path):
    broken = _copy(piecewise_saved, tmp_path / "version")
    _edit_config(broken, version=pq.PiecewiseQuantConfig().version + 1)
    with pytest.raises(ValueError, match="schema version"):
        _reload(broken)


def test_unknown_config_field_is_refused(piecewise_saved, tmp_path):
    broken = _copy(piecewise_saved, tmp_path / "field")
    _edit_config(broken, bits_per_weight=4)
    with pytest.raises(ValueError, match="bits_per_weight"):
        _reload(broken)


def test_passing_a_config_to_a_piecewise_checkpoint(piecewise_saved, tfh):
    """transformers keeps the checkpoint's config; it refuses a config of a different class, which
    the core ``PiecewiseQuantConfig`` is (the checkpoint's is ``PiecewiseHfConfig``)."""
    from piecewise_quant.integrations.transformers import PiecewiseHfConfig

    with pytest.raises(ValueError, match="PiecewiseHfConfig"):
        _reload(piecewise_saved, quantization_config=pq.PiecewiseQuantConfig(bits=3))
    with pytest.warns(UserWarning, match="quantization_config"):
        model = _reload(piecewise_saved, quantization_config=PiecewiseHfConfig(bits=3))
    assert model.config.quantization_config.to_dict() == tfh.PIECEWISE_CFG.to_dict()


def test_static_activation_scales_round_trip(tiny_llama_path, tiny_inputs, tmp_path, tfh):
    cfg = tfh.subset_config(grid="uniform", act_bits=8, act_mode="static_per_tensor")
    model = tfh.load_quantized(tiny_llama_path, cfg)
    with pytest.raises(RuntimeError, match="calibrat"):
        tfh.logits_of(model, tiny_inputs)
    assert pq.calibrate_activation_scales(model, [tiny_inputs]) == 7
    logits = tfh.logits_of(model, tiny_inputs)
    model.save_pretrained(tmp_path / "static")
    again = _reload(tmp_path / "static")
    assert torch.equal(again.model.layers[0].mlp.up_proj.act_scale, model.model.layers[0].mlp.up_proj.act_scale)
    assert torch.equal(tfh.logits_of(again, tiny_inputs), logits)

    _edit_tensors(tmp_path / "static", lambda sd: sd.pop(f"{Q}.act_scale"))
    with pytest.raises(ValueError, match=rf"'{Q}\.act_scale' is missing"):
        _reload(tmp_path / "static")
