"""Refuse to load a piecewise checkpoint as a float model.

transformers loads a checkpoint whose ``quantization_config`` it does not recognise (removed from
``config.json``, ``quant_method`` spelt ``"Piecewise"``, or piecewise-quant not registered because
``PIECEWISE_QUANT_NO_AUTOLOAD=1`` is set) as a float model: the packed tensors are dropped as
unexpected and every quantized layer is initialised at random. The model runs and is wrong.

Every piecewise checkpoint carries a marker in its safetensors metadata
(:func:`piecewise_quant.checkpoint.marker_metadata`). :func:`install_load_guard` wraps
``PreTrainedModel.from_pretrained``: before anything is loaded from a local directory, it reads the
marker (the header only) and ``config.json`` and raises :class:`CheckpointMismatchError` with the
reason when transformers would not dispatch the load to piecewise-quant. The import hook installs
the guard in every interpreter that imports transformers, whatever ``PIECEWISE_QUANT_NO_AUTOLOAD``
says; only an interpreter that never runs piecewise-quant's code (``python -S``, or a machine
without the package) loads such a checkpoint unguarded (docs/reliability.md).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from piecewise_quant.checkpoint import CheckpointMismatchError, read_marker
from piecewise_quant.config import QUANT_METHOD

__all__ = ["install_load_guard", "check_not_float_load"]


def _config_dict(directory: Path, config: Any) -> dict | None:
    if config is not None and not isinstance(config, (str, os.PathLike)):
        qc = getattr(config, "quantization_config", None)
        if qc is not None and not isinstance(qc, dict):
            qc = qc.to_dict() if callable(getattr(qc, "to_dict", None)) else None
        return {"quantization_config": qc} if qc is not None else {}
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # transformers reports an unreadable config.json itself


def check_not_float_load(pretrained: Any, kwargs: dict) -> None:
    """Raise when ``from_pretrained(pretrained, **kwargs)`` would load a marked piecewise
    checkpoint (or one whose ``quant_method`` is a case variant of ``"piecewise"``) as float."""
    if not isinstance(pretrained, (str, os.PathLike)):
        return
    directory = Path(pretrained) / (kwargs.get("subfolder") or "")
    if not directory.is_dir():
        return  # hub ids: not checked before loading (docs/reliability.md)
    cfg = _config_dict(directory, kwargs.get("config"))
    if cfg is None:
        return
    qc = cfg.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if isinstance(method, str) and method != QUANT_METHOD and method.lower() == QUANT_METHOD:
        raise CheckpointMismatchError(
            f"piecewise-quant: {directory / 'config.json'} has quant_method {method!r}; transformers matches method "
            f"names exactly and would load the quantized layers as random float weights. Edit config.json to write "
            f"\"{QUANT_METHOD}\""
        )
    files = sorted(directory.glob("*.safetensors"))
    if not files or read_marker(files[:1]) is None:
        return
    if method == QUANT_METHOD:
        from . import is_registered

        if is_registered():
            return
        reason = (
            "piecewise-quant is not registered with transformers in this process (PIECEWISE_QUANT_NO_AUTOLOAD is set, "
            "or the import hook did not run); call piecewise_quant.integrations.transformers.register_with_transformers() "
            "first"
        )
    elif qc is None:
        reason = ("config.json has no quantization_config (it was removed or replaced); restore the config.json saved "
                  "with these weights")
    else:
        reason = (f"config.json's quantization_config has quant_method {method!r}; restore the config.json saved with "
                  "these weights")
    raise CheckpointMismatchError(
        f"piecewise-quant: {directory} holds a piecewise-quant checkpoint (marker in {files[0].name}), but transformers "
        f"would load it as a float model with randomly initialised layers: {reason}"
    )


def install_load_guard() -> None:
    """Wrap ``PreTrainedModel.from_pretrained`` with :func:`check_not_float_load` (idempotent)."""
    from transformers.modeling_utils import PreTrainedModel

    current = PreTrainedModel.__dict__.get("from_pretrained")
    func = getattr(current, "__func__", None)
    if func is None or getattr(func, "_piecewise_guard", False):
        return

    @functools.wraps(func)
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        check_not_float_load(pretrained_model_name_or_path, kwargs)
        return func(cls, pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained._piecewise_guard = True
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
