"""What the transformers and diffusers ``quantization_config`` classes share: both wrap one frozen
:class:`piecewise_quant.PiecewiseQuantConfig` (the single source of truth) behind their host's
``QuantizationConfigMixin`` API. Imports no host framework."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any, ClassVar, Mapping

from piecewise_quant.config import QUANT_METHOD, PiecewiseQuantConfig

__all__ = ["CORE_FIELDS", "PiecewiseMethod", "CoreConfigFace"]

CORE_FIELDS = frozenset(f.name for f in dataclasses.fields(PiecewiseQuantConfig)) - {"quant_method"}


class PiecewiseMethod(str, enum.Enum):
    """The ``quant_method`` value: a ``str`` enum like transformers' ``QuantizationMethod``. It
    compares and hashes as ``"piecewise"`` and has the ``.value`` diffusers reads for telemetry."""

    PIECEWISE = QUANT_METHOD

    def __str__(self) -> str:  # so f-strings and logs show "piecewise"
        return self.value


class CoreConfigFace:
    """Mixin (listed before the host's ``QuantizationConfigMixin``): reading a core field reads the
    wrapped config, and the mixin's dict/JSON methods serialise exactly ``to_dict()``.

    Subclasses store the core config as ``_core`` and name their own extra state in ``_PRIVATE``
    and their extra ``from_dict`` keyword arguments in ``_EXTRA_KEYS``.
    """

    _PRIVATE: ClassVar[tuple[str, ...]] = ("_core",)
    _EXTRA_KEYS: ClassVar[frozenset[str]] = frozenset()

    __hash__ = None  # mutable: fields can be set

    def _init_face(self, core: PiecewiseQuantConfig) -> None:
        """Set the wrapped core config and ``quant_method`` (``__init__`` of a subclass)."""
        object.__setattr__(self, "_core", core)
        object.__setattr__(self, "quant_method", PiecewiseMethod.PIECEWISE)

    @property
    def core(self) -> PiecewiseQuantConfig:
        return self.__dict__["_core"]

    def __setattr__(self, name: str, value: Any) -> None:
        if not self._set_extra_field(name, value) and not self._set_core_field(name, value):
            object.__setattr__(self, name, value)

    def _set_extra_field(self, name: str, value: Any) -> bool:
        """Set a subclass's own field; ``False`` if ``name`` is not one (the default)."""
        return False

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails; never recurse while half-built (copy/pickle)
        if name.startswith("__") or name in self._PRIVATE:
            raise AttributeError(name)
        core = self.__dict__.get("_core")
        if core is not None and name in CORE_FIELDS:
            return getattr(core, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def _set_core_field(self, name: str, value: Any) -> bool:
        """Set a core field (re-validated as a whole) or check ``quant_method``; ``False`` if
        ``name`` is neither."""
        if name in CORE_FIELDS:
            object.__setattr__(self, "_core", dataclasses.replace(self.core, **{name: value}))
            return True
        if name == "quant_method":
            if value != QUANT_METHOD:
                raise ValueError(f"quant_method must be {QUANT_METHOD!r}; got {value!r}")
            return True
        return False

    def _update_core(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Apply the core fields among ``kwargs`` together; return the others."""
        used = {k: v for k, v in kwargs.items() if k in CORE_FIELDS}
        if used:
            object.__setattr__(self, "_core", dataclasses.replace(self.core, **used))
        return {k: v for k, v in kwargs.items() if k not in used}

    # ---- QuantizationConfigMixin API ------------------------------------------------------------

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        data = dict(config_dict)
        used = {k: v for k, v in kwargs.items() if k in CORE_FIELDS or k in cls._EXTRA_KEYS}
        data.update(used)
        config = cls(**data)
        unused = {k: v for k, v in kwargs.items() if k not in used}
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        return self.core.to_dict()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __iter__(self):
        yield from self.to_dict().items()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"
