"""The format plugin shown in docs/plugins.md works as the page says."""

from __future__ import annotations

import re
import types
from pathlib import Path

import torch

import piecewise_quant as pq
from piecewise_quant import plugins

DOC = (Path(__file__).resolve().parents[2] / "docs" / "plugins.md").read_text()


def test_documented_format_plugin_quantizes_and_round_trips(tmp_path):
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", DOC, flags=re.S) if "class Int8RowFormat" in b]
    namespace: dict = {}
    exec(compile(snippet, "docs/plugins.md", "exec"), namespace)
    plugin = types.SimpleNamespace(piecewise_quant_register_formats=namespace["piecewise_quant_register_formats"])
    pm = plugins.get_plugin_manager()
    pm.register(plugin, name="doc-int8-row")
    try:
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
    finally:
        pm.unregister(plugin)
