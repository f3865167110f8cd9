"""``ActQuantizer``: the activation-quantization component of a :class:`~piecewise_quant.QuantLinear`.

A layer with ``act_bits`` owns one. It turns the layer's :class:`~piecewise_quant.args.ActArgs`
into what the kernel op needs for each call, and it observes calibration inputs to set static
scales:

* ``token`` (dynamic): a scale per token, computed by the kernel;
* ``tensor`` (static): one scale, the layer's ``act_scale`` buffer, set by :meth:`finish`;
* ``group`` (dynamic): a scale per token and per ``group_size`` channels, applied to the input
  before a weight-only matmul;
* ``timestep`` (static): one scale per calibrated diffusion timestep (``act_scales_t``), chosen
  through a *clock* that says which timestep the model is being called at (diffusers' timestep
  hook provides it).

The scale tensors stay buffers of the layer (checkpoint names ``act_scale`` and ``act_scales_t``);
the quantizer reads and writes them through the layer's buffer dictionary, so ``.to()``,
``load_state_dict`` and ``deepcopy`` of the layer keep working as for any buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, MutableMapping, Protocol

import torch

from .args import ActArgs
from .kernels.ops import NO_ACT, ActOperand, quantize_input
from .token_mask import real_tokens

__all__ = ["ActQuantizer", "ActObservation", "TimestepClock"]


class TimestepClock(Protocol):
    """Where a ``timestep`` quantizer reads the current call's timestep (diffusers'
    ``TimestepState`` is one). ``value``: the timestep, ``index``: the nearest calibrated one;
    ``n_prompts``/``branches``: the guidance branches in batch order, while calibrating."""

    value: float | None
    index: int | None
    n_prompts: int | None
    branches: tuple[str, ...]


@dataclass
class ActObservation:
    """What a layer saw while calibrating: per timestep (``None`` outside diffusion), the
    magnitudes that set the scale; per guidance branch (or ``"all"``), the largest magnitude."""

    per_timestep: dict[float | None, list[torch.Tensor]] = field(default_factory=dict)
    per_branch: dict[str, float] = field(default_factory=dict)

    def values(self) -> list[torch.Tensor]:
        return [v for vs in self.per_timestep.values() for v in vs]


class ActQuantizer:
    """Quantizes one layer's input activations as its :class:`ActArgs` say (see the module docstring).

    Args:
        args: the activation scheme.
        layer_name: for error messages.
        buffers: the owning layer's buffer dictionary (``module._buffers``), where the static scales live.
    """

    def __init__(self, args: ActArgs, layer_name: str, buffers: MutableMapping[str, Any]) -> None:
        self.args = args
        self.layer_name = layer_name
        self._buffers = buffers
        self.clock: TimestepClock | None = None
        self._obs: ActObservation | None = None

    # ---- inference --------------------------------------------------------------------------------

    @property
    def observing(self) -> bool:
        return self._obs is not None

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, ActOperand]:
        """The input to give the op and how the op quantizes it. While observing: ``x`` is recorded
        and passes in float. The ``group`` strategy quantizes ``x`` here and the op runs weight-only."""
        if self._obs is not None:
            self._observe(x)
            return x, NO_ACT
        args = self.args
        if args.strategy == "group":
            return self._group_quantize(x), NO_ACT
        if args.dynamic:
            return x, ActOperand(None, args.kernel_format, args.kernel_mode, args.clip_ratio, args.topk)
        if args.strategy == "timestep":
            return x, ActOperand(self._timestep_scale(), args.kernel_format, args.kernel_mode, 1.0, 0)
        scale = self._buffers["act_scale"]
        if not bool(scale > 0):
            raise RuntimeError(
                f"layer {self.layer_name!r} uses static activation quantization but has no calibrated "
                "scale; run piecewise_quant.calibrate_activation_scales(model, batches) first"
            )
        return x, ActOperand(scale, args.kernel_format, args.kernel_mode, args.clip_ratio, args.topk)

    @property
    def fused(self) -> tuple[float, float, bool] | None:
        """``(qmax, clip_ratio, symmetric)`` when the CPU kernels can quantize this layer's inputs
        inside the matmul call (dynamic per-token integer activations without top-k clipping, not
        observing); ``None`` otherwise."""
        a = self.args
        if self._obs is not None or not a.dynamic or a.strategy != "token" or a.topk != 0 or a.format != "int":
            return None
        return a.qmax, a.clip_ratio, a.symmetric

    def _group_quantize(self, x: torch.Tensor) -> torch.Tensor:
        g, c = self.args.group_size, x.shape[-1]
        xg = x.reshape(*x.shape[:-1], c // g, g)
        op = ActOperand(None, self.args.kernel_format, self.args.kernel_mode, self.args.clip_ratio, self.args.topk)
        return quantize_input(xg, op).reshape(x.shape)

    def _timestep_scale(self) -> torch.Tensor:
        clock = self.clock
        if clock is None or clock.index is None:
            raise RuntimeError(
                f"layer {self.layer_name!r} has per-timestep activation scales but no current timestep: call it "
                "through its denoiser's forward with a timestep (the piecewise-quant timestep hook sets it), not on its own"
            )
        scale = self._buffers["act_scales_t"][clock.index]
        if not bool(scale > 0):
            raise RuntimeError(
                f"layer {self.layer_name!r} has no calibrated per-timestep activation scale; run "
                "pipe.enable_quant(...) with calibration prompts"
            )
        return scale

    # ---- calibration ------------------------------------------------------------------------------

    def start(self) -> None:
        """Record inputs (which then pass in float) until :meth:`finish` or :meth:`stop`."""
        self._obs = ActObservation()

    def stop(self) -> None:
        """Abandon the observation without touching any scale."""
        self._obs = None

    def _observe(self, x: torch.Tensor) -> None:
        obs = self._obs
        clock = self.clock
        mag = x.detach().abs().to(torch.float32)
        flat = real_tokens(mag).reshape(-1)
        k = self.args.topk
        vals = flat.topk(min(k + 1, flat.numel())).values if k > 0 else flat.amax().reshape(1)
        obs.per_timestep.setdefault(clock.value if clock is not None else None, []).append(vals)
        n = clock.n_prompts if clock is not None else None
        if mag.dim() >= 2 and n and clock.branches and mag.shape[0] == len(clock.branches) * n:
            # one call holds every guidance branch, in the pipeline's batch order
            per_sample = mag.reshape(mag.shape[0], -1).amax(dim=1)
            for b, chunk in zip(clock.branches, per_sample.split(n)):
                obs.per_branch[b] = max(obs.per_branch.get(b, 0.0), float(chunk.max()))
        else:
            obs.per_branch["all"] = max(obs.per_branch.get("all", 0.0), float(vals.max()))

    def scale_from(self, values: list[torch.Tensor]) -> float:
        """The static scale for observed magnitudes: the (k+1)-th largest (k = ``topk``), times
        ``clip_ratio``, over the representable maximum."""
        allv = torch.cat(values)
        if not bool(torch.isfinite(allv).all()):
            raise ValueError(f"layer {self.layer_name!r}: calibration activations contain NaN or Inf")
        k = min(self.args.topk + 1, allv.numel())
        return self.args.scale_for(float(allv.topk(k).values[-1]) * self.args.clip_ratio)

    def finish(self, timesteps: tuple[float, ...] = ()) -> ActObservation:
        """Stop observing and set the static scales: ``act_scale`` from everything observed and, for
        the ``timestep`` strategy, ``act_scales_t[i]`` from what was observed at ``timesteps[i]``.
        Returns the observation (for calibration reports)."""
        obs, self._obs = self._obs, None
        scale = self._buffers.get("act_scale")
        if scale is None:
            return obs or ActObservation()
        if obs is None or not obs.per_timestep:
            raise RuntimeError(
                f"layer {self.layer_name!r} saw no calibration tokens; its activation scale is unknown"
            )
        scale.fill_(self.scale_from(obs.values()))
        if self.args.strategy == "timestep":
            per_t = self._buffers.get("act_scales_t")
            if per_t is None or per_t.numel() != len(timesteps):
                per_t = torch.zeros(len(timesteps), dtype=torch.float32, device=scale.device)
                self._buffers["act_scales_t"] = per_t
            for i, t in enumerate(timesteps):
                vals = obs.per_timestep.get(t)
                if not vals:
                    raise RuntimeError(f"layer {self.layer_name!r} saw no activations at timestep {t}")
                per_t[i] = self.scale_from(vals)
        return obs

    def __repr__(self) -> str:
        return f"ActQuantizer({self.args.describe()})"
