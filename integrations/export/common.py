"""What the compressed-tensors and GGUF writers share: the error they raise, the summary they
return, and the refusal of a model some of whose layers have no equivalent in the target format."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("compressed-tensors", "gguf")
SAFETENSORS_INDEX = "model.safetensors.index.json"


class ExportError(ValueError):
    """The checkpoint cannot be exported to the requested format (the message says why and what to do)."""


@dataclass
class ExportSummary:
    output: Path
    format: str
    layers: dict[str, str] = field(default_factory=dict)  # layer name -> compressed-tensors format
    float_linears: list[str] = field(default_factory=list)
    groups: dict[str, dict] = field(default_factory=dict)
    bytes_on_disk: int = 0
    notes: list[str] = field(default_factory=list)


def refuse_layers(layers: dict[str, Any], why_not: Callable[[Any], str | None], target: str, equivalent: str) -> None:
    """Raise one :class:`ExportError` listing, per reason, the layers ``why_not`` refuses (``None``:
    the layer exports), before anything is written; return when every layer exports."""
    refused: dict[str, list[str]] = {}  # reason -> layers
    for name, q in layers.items():
        why = why_not(q)
        if why is not None:
            refused.setdefault(why, []).append(name)
    if not refused:
        return
    n = sum(len(v) for v in refused.values())
    lines = [f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}: {why}"
             for why, names in refused.items()]
    raise ExportError(f"cannot export to {target}: {n} of {len(layers)} quantized layers have no {equivalent}:\n  - "
                      + "\n  - ".join(lines))


def local_tensor_names(q: Any) -> set[str]:
    """The checkpoint tensors of a quantized layer, relative to the layer (its ``act_scale`` included)."""
    names = set(q.quantized_tensors())
    names.add("act_scale")
    return names
