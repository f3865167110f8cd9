"""Refusal from config.json alone, before any weight is read: a checkpoint none of whose schemes
the requested format can hold."""

from __future__ import annotations

from typing import Any

from .common import ExportError
from .ct import refusal
from .gguf_file import gguf_refusal


def _specs_in_config(config: Any) -> list[tuple[str, Any]]:
    out = [("the default scheme", config.default_spec)]
    for pattern, spec in config.override_schemes.items():
        if spec is not None:
            out.append((f"override {pattern!r}", spec))
    return out


def check_exportable_config(quantization_config: dict, fmt: str = "compressed-tensors") -> None:
    """Refuse, from config.json alone (before any weight is read), a checkpoint none of whose
    schemes can be exported to ``fmt``. Mixed plans are checked layer by layer after loading."""
    from piecewise_quant import PiecewiseQuantConfig

    config = PiecewiseQuantConfig.from_dict(quantization_config)
    online = [r for r in (config.rotation.rotations if config.rotation is not None else ()) if r not in ("R1", "R2")]
    if online:
        raise ExportError(
            f"cannot export to {'GGUF' if fmt == 'gguf' else 'compressed-tensors'}: the checkpoint uses online rotations "
            f"{online} (quantization_config.rotation), which other engines would skip and compute wrong outputs; "
            "re-quantize with only the fused rotations (rotation={'rotations': ['R1', 'R2']})"
        )
    if fmt == "gguf":
        def why_not(spec):
            gs = spec.group_size
            return gguf_refusal(spec, -1 if gs == "tensor" else (gs if isinstance(gs, int) else "channel"))
    else:
        why_not = refusal
    reasons = [(where, why_not(spec)) for where, spec in _specs_in_config(config)]
    if all(r is not None for _, r in reasons):
        where, why = reasons[0]
        raise ExportError(f"cannot export to {'GGUF' if fmt == 'gguf' else 'compressed-tensors'}: {why}")
