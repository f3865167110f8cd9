"""``PiecewiseDiffusersConfig``: the diffusers-side face of :class:`piecewise_quant.PiecewiseQuantConfig`.

diffusers wants a ``QuantizationConfigMixin`` whose ``quant_method`` has a ``.value`` (it is read for
telemetry) and a ``to_dict`` that ``config.json`` can store. This class wraps the core config (the
single source of truth for grids, bits, groups, overrides and activation bits) and adds what only
diffusion needs, :class:`DiffusionOptions`:

* ``act_scales="per_timestep"``: static activation scales calibrated separately for every denoising
  timestep of the calibration schedule (the nearest calibrated timestep is used at inference);
* ``act_group_size=G``: dynamic activation quantization with one scale per token and per group of
  ``G`` channels (ViDiT-Q style), instead of one scale per token;
* ``timesteps``: the calibrated timesteps (written by calibration; the checkpoint needs them to
  rebuild the per-timestep scale tables);
* ``bos_aware`` / ``bos_layers``: MixDQ's BOS-aware quantization (token 0 of a causal text
  encoder's embeddings kept in float by the layers that read it, see :mod:`.bos`) and the layers
  that got a BOS row (written by ``enable_quant``; the checkpoint needs them to load the rows).

``to_dict()`` is ``core.to_dict()`` plus a ``"diffusion"`` entry when any option differs from the
default, so a config without diffusion options is byte-for-byte the transformers one.

Its ``__init__`` signature is ``(core=None, **kwargs)``, the same as the transformers
``PiecewiseHfConfig``: ``PipelineQuantizationConfig(quant_backend="piecewise", quant_kwargs=...)``
requires the two to match.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from piecewise_quant.config import PiecewiseQuantConfig, check_known_fields

from .._hostconfig import CoreConfigFace, PiecewiseMethod

__all__ = ["PiecewiseDiffusersConfig", "DiffusionOptions", "PiecewiseMethod", "as_core_config", "split_config",
           "check_rotation"]

ACT_SCALE_MODES = ("shared", "per_timestep")
# rotations a denoiser can take: applied inside each quantized layer (no fused residual-stream rotation)
ONLINE_ROTATIONS = ("balance", "input", "output", "R4")


@dataclass(frozen=True)
class DiffusionOptions:
    """Activation-quantization choices specific to diffusion denoisers.

    Attributes:
        act_scales: ``"shared"`` (one static scale per layer, from statistics over every timestep
            and both guidance branches) or ``"per_timestep"`` (one static scale per layer and
            calibrated timestep). Applies to layers with ``act_mode="static_per_tensor"``.
        act_group_size: ``None``, or a positive integer: layers with ``act_mode="dynamic_per_token"``
            then quantize each token's input in groups of this many channels, each group with its own
            scale computed at run time (ViDiT-Q's fine-grained dynamic quantization). Every such
            layer's ``in_features`` must be a multiple of it.
        timesteps: the timesteps the per-timestep scales were calibrated at (set by calibration).
        bos_aware: keep token 0 (BOS) of the text embeddings out of quantization in the layers that
            read it (MixDQ); needs calibration through the pipeline (``enable_quant``).
        bos_layers: the layers that store a BOS row (set by ``enable_quant``).
    """

    act_scales: str = "shared"
    act_group_size: int | None = None
    timesteps: tuple[float, ...] = ()
    bos_aware: bool = False
    bos_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.act_scales not in ACT_SCALE_MODES:
            raise ValueError(
                f"diffusion.act_scales must be one of {', '.join(map(repr, ACT_SCALE_MODES))}; got {self.act_scales!r}"
            )
        g = self.act_group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ValueError(f"diffusion.act_group_size must be None or a positive integer (e.g. 32, 64); got {g!r}")
        ts = self.timesteps
        if isinstance(ts, (str, bytes)) or not isinstance(ts, (list, tuple)):
            raise ValueError(f"diffusion.timesteps must be a list of numbers; got {ts!r}")
        clean = []
        for t in ts:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
                raise ValueError(f"diffusion.timesteps must be finite numbers; got {t!r}")
            clean.append(float(t))
        if len(set(clean)) != len(clean):
            raise ValueError(f"diffusion.timesteps must not repeat a timestep; got {clean}")
        object.__setattr__(self, "timesteps", tuple(clean))
        if not isinstance(self.bos_aware, bool):
            raise ValueError(f"diffusion.bos_aware must be True or False; got {self.bos_aware!r}")
        layers = self.bos_layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple)) or not all(
                isinstance(n, str) and n for n in layers):
            raise ValueError(f"diffusion.bos_layers must be a list of layer names; got {layers!r}")
        if layers and not self.bos_aware:
            raise ValueError("diffusion.bos_layers is set but bos_aware is False; the config is inconsistent")
        object.__setattr__(self, "bos_layers", tuple(layers))

    @property
    def is_default(self) -> bool:
        return self == DiffusionOptions()

    def to_dict(self) -> dict[str, Any]:
        d = {"act_group_size": self.act_group_size, "act_scales": self.act_scales, "timesteps": list(self.timesteps)}
        if self.bos_aware:  # absent otherwise, so configs without it are unchanged
            d.update(bos_aware=True, bos_layers=list(self.bos_layers))
        return d

    @classmethod
    def coerce(cls, value: Any) -> "DiffusionOptions":
        if value is None:
            return cls()
        if isinstance(value, DiffusionOptions):
            return value
        if isinstance(value, Mapping):
            check_known_fields(cls, value, "diffusion options")
            return cls(**value)
        raise ValueError(f"diffusion must be a DiffusionOptions or a dict of its fields; got {value!r}")


def check_rotation(core: PiecewiseQuantConfig) -> None:
    """Refuse the rotations a denoiser cannot take (the fused residual-stream and KV-cache ones)."""
    if core.rotation is None:
        return
    kinds = [r for r in core.rotation.rotations if r not in ONLINE_ROTATIONS]
    if kinds:
        raise ValueError(
            f"piecewise-quant: rotation {kinds} is not supported for diffusers models (R1/R2 are fused into a "
            "Llama-family decoder's residual stream, R3 rotates an LLM's KV cache); a DiT takes the online "
            f"rotations {list(ONLINE_ROTATIONS)}, e.g. diffusion_recipe(..., balance=True) for ViDiT-Q's channel "
            "balance"
        )


def split_config(config: Any) -> tuple[PiecewiseQuantConfig, DiffusionOptions]:
    """``(core config, diffusion options)`` behind ``config``: a :class:`PiecewiseQuantConfig`, a
    :class:`PiecewiseDiffusersConfig`, the transformers ``PiecewiseHfConfig`` or a
    ``quantization_config`` dict (with an optional ``"diffusion"`` entry)."""
    if isinstance(config, PiecewiseDiffusersConfig):
        return config.core, config.diffusion
    if isinstance(config, PiecewiseQuantConfig):
        return config, DiffusionOptions()
    if isinstance(config, Mapping):
        data = dict(config)
        diffusion = DiffusionOptions.coerce(data.pop("diffusion", None))
        return PiecewiseQuantConfig.from_dict(data), diffusion
    core = getattr(config, "core", None)  # transformers' PiecewiseHfConfig, or a reloaded copy of ours
    if isinstance(core, PiecewiseQuantConfig):
        return core, DiffusionOptions.coerce(getattr(config, "diffusion", None))
    raise TypeError(
        "quantization_config must be a piecewise_quant.PiecewiseQuantConfig, a PiecewiseDiffusersConfig or a dict "
        f"with quant_method='piecewise'; got {type(config).__name__}"
    )


def as_core_config(config: Any) -> PiecewiseQuantConfig:
    return split_config(config)[0]


class PiecewiseDiffusersConfig(CoreConfigFace, QuantizationConfigMixin):
    """diffusers ``quantization_config`` for ``quant_method="piecewise"``.

    Build it from core fields plus an optional ``diffusion`` entry::

        PiecewiseDiffusersConfig(bits=4, act_bits=8, diffusion={"act_group_size": 32})
        PiecewiseDiffusersConfig(core=pq.PiecewiseQuantConfig(bits=4), diffusion=DiffusionOptions(...))

    Passing a plain :class:`PiecewiseQuantConfig` to ``from_pretrained`` works too (it is wrapped).
    """

    def __init__(self, core: PiecewiseQuantConfig | None = None, **kwargs: Any) -> None:
        diffusion = DiffusionOptions.coerce(kwargs.pop("diffusion", None))
        if core is not None:
            if kwargs:
                raise TypeError(f"pass either core= or config fields, not both (got core= and {sorted(kwargs)})")
            core, inner = split_config(core)
            if not inner.is_default and diffusion.is_default:
                diffusion = inner
        else:
            core = PiecewiseQuantConfig.from_dict(kwargs)
        check_rotation(core)
        self._init_face(core)
        object.__setattr__(self, "_diffusion", diffusion)

    _PRIVATE = ("_core", "_diffusion")
    _EXTRA_KEYS = frozenset({"diffusion"})

    @property
    def diffusion(self) -> DiffusionOptions:
        return self.__dict__["_diffusion"]

    @classmethod
    def from_core(cls, core: Any, diffusion: DiffusionOptions | Mapping[str, Any] | None = None) -> "PiecewiseDiffusersConfig":
        return cls(core=core, diffusion=diffusion)

    def with_diffusion(self, **changes: Any) -> "PiecewiseDiffusersConfig":
        return type(self)(core=self.core, diffusion=dataclasses.replace(self.diffusion, **changes))

    def _set_extra_field(self, name: str, value: Any) -> bool:
        if name != "diffusion":
            return False
        object.__setattr__(self, "_diffusion", DiffusionOptions.coerce(value))
        return True

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PiecewiseDiffusersConfig):
            return self.core == other.core and self.diffusion == other.diffusion
        if isinstance(other, PiecewiseQuantConfig):
            return self.core == other and self.diffusion.is_default
        return NotImplemented

    def __deepcopy__(self, memo: dict) -> "PiecewiseDiffusersConfig":
        return type(self)(core=copy.deepcopy(self.core, memo), diffusion=self.diffusion)

    def __reduce__(self):
        return (_rebuild, (self.to_dict(),))

    def to_dict(self) -> dict[str, Any]:
        """``core.to_dict()`` plus ``"diffusion"`` when a diffusion option is set (what ``config.json`` stores)."""
        d = self.core.to_dict()
        if not self.diffusion.is_default:
            d["diffusion"] = self.diffusion.to_dict()
        return dict(sorted(d.items()))

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the given core fields (validated together) and ``diffusion``; return the unused kwargs."""
        if "diffusion" in kwargs:
            object.__setattr__(self, "_diffusion", DiffusionOptions.coerce(kwargs["diffusion"]))
        return self._update_core({k: v for k, v in kwargs.items() if k != "diffusion"})


def _rebuild(data: dict[str, Any]) -> PiecewiseDiffusersConfig:
    return PiecewiseDiffusersConfig(**data)


def _finish_registration() -> None:
    from . import _finish_pending_registration

    _finish_pending_registration()


_finish_registration()
