"""The integrations plugin: tells piecewise-quant which host frameworks it can register with.

Registered through this distribution's own ``piecewise_quant`` entry point, like a third-party
plugin, but never disabled by ``PIECEWISE_QUANT_DISABLE_PLUGINS``.
"""

from __future__ import annotations

import sys

from ..plugins import hookimpl


def _activate_transformers() -> None:
    from .transformers import register_with_transformers

    register_with_transformers()


def _activate_diffusers() -> None:
    from .diffusers import register_with_diffusers

    register_with_diffusers()


def _activate_peft() -> None:
    from .peft import register_with_peft

    register_with_peft()


@hookimpl
def piecewise_quant_register_integrations(register):
    register("transformers", _activate_transformers)
    register("diffusers", _activate_diffusers)
    register("peft", _activate_peft)


@hookimpl
def piecewise_quant_prepare_host_model(model, config):
    if "transformers" in sys.modules:
        from transformers.modeling_utils import PreTrainedModel

        if isinstance(model, PreTrainedModel) and getattr(model, "hf_quantizer", None) is None:
            from .transformers.config import PiecewiseHfConfig
            from .transformers.quantizer import PiecewiseHfQuantizer

            model.hf_quantizer = PiecewiseHfQuantizer(PiecewiseHfConfig.from_core(config), pre_quantized=True)
