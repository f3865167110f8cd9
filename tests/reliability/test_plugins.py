"""Plugins that misbehave: sys.exit at import, a raising hook, malformed registrations, tensors
created at import inside a host's meta-device context. The built-ins always keep working."""

from __future__ import annotations

import types

import pytest
import torch

import piecewise_quant as pq
from piecewise_quant import plugins
from piecewise_quant.plugins import manager
from piecewise_quant.registry import formats, get_format, observers


class EntryPoint:
    def __init__(self, name, load):
        self.name, self.value, self._load = name, f"fake:{name}", load

    def load(self):
        return self._load()


@pytest.fixture
def fresh(monkeypatch):
    from piecewise_quant import registry

    manager.reset_plugin_manager()
    registry._warned.clear()
    yield monkeypatch
    manager.reset_plugin_manager()
    registry._warned.clear()


def _exit_at_import():
    raise SystemExit(3)


def test_plugin_calling_sys_exit_at_import_is_skipped_by_name(fresh):
    fresh.setattr(manager, "_entry_points", lambda: [EntryPoint("exits", _exit_at_import)])
    with pytest.warns(RuntimeWarning, match=r"'exits'.*failed to load.*SystemExit: 3"):
        assert "piecewise" in formats()


def _plugin(**hooks):
    plugin = types.SimpleNamespace()
    for name, fn in hooks.items():
        setattr(plugin, name, plugins.hookimpl(fn))
    return plugin


def test_a_raising_hook_never_disables_the_builtins_or_other_plugins(fresh):
    def broken(register):
        raise RuntimeError("bug in plugin")

    def exits(register):
        raise SystemExit(1)

    def good(register):
        register("mine", lambda groups, bits, symmetric: (groups.amin(-1), groups.amax(-1)))

    fresh.setattr(manager, "_entry_points", lambda: [
        EntryPoint("broken", lambda: _plugin(piecewise_quant_register_formats=broken,
                                             piecewise_quant_register_observers=exits)),
        EntryPoint("good", lambda: _plugin(piecewise_quant_register_observers=good)),
    ])
    with pytest.warns(RuntimeWarning,
                      match=r"'broken' was skipped for piecewise_quant_register_formats: RuntimeError: bug in plugin"):
        assert {"piecewise", "uniform", "fp8"} <= set(formats())
    with pytest.warns(RuntimeWarning, match=r"'broken' was skipped for piecewise_quant_register_observers: SystemExit"):
        assert {"mse", "minmax", "mine"} <= set(observers())
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    pq.quantize(model, pq.PiecewiseQuantConfig(group_size=32, modules_to_not_convert=[]), progress=False)


def test_malformed_registration_skips_only_that_plugin(fresh):
    def bad(register):
        register("not a format")

    fresh.setattr(manager, "_entry_points", lambda: [EntryPoint("bad", lambda: _plugin(piecewise_quant_register_formats=bad))])
    with pytest.warns(RuntimeWarning, match="'bad' was skipped.*must be a WeightFormat instance"):
        assert get_format("uniform").name == "uniform"


def test_plugin_module_tensors_are_real_even_when_first_loaded_under_meta_device(fresh):
    made = {}

    def load():
        made["levels"] = torch.linspace(-1, 1, 16)  # a module-level constant of the plugin
        made["dtype"] = torch.get_default_dtype()
        return _plugin(piecewise_quant_register_observers=lambda register: None)

    fresh.setattr(manager, "_entry_points", lambda: [EntryPoint("consts", load)])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # transformers loads under the model's dtype
    try:
        with torch.device("meta"):
            formats()
    finally:
        torch.set_default_dtype(previous)
    assert made["levels"].device.type == "cpu" and made["dtype"] == torch.float32


def test_nf4_example_plugin_works_when_first_loaded_inside_from_pretrained(rel, tiny_llama_path, repo_root):
    """The example plugin builds its code book at import; transformers triggers the first format
    look-up inside its meta-device model construction ("Cannot copy out of meta tensor" before)."""
    src = repo_root / "examples" / "plugin-nf4" / "src"
    code = f"""
import sys
sys.path.insert(0, {str(src)!r})
from piecewise_quant.plugins import manager

class EntryPoint:
    name, value = "nf4", "piecewise_quant_nf4.plugin"
    def load(self):
        import piecewise_quant_nf4.plugin as plugin
        return plugin

manager._entry_points = lambda: [EntryPoint()]
import torch
from transformers import AutoModelForCausalLM
from piecewise_quant import PiecewiseQuantConfig, quantized_layers
assert "piecewise_quant_nf4" not in sys.modules
config = PiecewiseQuantConfig(grid="nf4", bits=4, group_size=64, modules_to_not_convert=["lm_head", r"re:model\\.layers\\.[1-5]\\..*"])
model = AutoModelForCausalLM.from_pretrained({str(tiny_llama_path)!r}, quantization_config=config)
layers = quantized_layers(model)
assert len(layers) == 7 and {{q.fmt.name for q in layers.values()}} == {{"nf4"}}
with torch.no_grad():
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
print("NF4-OK")
"""  # noqa: E501 (a line of the subprocess script above; wrapping it would change the string)
    proc = rel.run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NF4-OK" in proc.stdout
