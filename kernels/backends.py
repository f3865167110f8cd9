"""Kernel backends: which implementation of the linear op runs for a device, format and shape.

The reference implementation is the fallback everywhere. Faster implementations (the built-in
Triton kernel on CUDA, or a third-party plugin's) register a :class:`KernelBackend`; the op picks
the highest-priority backend whose ``supports`` accepts the call. ``PIECEWISE_QUANT_KERNEL_BACKEND``
forces one backend by name (``reference`` disables all others), which is how tests compare them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

__all__ = ["KernelBackend", "register_backend", "unregister_backend", "select_backend", "registered_backends"]


class LinearFn(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        aux: torch.Tensor | None,
        bias: torch.Tensor | None,
        act_scale: torch.Tensor | None,
        weight_format: str,
        bits: int,
        group_size: int,
        in_features: int,
        act_format: str,
        act_mode: str,
        act_clip_ratio: float,
        act_topk: int,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class KernelBackend:
    """An implementation of ``piecewise_quant::linear`` for one device type.

    ``supports(weight_format, bits, group_size, dtype, act_format)`` says whether it can run a call;
    ``linear`` has the signature of :func:`piecewise_quant.kernels.reference.linear`.
    """

    name: str
    device_type: str
    supports: Callable[[str, int, int, torch.dtype, str], bool]
    linear: LinearFn
    priority: int = 0


_BACKENDS: dict[str, KernelBackend] = {}
ENV_FORCE = "PIECEWISE_QUANT_KERNEL_BACKEND"
# bumped on every (un)registration, so callers that cache a selection know when to redo it
_version = 0


def version() -> int:
    """A counter that changes whenever the set of registered backends changes."""
    return _version


def register_backend(backend: KernelBackend, replace: bool = False) -> None:
    """Register ``backend``; registering the same name twice needs ``replace=True``."""
    if backend.name == "reference":
        raise ValueError("the name 'reference' is reserved for the pure-torch implementation")
    if backend.name in _BACKENDS and not replace and _BACKENDS[backend.name] != backend:
        raise ValueError(f"a kernel backend named {backend.name!r} is already registered")
    global _version
    if _BACKENDS.get(backend.name) != backend:
        _version += 1
    _BACKENDS[backend.name] = backend


def unregister_backend(name: str) -> None:
    global _version
    if _BACKENDS.pop(name, None) is not None:
        _version += 1


def registered_backends() -> dict[str, KernelBackend]:
    return dict(_BACKENDS)


def allows(name: str) -> bool:
    """Whether backend ``name`` may run: it is registered, and ``PIECEWISE_QUANT_KERNEL_BACKEND`` is
    unset or names it (kernels outside :func:`select_backend`, such as the CPU outlier and low-rank
    adds, ask this before they run)."""
    return name in _BACKENDS and os.environ.get(ENV_FORCE, "").strip() in ("", name)


def select_backend(
    device_type: str, weight_format: str, bits: int, group_size: int, dtype: torch.dtype, act_format: str
) -> KernelBackend | None:
    """The backend to run, or ``None`` for the reference implementation."""
    forced = os.environ.get(ENV_FORCE, "").strip()
    if forced == "reference":
        return None
    candidates = [b for b in _BACKENDS.values() if b.device_type == device_type]
    if forced:
        candidates = [b for b in candidates if b.name == forced]
    for b in sorted(candidates, key=lambda b: -b.priority):
        if b.supports(weight_format, bits, group_size, dtype, act_format):
            return b
    return None
