"""Third-party plugins: an inline format plugin, entry-point discovery, failures, the off switch."""

from __future__ import annotations

import importlib.metadata
import types

import pytest
import torch
from torch import nn

import piecewise_quant as pq
from piecewise_quant import plugins
from piecewise_quant.config import LayerSpec
from piecewise_quant.formats import TensorLayout, WeightFormat
from piecewise_quant.kernels import pack_codes, packed_length, unpack_codes
from piecewise_quant.plugins import manager
from piecewise_quant.registry import formats, get_format, observers

NF4 = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])


class NF4Format(WeightFormat):
    """A codebook format the core does not have: 4-bit NormalFloat with per-group absmax."""

    name = "nf4-test"
    supported_bits = (4,)

    def layout(self, layer: LayerSpec) -> dict[str, TensorLayout]:
        return {
            "qweight": TensorLayout((layer.out_features, packed_length(layer.in_features, 4)), torch.uint8),
            "absmax": TensorLayout((layer.out_features, layer.n_groups), torch.float32),
        }

    def quantize(self, weight, layer):
        g = weight.detach().float().reshape(layer.out_features, layer.n_groups, -1)
        absmax = g.abs().amax(-1).clamp(min=1e-12)
        codes = (g / absmax.unsqueeze(-1)).unsqueeze(-1).sub(NF4).abs().argmin(-1)
        return {"qweight": pack_codes(codes.reshape(layer.out_features, -1), 4), "absmax": absmax}

    def dequantize(self, tensors, layer, dtype):
        codes = unpack_codes(tensors["qweight"], 4, layer.in_features).long()
        g = NF4[codes].reshape(layer.out_features, layer.n_groups, -1) * tensors["absmax"].unsqueeze(-1)
        return g.reshape(layer.out_features, layer.in_features).to(dtype)


def make_plugin():
    plugin = types.SimpleNamespace()

    @plugins.hookimpl
    def piecewise_quant_register_formats(register):
        register(NF4Format())

    plugin.piecewise_quant_register_formats = piecewise_quant_register_formats
    return plugin


@pytest.fixture
def nf4_plugin():
    pm = plugins.get_plugin_manager()
    plugin = make_plugin()
    pm.register(plugin, name="nf4-test-plugin")
    try:
        yield plugin
    finally:
        pm.unregister(plugin)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def test_builtins_are_registered_through_the_hooks():
    assert {"piecewise", "uniform", "fp8"} <= set(formats())
    assert {"minmax", "mse"} <= set(observers())
    names = [n for n, _ in plugins.get_plugin_manager().list_name_plugin()]
    assert "piecewise_quant.builtin" in names


def test_inline_plugin_format_quantizes_runs_and_survives_save_reload(nf4_plugin, tmp_path):
    config = pq.PiecewiseQuantConfig(grid="nf4-test", bits=4, group_size=32, modules_to_not_convert=[])
    model = pq.quantize(_model(), config, progress=False)
    assert isinstance(model[0], pq.QuantLinear) and model[0].fmt.name == "nf4-test"
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = model(x)
        expected = nn.functional.linear(torch.relu(nn.functional.linear(x, model[0].dequantize(), model[0].bias)),
                                        model[2].dequantize(), model[2].bias)
    torch.testing.assert_close(y, expected)
    ref = _model()
    with torch.no_grad():
        assert (y - ref(x)).pow(2).mean() / ref(x).pow(2).mean() < 0.05
    assert model[0].bits_per_weight() == pytest.approx(4 + 32 / 32)
    pq.save_quantized(model, tmp_path)
    reloaded = pq.load_quantized(_model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(x), y)


def test_unregistered_format_is_unknown_again(nf4_plugin):
    assert "nf4-test" in formats()
    plugins.get_plugin_manager().unregister(nf4_plugin)
    with pytest.raises(ValueError, match="unknown grid 'nf4-test'"):
        get_format("nf4-test")
    plugins.get_plugin_manager().register(nf4_plugin, name="nf4-test-plugin")


class FakeEntryPoint:
    def __init__(self, name, obj=None, exc=None):
        self.name, self.value, self._obj, self._exc = name, f"fake_module:{name}", obj, exc

    def load(self):
        if self._exc:
            raise self._exc
        return self._obj


@pytest.fixture
def fresh_manager(monkeypatch):
    manager.reset_plugin_manager()
    yield monkeypatch
    manager.reset_plugin_manager()


def test_entry_points_are_discovered_and_a_broken_one_is_reported_by_name(fresh_manager):
    good = make_plugin()
    fresh_manager.setattr(manager, "_entry_points", lambda: [
        FakeEntryPoint("nf4", good), FakeEntryPoint("broken-plugin", exc=ImportError("no module named zzz"))])
    with pytest.warns(RuntimeWarning, match="'broken-plugin'.*failed to load.*no module named zzz"):
        plugins.load_plugins()
    assert "nf4-test" in formats() and "piecewise" in formats()


def test_environment_switch_disables_third_party_plugins(fresh_manager):
    fresh_manager.setattr(manager, "_entry_points", lambda: [FakeEntryPoint("nf4", make_plugin())])
    fresh_manager.setenv("PIECEWISE_QUANT_DISABLE_PLUGINS", "1")
    assert "nf4-test" not in formats()
    assert "piecewise" in formats()  # built-ins still load


def test_allow_list_loads_only_named_plugins(fresh_manager):
    fresh_manager.setattr(manager, "_entry_points", lambda: [
        FakeEntryPoint("nf4", make_plugin()), FakeEntryPoint("other", exc=RuntimeError("must not load"))])
    fresh_manager.setenv("PIECEWISE_QUANT_PLUGINS", "nf4")
    assert "nf4-test" in formats()


def test_real_entry_point_group_is_queried():
    # the manager reads the real metadata group (empty here unless a plugin is installed)
    assert all(ep.group == "piecewise_quant" for ep in importlib.metadata.entry_points(group="piecewise_quant"))


def test_two_plugins_claiming_one_format_name_keep_the_first(nf4_plugin):
    class Other(NF4Format):
        pass

    dup = types.SimpleNamespace()

    @plugins.hookimpl
    def piecewise_quant_register_formats(register):
        register(Other())

    dup.piecewise_quant_register_formats = piecewise_quant_register_formats
    pm = plugins.get_plugin_manager()
    pm.register(dup, name="dup")
    try:
        with pytest.warns(RuntimeWarning, match="'dup' was skipped.*two plugins register a format named 'nf4-test'"):
            assert type(formats()["nf4-test"]) is NF4Format
    finally:
        pm.unregister(dup)


def test_format_lookups_run_each_hook_once_until_the_plugins_change():
    calls = []
    plugin = types.SimpleNamespace()

    @plugins.hookimpl
    def piecewise_quant_register_formats(register):
        calls.append(1)
        register(NF4Format())

    plugin.piecewise_quant_register_formats = piecewise_quant_register_formats
    pm = plugins.get_plugin_manager()
    pm.register(plugin, name="counting-plugin")
    try:
        for _ in range(25):
            assert get_format("nf4-test").name == "nf4-test"
        assert len(calls) == 1
    finally:
        pm.unregister(plugin)
    assert "nf4-test" not in formats()  # an unregistered plugin is forgotten at once
