"""``PiecewiseHfConfig``: the transformers-side face of :class:`piecewise_quant.PiecewiseQuantConfig`.

transformers wants a ``QuantizationConfigMixin`` (``from_dict``, ``to_dict``, ``to_json_string``,
``update``, ``quant_method``); piecewise-quant has one frozen core config. This class wraps the core
config and forwards to it, so there is a single source of truth:

* ``to_dict()`` is exactly ``core.to_dict()`` (sorted, JSON-clean, with ``quant_method`` and
  ``version``), which is what ``config.json`` stores;
* ``from_dict(d)`` is ``PiecewiseQuantConfig.from_dict(d)`` (so an unknown field or a newer schema
  ``version`` raises ``ValueError``);
* reading a field (``cfg.bits``, ``cfg.overrides``) reads the core config; setting one builds a new,
  validated core config.

Only transformers *submodules* are imported here (never the ``transformers.quantizers`` package),
because the autoload hook imports this module while ``transformers.quantizers`` is still
initialising.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from transformers.utils.quantization_config import QuantizationConfigMixin

from piecewise_quant.config import PiecewiseQuantConfig

from .._hostconfig import CoreConfigFace, PiecewiseMethod

__all__ = ["PiecewiseHfConfig", "PiecewiseMethod", "as_core_config"]


def as_core_config(config: Any) -> PiecewiseQuantConfig:
    """The core config behind ``config``: a :class:`PiecewiseQuantConfig`, a
    :class:`PiecewiseHfConfig` or a ``quantization_config`` dict."""
    if isinstance(config, PiecewiseQuantConfig):
        return config
    if isinstance(config, PiecewiseHfConfig):
        return config.core
    if isinstance(config, Mapping):
        return PiecewiseQuantConfig.from_dict(config)
    core = getattr(config, "core", None)  # a PiecewiseHfConfig from a reloaded copy of this module
    if isinstance(core, PiecewiseQuantConfig):
        return core
    raise TypeError(
        "quantization_config must be a piecewise_quant.PiecewiseQuantConfig, a PiecewiseHfConfig or a dict with "
        f"quant_method='piecewise'; got {type(config).__name__}"
    )


class PiecewiseHfConfig(CoreConfigFace, QuantizationConfigMixin):
    """transformers ``quantization_config`` for ``quant_method="piecewise"``.

    Accepts the same keyword arguments as :class:`piecewise_quant.PiecewiseQuantConfig` (plus
    ``quant_method``, which must be ``"piecewise"``), or an existing core config as ``core=``.
    You normally never build one: pass a ``PiecewiseQuantConfig`` to ``from_pretrained`` and the
    quantizer wraps it.
    """

    def __init__(self, core: PiecewiseQuantConfig | None = None, **kwargs: Any) -> None:
        if core is not None:
            if kwargs:
                raise TypeError("pass either core= or config fields, not both")
            core = as_core_config(core)
        else:
            core = PiecewiseQuantConfig.from_dict(kwargs)
        self._init_face(core)

    @classmethod
    def from_core(cls, core: Any) -> "PiecewiseHfConfig":
        return cls(core=as_core_config(core))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PiecewiseHfConfig):
            return self.core == other.core
        if isinstance(other, PiecewiseQuantConfig):
            return self.core == other
        return NotImplemented

    def __deepcopy__(self, memo: dict) -> "PiecewiseHfConfig":
        new = type(self)(core=copy.deepcopy(self.core, memo))
        for k, v in self.__dict__.items():
            if k not in ("_core", "quant_method"):
                object.__setattr__(new, k, copy.deepcopy(v, memo))
        return new

    def __reduce__(self):
        return (_rebuild, (self.core.to_dict(),))

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the given core fields (validated together); return the unused kwargs."""
        return self._update_core(kwargs)

    def get_loading_attributes(self) -> dict[str, Any]:
        return {}


def _rebuild(data: dict[str, Any]) -> PiecewiseHfConfig:
    return PiecewiseHfConfig(**data)


def _finish_registration() -> None:
    from . import _finish_pending_registration

    _finish_pending_registration()


_finish_registration()
