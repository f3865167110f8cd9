"""Saving is all or nothing: a crash, Ctrl-C or a full disk during a save leaves the previous
checkpoint as it was; --overwrite leaves no stale file of an older checkpoint."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from torch import nn

import piecewise_quant as pq
from piecewise_quant import serialization
from piecewise_quant.checkpoint import CheckpointMismatchError


def _quantized(bits=4, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    return pq.quantize(model, pq.PiecewiseQuantConfig(bits=bits, group_size=32, observer="minmax", modules_to_not_convert=[]),
                       progress=False)


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _no_temporaries(parent):
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


def test_full_disk_during_save_quantized_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    pq.save_quantized(_quantized(bits=4), out)
    (out / "README.md").write_text("mine")
    before = _snapshot(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serialization, "save_file", full)
    with pytest.raises(OSError, match="no space left on the device.*previous contents of .* are unchanged"):
        pq.save_quantized(_quantized(bits=3), out)
    assert _snapshot(out) == before and _no_temporaries(tmp_path)
    monkeypatch.undo()
    reloaded = pq.load_quantized(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)), out)
    assert reloaded[0].spec.bits == 4


def test_save_quantized_marks_the_weights_and_load_refuses_an_edited_config(tmp_path):
    out = tmp_path / "ckpt"
    pq.save_quantized(_quantized(), out)
    cfg = json.loads((out / "quantization_config.json").read_text())
    cfg["bits"] = 3
    (out / "quantization_config.json").write_text(json.dumps(cfg))
    fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    with pytest.raises(CheckpointMismatchError, match="not the one its tensors were written with"):
        pq.load_quantized(fresh, out)
    assert type(fresh[0]) is nn.Linear


def test_load_quantized_refuses_nan_scales_and_leaves_the_float_model(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path / "ckpt"
    pq.save_quantized(_quantized(), out)
    f = out / "model.safetensors"
    with safe_open(str(f), framework="pt") as fh:
        meta = fh.metadata()
    state = load_file(str(f))
    state["2.scales"][0, 0] = float("inf")
    save_file(state, str(f), metadata=meta)
    fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    with pytest.raises(CheckpointMismatchError, match="'2.scales' holds 1 NaN/Inf"):
        pq.load_quantized(fresh, out)
    assert all(type(m) is not pq.QuantLinear for m in fresh)


class _Saver:
    """A model whose save_pretrained writes a shard, then fails like a crashing process."""

    def __init__(self, exc):
        self.exc = exc

    def save_pretrained(self, directory, **kwargs):
        (directory / "config.json").write_text("{}")
        (directory / "model.safetensors").write_bytes(b"half")
        raise self.exc


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("crash"), OSError(errno.ENOSPC, "No space left on device")])
def test_interrupted_save_pretrained_keeps_the_previous_checkpoint(tmp_path, exc):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    (out / "model.safetensors").write_bytes(b"old weights")
    before = _snapshot(out)
    with pytest.raises(type(exc)):
        pq.save_pretrained(_Saver(exc), out, overwrite=True)
    assert _snapshot(out) == before and _no_temporaries(tmp_path)


def test_overwrite_replaces_an_old_sharded_checkpoint_without_stale_files(tmp_path, tiny_llama_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ckpt"
    out.mkdir()
    for stale in ("model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (out / stale).write_text("old")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    with pytest.raises(ValueError, match="exists and is not empty"):
        pq.save_pretrained(model, out)
    pq.save_pretrained(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_output_checks_fail_before_any_work(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file, so no directory can be created under it"):
        pq.save_pretrained(_Saver(RuntimeError("must not run")), afile / "sub")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        pq.save_pretrained(_Saver(RuntimeError("must not run")), afile)
