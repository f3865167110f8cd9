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
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook
from torch import nn

from piecewise_quant.config import LayerSpec
from piecewise_quant.formats.base import WeightFormat
from piecewise_quant.qlinear import QuantLinear

__all__ = ["DiffusionQuantLinear", "TimestepState", "TimestepHook", "HOOK_NAME", "install_timestep_hook", "remove_timestep_hook", "group_quantize"]

HOOK_NAME = "piecewise_quant_timestep"


def _act_qmax(act_bits: int, act_format: str) -> float:
    return float((1 << (act_bits - 1)) - 1) if act_format == "int" else 448.0


def group_quantize(x: torch.Tensor, group_size: int, act_format: str, clip_ratio: float, topk: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` with one dynamic scale per token and per ``group_size`` channels."""
    from piecewise_quant.kernels import ops

    c = x.shape[-1]
    xg = x.reshape(*x.shape[:-1], c // group_size, group_size)
    return ops.quantize_activation(xg, act_format, "dynamic_per_token", None, float(clip_ratio), int(topk)).reshape(x.shape)


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


@dataclass
class ActObservation:
    """What a layer saw while calibrating: per timestep, the magnitudes that set the scale; per call,
    the largest magnitude of each sample (for statistics per guidance branch)."""

    per_timestep: dict[float | None, list[torch.Tensor]] = field(default_factory=dict)
    per_branch: dict[str, float] = field(default_factory=dict)


class DiffusionQuantLinear(QuantLinear):
    """A :class:`~piecewise_quant.QuantLinear` with per-timestep static or group-wise dynamic
    activation quantization (see the module docstring). Without either it behaves exactly like
    ``QuantLinear``."""

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
        super().__init__(layer, fmt, bias, device=device, dtype=dtype)
        spec = layer.spec
        dynamic = spec.act_bits is not None and spec.act_mode == "dynamic_per_token"
        static = spec.act_bits is not None and spec.act_mode == "static_per_tensor"
        self.act_group_size = act_group_size if dynamic else None
        if self.act_group_size is not None and layer.in_features % self.act_group_size:
            raise ValueError(
                f"layer {layer.name!r}: act_group_size={self.act_group_size} does not divide its in_features="
                f"{layer.in_features}; choose a divisor, or give this layer act_mode='static_per_tensor' or "
                "act_bits=None (overrides)"
            )
        if static and per_timestep:
            self.register_buffer("act_scales_t", torch.zeros(n_timesteps, dtype=torch.float32, device=device))
        else:
            self.act_scales_t = None
        self.timestep_state: TimestepState | None = None
        self._obs: ActObservation | None = None

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
        return q

    # ---- forward ----------------------------------------------------------------------------------

    def _timestep_index(self) -> int:
        state = self.timestep_state
        if state is None or state.index is None:
            raise RuntimeError(
                f"layer {self.layer_spec.name!r} has per-timestep activation scales but no current timestep: call it "
                "through its denoiser's forward with a timestep (the piecewise-quant timestep hook sets it), not on its own"
            )
        return state.index

    def _act_args(self) -> tuple:
        spec = self.spec
        if self.act_group_size is not None:
            return (None, "none", "dynamic_per_token", 1.0, 0)
        if self.act_scales_t is not None:
            scale = self.act_scales_t[self._timestep_index()]
            if not bool(scale > 0):
                raise RuntimeError(
                    f"layer {self.layer_spec.name!r} has no calibrated per-timestep activation scale; run "
                    "pipe.enable_quant(...) with calibration prompts"
                )
            act_format = f"int{spec.act_bits}" if spec.act_format == "int" else "fp8_e4m3"
            return (scale, act_format, "static_per_tensor", 1.0, 0)
        return super()._act_args()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.act_group_size
        if g is not None and not self._observing:
            spec = self.spec
            act_format = f"int{spec.act_bits}" if spec.act_format == "int" else "fp8_e4m3"
            x = group_quantize(x, g, act_format, spec.act_clip_ratio, spec.act_topk)
        return super().forward(x)

    # ---- calibration ------------------------------------------------------------------------------

    def start_observing(self) -> None:
        self._observing = True
        self._obs = ActObservation()

    def _observe(self, x: torch.Tensor) -> None:
        obs = self._obs
        t = self.timestep_state.value if self.timestep_state is not None else None
        mag = x.detach().abs().to(torch.float32)
        flat = mag.reshape(-1)
        k = self.spec.act_topk
        vals = flat.topk(min(k + 1, flat.numel())).values if k > 0 else flat.amax().reshape(1)
        obs.per_timestep.setdefault(t, []).append(vals)
        state = self.timestep_state
        n = state.n_prompts if state is not None else None
        if mag.dim() >= 2 and n and state.branches and mag.shape[0] == len(state.branches) * n:
            # one call holds every guidance branch, in the pipeline's batch order
            per_sample = mag.reshape(mag.shape[0], -1).amax(dim=1)
            for b, chunk in zip(state.branches, per_sample.split(n)):
                obs.per_branch[b] = max(obs.per_branch.get(b, 0.0), float(chunk.max()))
        else:
            obs.per_branch["all"] = max(obs.per_branch.get("all", 0.0), float(vals.max()))

    def _scale_from(self, values: list[torch.Tensor]) -> float:
        allv = torch.cat(values)
        if not bool(torch.isfinite(allv).all()):
            raise ValueError(f"layer {self.layer_spec.name!r}: calibration activations contain NaN or Inf")
        spec = self.spec
        k = min(spec.act_topk + 1, allv.numel())
        rng = float(allv.topk(k).values[-1]) * spec.act_clip_ratio
        qmax = _act_qmax(spec.act_bits, spec.act_format)
        return rng / qmax if rng > 0 else 1.0 / qmax

    def finish_observing(self, timesteps: tuple[float, ...] = ()) -> ActObservation:
        """Set ``act_scale`` from everything observed (every timestep, both branches) and, with
        per-timestep scales, ``act_scales_t[i]`` from what was observed at ``timesteps[i]``.
        Returns the observation (for the calibration report)."""
        self._observing = False
        obs, self._obs = self._obs, None
        if self.act_scale is None:
            return obs or ActObservation()
        if obs is None or not obs.per_timestep:
            raise RuntimeError(
                f"layer {self.layer_spec.name!r} saw no calibration activations; its activation scale is unknown"
            )
        self.act_scale.fill_(self._scale_from([v for vs in obs.per_timestep.values() for v in vs]))
        if self.act_scales_t is not None:
            if len(timesteps) != self.act_scales_t.numel():
                self.act_scales_t = torch.zeros(len(timesteps), dtype=torch.float32, device=self.act_scale.device)
            for i, t in enumerate(timesteps):
                vals = obs.per_timestep.get(t)
                if not vals:
                    raise RuntimeError(f"layer {self.layer_spec.name!r} saw no activations at timestep {t}")
                self.act_scales_t[i] = self._scale_from(vals)
        return obs

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.act_group_size is not None:
            text += f", act_group_size={self.act_group_size}"
        if self.act_scales_t is not None:
            text += f", act_scales=per_timestep({self.act_scales_t.numel()})"
        return text


def _finish_registration() -> None:
    from . import _finish_pending_registration

    _finish_pending_registration()


_finish_registration()
