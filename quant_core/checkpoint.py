"""Check a pre-quantized checkpoint against the layers its ``quantization_config`` plans, before
any weight is loaded.

transformers only *logs* missing and unexpected keys, does not compare shapes when a quantizer is
active, and casts floating tensors to the dtype of the (meta) buffer they load into. A piecewise
checkpoint whose tensors do not fit its config would therefore load as a silently wrong or
randomly initialised layer. Reading the safetensors headers (cheap: no tensor data is read) lets us
refuse it with an error that names each offending tensor. The transformers quantizer and the vLLM
linear method both run these checks.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import torch

from .errors import CheckpointMismatchError

__all__ = [
    "SAFETENSORS_DTYPES", "read_headers", "expected_tensors", "check_checkpoint", "CheckpointMismatchError",
    "MARKER_FORMAT", "MARKER_VERSION", "MARKER_PLAN", "plan_hash", "marker_metadata", "read_marker",
    "check_marker", "check_finite_tensors",
]

# Safetensors metadata every piecewise checkpoint carries (strings, as safetensors requires): a
# float loader can tell the file holds packed codes, and a loader can tell the plan in config.json
# is the one the tensors were written with.
MARKER_FORMAT = "piecewise_quant.format"
MARKER_VERSION = "piecewise_quant.schema_version"
MARKER_PLAN = "piecewise_quant.plan_sha256"
FORMAT_VALUE = "piecewise-quant"

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"),
                     ("uint64", "U64")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[getattr(torch, _name)] = _code

MAX_LISTED = 12




def _open(path: Any):
    """``safe_open`` with the reason a file cannot be read spelled out (permissions, truncation)."""
    import os

    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        raise CheckpointMismatchError(f"piecewise-quant: checkpoint file {path} does not exist")
    if not os.access(path, os.R_OK):
        raise CheckpointMismatchError(
            f"piecewise-quant: checkpoint file {path} is not readable by this user (permission denied; mode "
            f"{oct(os.stat(path).st_mode & 0o777)}): ask its owner to make it readable (chmod a+r)"
        )
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointMismatchError(
            f"piecewise-quant: checkpoint file {path} is not a readable safetensors file ({exc}); it may be truncated "
            "by an interrupted save: save it again"
        ) from None


def read_headers(files: Iterable[str]) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """``{key: (shape, safetensors dtype code, file)}`` for every tensor of the safetensors ``files``."""
    out: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for path in files:
        with _open(path) as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                out[key] = (tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype()), str(path))
    return out


def plan_hash(config: Any) -> str:
    """SHA-256 of the quantization plan: the config's canonical JSON without the ``calibration``
    record (which only says how the weights were chosen, not how they are stored)."""
    d = dict(config.to_dict())
    d.pop("calibration", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def marker_metadata(config: Any) -> dict[str, str]:
    """The safetensors metadata that marks a piecewise checkpoint written with ``config``."""
    from .config import SCHEMA_VERSION

    return {MARKER_FORMAT: FORMAT_VALUE, MARKER_VERSION: str(SCHEMA_VERSION), MARKER_PLAN: plan_hash(config)}


def read_marker(files: Iterable[Any]) -> dict[str, str] | None:
    """The piecewise marker of the first of ``files`` that carries one (only headers are read)."""
    for path in files:
        with _open(str(path)) as fh:
            meta = fh.metadata() or {}
        if meta.get(MARKER_FORMAT) == FORMAT_VALUE:
            return {k: v for k, v in meta.items() if k.startswith("piecewise_quant.")}
    return None


def check_marker(files: Iterable[Any], config: Any, where: str = "") -> bool:
    """Raise :class:`CheckpointMismatchError` when ``files`` carry a marker whose plan hash differs
    from ``config``'s (the ``quantization_config`` was edited after saving, or config.json belongs
    to other weights). Returns whether a marker was found (checkpoints written before 0.1.0's
    marker have none and are checked by their tensors only)."""
    files = list(files)
    marker = read_marker(files)
    if marker is None:
        return False
    from .config import SCHEMA_VERSION

    try:
        version = int(marker.get(MARKER_VERSION, "0"))
    except ValueError:
        version = -1
    if version > SCHEMA_VERSION:
        raise CheckpointMismatchError(
            f"piecewise-quant: {where or files[0]} was written with schema version {version}, newer than the "
            f"{SCHEMA_VERSION} this piecewise-quant reads; upgrade piecewise-quant"
        )
    if marker.get(MARKER_PLAN) != plan_hash(config):
        raise CheckpointMismatchError(
            f"piecewise-quant: the quantization_config of {where or files[0]} is not the one its tensors were written "
            "with (the plan's SHA-256 stored in the safetensors metadata differs): config.json was edited after "
            "saving, or belongs to other weights. Restore the config.json saved with these weights, or quantize "
            "the float model again"
        )
    return True


def check_finite_tensors(layer_name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse NaN or Inf in a quantized layer's floating tensors (scales, activation scales,
    bias): every output of the layer would be NaN, or silently wrong."""
    for name, t in tensors.items():
        if t is not None and not t.is_meta and name == "scales" and t.dtype == torch.uint8 and bool((t == 255).any()):
            raise CheckpointMismatchError(  # MXFP4's E8M0 scales: 255 encodes NaN
                f"piecewise-quant: tensor {layer_name + '.' + name!r} holds {int((t == 255).sum())} E8M0 scale(s) of 255 "
                "(NaN); the checkpoint is corrupt or was tampered with: quantize the float model again"
            )
        if t is None or t.is_meta or not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t.float()).all()):
            bad = int((~torch.isfinite(t.float())).sum())
            raise CheckpointMismatchError(
                f"piecewise-quant: tensor {layer_name + '.' + name!r} holds {bad} NaN/Inf value(s); the checkpoint is "
                "corrupt or was tampered with: quantize the float model again"
            )


def expected_tensors(name: str, layer: Any, fmt: Any, has_bias: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Every tensor a quantized layer ``name`` loads: ``{full key: (shape, dtype or None = any float)}``."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {
        f"{name}.{t}": (tuple(lay.shape), lay.dtype) for t, lay in fmt.layout(layer).items()
    }
    if has_bias:
        out[f"{name}.bias"] = ((layer.out_features,), None)
    spec = layer.spec
    if spec.act_bits is not None and spec.act_mode == "static_per_tensor":
        out[f"{name}.act_scale"] = ((), torch.float32)
    if getattr(layer.rotation, "balance", False):
        out[f"{name}.balance_scale"] = ((layer.in_features,), torch.float16)
    return out


def _describe(layer: Any) -> str:
    spec = layer.spec
    gs = {-1: "tensor"}.get(layer.group_size, layer.group_size)
    lr = getattr(spec, "low_rank", None)
    return f"grid={spec.grid!r}, bits={spec.bits}, group_size={gs}" + (f", low_rank={lr!r}" if lr is not None else "")


def check_checkpoint(
    expected: dict[str, tuple[dict[str, tuple[tuple[int, ...], torch.dtype | None]], Any]],
    headers: dict[str, tuple[tuple[int, ...], str, str]],
    prefix: str = "",
) -> None:
    """Raise :class:`CheckpointMismatchError` listing every expected tensor that is missing, or has
    the wrong shape or dtype, in ``headers``.

    ``expected`` is ``{layer name: ({full key: (shape, dtype)}, layer spec)}`` in model key space;
    a checkpoint key may carry or lack the model's ``base_model_prefix`` (``prefix``)."""

    def lookup(key: str):
        candidates = [key]
        if prefix:
            candidates += [f"{prefix}.{key}", key[len(prefix) + 1 :] if key.startswith(prefix + ".") else None]
        for cand in candidates:
            if cand is not None and cand in headers:
                return cand, headers[cand]
        return None, None

    problems: list[str] = []
    for layer_name, (tensors, layer) in expected.items():
        for key, (shape, dtype) in tensors.items():
            found_key, info = lookup(key)
            if info is None:
                hint = ""
                wkey, winfo = lookup(f"{layer_name}.weight")
                if winfo is not None:
                    hint = f"; the checkpoint has a float {wkey!r} instead (saved without quantization?)"
                problems.append(
                    f"tensor {key!r} is missing (layer {layer_name!r} is quantized with {_describe(layer)} by the "
                    f"quantization_config{hint})"
                )
                continue
            got_shape, got_dtype, _ = info
            if got_shape != shape:
                problems.append(
                    f"tensor {found_key!r} has shape {list(got_shape)}, expected {list(shape)} for layer {layer_name!r} "
                    f"({_describe(layer)})"
                )
            if dtype is not None:
                want = SAFETENSORS_DTYPES.get(dtype)
                if want is not None and got_dtype != want:
                    problems.append(
                        f"tensor {found_key!r} has dtype {got_dtype}, expected {want} ({dtype}) for layer "
                        f"{layer_name!r} ({_describe(layer)})"
                    )
            elif not got_dtype.startswith(("F", "BF")):
                problems.append(f"tensor {found_key!r} has dtype {got_dtype}, expected a floating-point dtype")
    if problems:
        listed = problems[:MAX_LISTED]
        more = len(problems) - len(listed)
        files = sorted({f for _, _, f in headers.values()})
        where = files[0] if len(files) == 1 else f"{len(files)} safetensors files"
        raise CheckpointMismatchError(
            f"piecewise-quant: the checkpoint ({where}) does not match its quantization_config "
            f"({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n  - "
            + "\n  - ".join(listed)
            + (f"\n  ... and {more} more" if more else "")
        )
