"""Save and load quantized models that are not Hugging Face models (any ``torch.nn.Module``).

A directory holds ``model.safetensors`` (the whole state dict: packed weights under stable names,
float tensors as they are) and ``quantization_config.json`` (the ``PiecewiseQuantConfig``).
Loading rebuilds the same ``QuantLinear`` layers on a freshly built float model and checks that
every tensor is present with the right shape and dtype. Hugging Face models use the transformers
integration instead (``save_pretrained`` / ``from_pretrained``).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import PiecewiseQuantConfig
from .qlinear import QuantLinear
from .quantization import plan_layers
from .registry import get_format

__all__ = ["save_quantized", "load_quantized", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "quantization_config.json"
WEIGHTS_NAME = "model.safetensors"


def save_quantized(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (quantized by :func:`piecewise_quant.quantize`) to ``directory``.

    Both files are written to a temporary directory first and then moved in, the weights before the
    config, so a crash or a full disk never leaves a half-written file; other files in
    ``directory`` stay."""
    import tempfile

    from .checkpoint import marker_metadata
    from .saving import _full_disk, check_output_dir, replace_files

    config = getattr(model, "piecewise_quant_config", None)
    if not isinstance(config, PiecewiseQuantConfig):
        raise ValueError("model has no piecewise_quant_config; quantize it with piecewise_quant.quantize first")
    out = check_output_dir(directory, overwrite=True)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.absolute().parent))
    try:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt", "quant_method": "piecewise", **marker_metadata(config)})
        (tmp / CONFIG_NAME).write_text(config.to_json_string())
        replace_files(tmp, out, last=(CONFIG_NAME,))
    except BaseException as exc:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        new = _full_disk(exc, out)
        if new is exc:
            raise
        raise new from None
    return out


def load_quantized(model: nn.Module, directory: str | Path) -> nn.Module:
    """Turn a float ``model`` of the same architecture into the saved quantized one, in place.

    Raises ``ValueError`` naming the tensor when one is missing, unexpected, or has the wrong shape
    or dtype, and when the saved config is invalid (unknown grid, newer schema version).
    """
    src = Path(directory)
    cfg_path = src / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: not a piecewise-quant checkpoint directory")
    try:
        config = PiecewiseQuantConfig.from_dict(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from None
    from .checkpoint import check_finite_tensors, check_marker

    check_marker([src / WEIGHTS_NAME], config, where=str(src))
    try:
        state = load_file(str(src / WEIGHTS_NAME))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{src / WEIGHTS_NAME} cannot be read: {exc}") from None
    plan = plan_layers(model, config)
    for name in plan:
        check_finite_tensors(name, {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
    originals = {name: model.get_submodule(name) for name in plan}
    try:
        _swap_in(model, plan, state, src)
    except BaseException:
        for name, linear in originals.items():  # leave the float model as it was
            model.set_submodule(name, linear)
        raise
    model.piecewise_quant_config = config
    return model


def _swap_in(model: nn.Module, plan: dict, state: dict, src: Path) -> None:
    for name, layer in plan.items():
        linear = model.get_submodule(name)
        q = QuantLinear.empty(
            layer, get_format(layer.spec.grid), linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        model.set_submodule(name, q)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"checkpoint {src} is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise ValueError(f"checkpoint {src} has unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, ref in expected.items():
        got = state[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {tuple(got.shape)} and dtype {got.dtype}; the config "
                f"expects {tuple(ref.shape)} and {ref.dtype}"
            )
    model.load_state_dict(state, strict=True)
