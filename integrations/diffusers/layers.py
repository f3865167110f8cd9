"""The quantized layer of a diffusion denoiser and the timestep it runs at.

:class:`DiffusionQuantLinear` is a :class:`piecewise_quant.QuantLinear` (same packed tensors, same
kernel op, same checkpoint names) with two activation modes the core layer does not have:

* **per-timestep static scales** (``act_scales_t``, one scale per calibrated timestep): the layer
  reads the current timestep from a :class:`TimestepState` shared with its denoiser, which a
  :class:`TimestepHook` on the denoiser's ``forward`` sets from the ``timestep`` argument;
* **dynamic group-wise activations** (``act_group_size``): each token's input is quantized in groups
  of channels, each group with its own scale (the kernel's per-token quantization applied to the
  ``(..., C // G, G)`` view), before the weight-only matmul.

While calibrating (``start_observing``) the layer runs with float activations and records, for
every call, the largest magnitudes of its input under the current timestep and per sample of the
batch, so scales can be set over all timesteps and both guidance branches, or per timestep.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook
from torch import nn

from piecewise_quant.activation import ActObservation
from piecewise_quant.args import ActArgs
from piecewise_quant.config import LayerSpec
from piecewise_quant.formats.base import WeightFormat
from piecewise_quant.qlinear import QuantLinear

__all__ = [
    "DiffusionQuantLinear", "TimestepState", "TimestepHook", "HOOK_NAME", "install_timestep_hook", "remove_timestep_hook",
    "group_quantize", "ActObservation",
]

HOOK_NAME = "piecewise_quant_timestep"


def group_quantize(x: torch.Tensor, group_size: int, act_format: str, clip_ratio: float, topk: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` with one dynamic scale per token and per ``group_size`` channels
    (``act_format``: the kernels' name, e.g. ``"int8"``)."""
    from piecewise_quant.kernels.ops import ActOperand, quantize_input

    c = x.shape[-1]
    xg = x.reshape(*x.shape[:-1], c // group_size, group_size)
    return quantize_input(xg, ActOperand(None, act_format, "dynamic_per_token", clip_ratio, topk)).reshape(x.shape)


class TimestepState:
    """The timestep a denoiser is currently called at, shared by its quantized layers.

    ``timesteps`` are the calibrated timesteps (per-timestep scales are stored in this order);
    ``index`` is the calibrated timestep nearest to the current one, ``None`` outside a call."""

    def __init__(self, timesteps: tuple[float, ...] = ()) -> None:
        self.timesteps: tuple[float, ...] = tuple(timesteps)
        self.value: float | None = None
        self.index: int | None = None
        self.calls: list[tuple[float | None, int]] = []  # (timestep, batch size) of each call while recording
        self.recording = False
        # set by the calibration runner: prompts per pipeline call and the guidance branches in batch order
        self.n_prompts: int | None = None
        self.branches: tuple[str, ...] = ()

    def set(self, timestep: Any, batch: int | None) -> None:
        if timestep is None:
            self.value = None
        else:
            t = torch.as_tensor(timestep).detach().reshape(-1).to(torch.float64)
            if t.numel() == 0:
                self.value = None
            else:
                if t.numel() > 1 and not bool((t == t[0]).all()):
                    raise ValueError(
                        "piecewise-quant per-timestep activation scales need one timestep per denoiser call; this call "
                        f"mixes timesteps {sorted(set(t.tolist()))[:4]}..."
                    )
                self.value = float(t[0])
        self.index = None
        if self.value is not None and self.timesteps:
            ref = torch.tensor(self.timesteps, dtype=torch.float64)
            self.index = int((ref - self.value).abs().argmin())
        if self.recording:
            self.calls.append((self.value, int(batch or 0)))

    def clear(self) -> None:
        self.value = None
        self.index = None


@functools.lru_cache(maxsize=64)
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _timestep_argument(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    if "timestep" in kwargs:
        return kwargs["timestep"]
    try:
        bound = _forward_signature(type(module)).bind_partial(module, *args, **kwargs)
    except TypeError:
        return None
    return bound.arguments.get("timestep")


def _batch_of(args: tuple, kwargs: dict) -> int | None:
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None


class TimestepHook(ModelHook):
    """A diffusers hook on the denoiser: publishes each call's ``timestep`` to the layers."""

    def __init__(self, state: TimestepState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any):
        self.state.set(_timestep_argument(module, args, kwargs), _batch_of(args, kwargs))
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.state.clear()
        return output


def install_timestep_hook(model: nn.Module, state: TimestepState) -> None:
    """Hook ``model`` (idempotent: an existing piecewise hook is replaced) and point its layers at ``state``."""
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
    registry.register_hook(TimestepHook(state), HOOK_NAME)
    for m in model.modules():
        if isinstance(m, DiffusionQuantLinear):
            m.timestep_state = state
    model._piecewise_quant_timestep_state = state


def remove_timestep_hook(model: nn.Module) -> None:
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
    if hasattr(model, "_piecewise_quant_timestep_state"):
        del model._piecewise_quant_timestep_state


class DiffusionQuantLinear(QuantLinear):
    """A :class:`~piecewise_quant.QuantLinear` whose activation quantizer uses the ``timestep``
    (per-timestep static scales) or ``group`` (group-wise dynamic) strategy (see the module
    docstring). Without either it behaves exactly like ``QuantLinear``."""

    def __init__(
        self,
        layer: LayerSpec,
        fmt: WeightFormat,
        bias: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        act_group_size: int | None = None,
        per_timestep: bool = False,
        n_timesteps: int = 0,
    ) -> None:
        act = _act_args(layer, act_group_size, per_timestep)
        super().__init__(layer, fmt, bias, device=device, dtype=dtype, act_args=act)
        if act is not None and act.strategy == "timestep":
            self.register_buffer("act_scales_t", torch.zeros(n_timesteps, dtype=torch.float32, device=device))
        else:
            self.act_scales_t = None
        # MixDQ's BOS-aware path (see .bos): token 0's float input and output, set by enable_quant(bos_aware=True)
        self.register_buffer("bos_input", None)
        self.register_buffer("bos_output", None)

    def set_bos_row(self, bos_input: torch.Tensor, bos_output: torch.Tensor) -> None:
        """Keep token 0 out of quantization whenever the input's row 0 is ``bos_input``: its output
        is then ``bos_output`` (the float layer's, computed before quantization); see :mod:`.bos`."""
        if tuple(bos_input.shape) != (self.in_features,) or tuple(bos_output.shape) != (self.out_features,):
            raise ValueError(f"layer {self.layer_spec.name!r}: BOS rows must have shapes ({self.in_features},) and "
                             f"({self.out_features},); got {list(bos_input.shape)} and {list(bos_output.shape)}")
        self._buffers["bos_input"] = bos_input.detach().to(torch.float32).clone()
        self._buffers["bos_output"] = bos_output.detach().to(torch.float32).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bos_input is None:
            return super().forward(x)
        from .bos import bos_forward

        return bos_forward(self, x, super().forward)

    @property
    def act_group_size(self) -> int | None:
        aq = self.act_quantizer
        return aq.args.group_size if aq is not None else None

    @property
    def timestep_state(self) -> TimestepState | None:
        """The clock the per-timestep scales are read by (set by :func:`install_timestep_hook`)."""
        return self.act_quantizer.clock if self.act_quantizer is not None else None

    @timestep_state.setter
    def timestep_state(self, state: TimestepState | None) -> None:
        if self.act_quantizer is not None:
            self.act_quantizer.clock = state

    @classmethod
    def build(
        cls, layer: LayerSpec, fmt: WeightFormat, linear: nn.Linear, *, act_group_size: int | None = None,
        per_timestep: bool = False, n_timesteps: int = 0,
    ) -> "DiffusionQuantLinear":
        """Quantize ``linear`` (keeps its bias, device and dtype)."""
        weight = linear.weight.detach()
        q = cls(layer, fmt, linear.bias is not None, device=weight.device, dtype=weight.dtype,
                act_group_size=act_group_size, per_timestep=per_timestep, n_timesteps=n_timesteps)
        q.load_quantized(fmt.quantize(weight, layer))
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        q.take_balance_from(linear)
        return q

    @classmethod
    def from_quant_linear(
        cls, src: QuantLinear, layer: LayerSpec, *, act_group_size: int | None = None, per_timestep: bool = False,
        n_timesteps: int = 0,
    ) -> "DiffusionQuantLinear":
        """The same packed weight as ``src`` (e.g. produced by the calibration engine) under ``layer``."""
        t = src.quantized_tensors()
        dev = next(iter(t.values())).device
        q = cls(layer, src.fmt, src.bias is not None, device=dev, dtype=src.compute_dtype,
                act_group_size=act_group_size, per_timestep=per_timestep, n_timesteps=n_timesteps)
        q.load_quantized({k: v.clone() for k, v in t.items()})
        if src.bias is not None:
            q.bias.data.copy_(src.bias.detach())
        q.take_balance_from(src)
        return q

    def finish_observing(self, timesteps: tuple[float, ...] = ()) -> ActObservation:
        """Set ``act_scale`` from everything observed (every timestep, both branches) and, with
        per-timestep scales, ``act_scales_t[i]`` from what was observed at ``timesteps[i]``.
        Returns the observation (for the calibration report)."""
        if self.act_quantizer is None:
            return ActObservation()
        return self.act_quantizer.finish(timesteps)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.act_group_size is not None:
            text += f", act_group_size={self.act_group_size}"
        if self.act_scales_t is not None:
            text += f", act_scales=per_timestep({self.act_scales_t.numel()})"
        if self.bos_input is not None:
            text += ", bos_aware"
        return text


def _act_args(layer: LayerSpec, act_group_size: int | None, per_timestep: bool) -> ActArgs | None:
    """The layer's activation scheme: group-wise when dynamic with ``act_group_size``, one scale
    per timestep when static with ``per_timestep``, else the spec's own."""
    act = ActArgs.from_spec(layer.spec)
    if act is None:
        return None
    if act.dynamic and act_group_size is not None:
        if layer.in_features % act_group_size:
            raise ValueError(
                f"layer {layer.name!r}: act_group_size={act_group_size} does not divide its in_features="
                f"{layer.in_features}; choose a divisor, or give this layer act_mode='static_per_tensor' or "
                "act_bits=None (overrides)"
            )
        return ActArgs.from_spec(layer.spec, strategy="group", group_size=act_group_size)
    if not act.dynamic and per_timestep:
        return ActArgs.from_spec(layer.spec, strategy="timestep")
    return act


def _finish_registration() -> None:
    from . import _finish_pending_registration

    _finish_pending_registration()


_finish_registration()
