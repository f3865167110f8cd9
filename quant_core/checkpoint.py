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

from typing import Any, Iterable

import torch

__all__ = ["SAFETENSORS_DTYPES", "read_headers", "expected_tensors", "check_checkpoint", "CheckpointMismatchError"]

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
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[getattr(torch, _name)] = _code

MAX_LISTED = 12


class CheckpointMismatchError(ValueError):
    """A piecewise checkpoint's tensors do not match its ``quantization_config``."""


def read_headers(files: Iterable[str]) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """``{key: (shape, safetensors dtype code, file)}`` for every tensor of the safetensors ``files``."""
    from safetensors import safe_open

    out: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for path in files:
        with safe_open(path, framework="pt") as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                out[key] = (tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype()), str(path))
    return out


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
    return out


def _describe(layer: Any) -> str:
    spec = layer.spec
    gs = {-1: "tensor"}.get(layer.group_size, layer.group_size)
    return f"grid={spec.grid!r}, bits={spec.bits}, group_size={gs}"


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
