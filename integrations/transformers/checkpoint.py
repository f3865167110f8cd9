"""Checkpoint checks used by the transformers quantizer (they live in the core, shared with vLLM)."""

from piecewise_quant.checkpoint import (  # noqa: F401
    MAX_LISTED,
    SAFETENSORS_DTYPES,
    CheckpointMismatchError,
    check_checkpoint,
    expected_tensors,
    read_headers,
)

__all__ = ["SAFETENSORS_DTYPES", "read_headers", "expected_tensors", "check_checkpoint", "CheckpointMismatchError"]
