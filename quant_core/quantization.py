"""``quantize(model, config)``: replace a model's Linear layers by ``QuantLinear`` in place, no data
needed; and the planning step the framework integrations share."""

from __future__ import annotations

import difflib
import logging
import warnings
from typing import Collection, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .args import OnlineRotation
from .config import LayerSpec, PiecewiseQuantConfig, QuantSpec
from .errors import PiecewiseQuantWarning
from .qlinear import QuantLinear
from .registry import get_format

__all__ = [
    "quantize", "plan_layers", "check_float_model", "warn_unquantized", "tied_linear_names", "layer_spec_for",
    "calibrate_activation_scales", "quantized_layers", "dequantize_layers",
]

logger = logging.getLogger(__name__)


def layer_spec_for(name: str, spec: QuantSpec, in_features: int, out_features: int,
                   rotation: OnlineRotation | None = None) -> LayerSpec:
    """Bind ``spec`` to a layer, resolving the group size and checking the format accepts it;
    ``rotation``: the layer's online rotations (their sizes must have a Hadamard matrix)."""
    if in_features < 1 or out_features < 1:
        raise ValueError(
            f"layer {name!r} has in_features={in_features}, out_features={out_features}: it holds no weights to "
            f"quantize; keep it in float (modules_to_not_convert=[..., {name!r}])"
        )
    fmt = get_format(spec.grid)
    try:
        fmt.validate(spec)
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc}") from None
    gs = spec.group_size
    if gs == "channel":
        group = in_features
    elif gs == "tensor":
        group = -1
    else:
        group = int(gs)
        if in_features % group:
            raise ValueError(
                f"layer {name!r}: group_size={group} does not divide its in_features={in_features}; "
                f"choose a divisor of {in_features}, 'channel', or override this layer "
                f"(overrides={{{name!r}: {{'group_size': 'channel'}}}}) or skip it (modules_to_not_convert)"
            )
    if rotation is not None:
        from .kernels.hadamard import supported_size

        for side, size in (("input", in_features), ("output", out_features)):
            if getattr(rotation, side) and not supported_size(size):
                raise ValueError(
                    f"layer {name!r}: no Hadamard rotation of its {side} size {size} (sizes K * 2^m with K = 1 or a "
                    "Paley order up to 256, e.g. 768 = 12 * 64); keep it in float (modules_to_not_convert) or drop "
                    f"the {side} rotation"
                )
    layer = LayerSpec(name=name, spec=spec, in_features=in_features, out_features=out_features, group_size=group,
                      rotation=rotation)
    if getattr(spec, "low_rank", None) is not None:
        from .lowrank import check_rank

        check_rank(layer)
    return layer


def _output_embedding_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return set()
    try:
        emb = get()
    except Exception:  # models without an LM head raise NotImplementedError and the like
        return set()
    return {n for n, m in model.named_modules() if emb is not None and m is emb}


def tied_linear_names(model: nn.Module) -> dict[str, str]:
    """``{linear name: name of another module sharing its weight}`` (e.g. an ``lm_head`` tied to the
    input embeddings): quantizing such a layer would silently untie it."""
    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if w is not None:
            owners.setdefault(id(w), []).append(mod_name)
    out: dict[str, str] = {}
    for names in owners.values():
        if len(set(names)) < 2:
            continue
        for n in names:
            if isinstance(model.get_submodule(n), nn.Linear):
                out[n] = next(o for o in names if o != n)
    return out


def plan_layers(model: nn.Module, config: PiecewiseQuantConfig, exempt_patterns: Collection[str] = ()) -> dict[str, LayerSpec]:
    """Which Linear layers get quantized and how; raises on a layer the config cannot handle.

    Layers whose weight is tied to another module stay in float (with a
    :class:`~piecewise_quant.errors.PiecewiseQuantWarning`). A user-given ``overrides`` or
    ``modules_to_not_convert`` pattern that matches no Linear layer warns (``config.strict``:
    raises), except those in ``exempt_patterns`` (recipes written for several architectures)."""
    if not isinstance(config, PiecewiseQuantConfig):
        raise TypeError(f"config must be a PiecewiseQuantConfig, got {type(config).__name__}")
    skip_outputs = _output_embedding_names(model) if config.modules_to_not_convert is None else set()
    inside_mha = {
        f"{n}.{c}" if n else c
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for c, _ in m.named_children()
    }
    tied = tied_linear_names(model)
    plan: dict[str, LayerSpec] = {}
    linear_names: list[str] = []
    kept_tied: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, QuantLinear):
            if isinstance(module, QuantLinear):
                linear_names.append(name)
            elif name and _explicitly_targeted(config, name):
                raise ValueError(
                    f"module {name!r} is a {type(module).__name__}; only torch.nn.Linear layers can be quantized "
                    "(remove it from overrides)"
                )
            continue
        linear_names.append(name)
        if name in skip_outputs or name in inside_mha:
            continue
        spec = config.spec_for(name)
        if spec is None:
            continue
        if name in tied:
            kept_tied.append(name)
            continue
        plan[name] = layer_spec_for(name, spec, module.in_features, module.out_features,
                                    config.online_rotation_for(name, spec))
    if kept_tied:
        warnings.warn(
            "piecewise-quant keeps these layers in float because their weight is tied to another module "
            f"(quantizing would untie them): {', '.join(f'{n} (tied to {tied[n]})' for n in kept_tied)}",
            PiecewiseQuantWarning,
            stacklevel=3,
        )
    _check_patterns(model, config, linear_names, exempt_patterns)
    return plan


def _check_patterns(model: nn.Module, config: PiecewiseQuantConfig, linear_names: list[str], exempt: Collection[str]) -> None:
    unmatched = [(f, p) for f, p in config.unmatched_patterns(linear_names) if p not in exempt]
    if not unmatched:
        return
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
    parts = []
    for field_name, pattern in unmatched:
        tail = pattern[3:] if pattern.startswith("re:") else pattern
        close = difflib.get_close_matches(tail.rsplit(".", 1)[-1].strip("*"), leaves, n=2, cutoff=0.6)
        hint = f" (Linear layers here end in e.g. {', '.join(repr(c) for c in close)})" if close else ""
        parts.append(f"{field_name} pattern {pattern!r} matches no Linear layer{hint}")
    message = (
        f"piecewise-quant: {'; '.join(parts)} of this {type(model).__name__} ({len(linear_names)} Linear layers); "
        "check the spelling"
    )
    if config.strict:
        raise ValueError(message + " (strict=True)")
    warnings.warn(message + " (pass strict=True to make this an error)", PiecewiseQuantWarning, stacklevel=4)


def _explicitly_targeted(config: PiecewiseQuantConfig, name: str) -> bool:
    return name in config.overrides



def quantize(model: nn.Module, config: PiecewiseQuantConfig | None = None, progress: bool = True) -> nn.Module:
    """Quantize every eligible ``nn.Linear`` of ``model`` in place (data-free) and return ``model``.

    Layers matched by ``config.modules_to_not_convert`` (default: ``lm_head`` and the output
    embeddings) stay in float. Raises ``ValueError`` naming the layer when its shape does not fit
    the config, before anything is changed.
    """
    config = config or PiecewiseQuantConfig()
    check_float_model(model, "quantize")
    plan = plan_layers(model, config)
    if not plan:
        conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
        hint = (
            f"; its {len(conv1d)} transformers Conv1D layers (GPT-2 style, e.g. {conv1d[0]!r}) are not supported yet"
            if conv1d
            else ""
        )
        raise ValueError(
            "found no nn.Linear layer to quantize (all were skipped by modules_to_not_convert, or the model has none)"
            + hint
        )
    # every layer is quantized before the first one is swapped in: an error or a KeyboardInterrupt
    # on the way leaves the model exactly as it was
    # (a rotation changes the float weights first: rotated() puts them back on any exception)
    from .rotation import rotated

    with rotated(model, config.rotation, plan):
        built: dict[str, QuantLinear] = {}
        for name, layer in tqdm(plan.items(), desc="quantizing", unit="layer", disable=not progress):
            built[name] = QuantLinear.from_linear(model.get_submodule(name), layer, get_format(layer.spec.grid))
        for name, q in built.items():
            model.set_submodule(name, q)
    model.piecewise_quant_config = config
    _record_in_host_config(model, config)
    warn_unquantized(model)
    return model


def check_float_model(model: nn.Module, verb: str) -> None:
    """Raise ``ValueError`` before any work when ``model`` cannot be quantized as given: it is
    already quantized, or its weights are on the meta device (not loaded)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{verb}() needs a torch.nn.Module, got {type(model).__name__}")
    done = quantized_layers(model)
    if done or isinstance(getattr(model, "piecewise_quant_config", None), PiecewiseQuantConfig):
        example = next(iter(done), None)
        raise ValueError(
            f"the model is already quantized ({len(done)} QuantLinear layers"
            + (f", e.g. {example!r}" if example else "")
            + f"); {verb} the float model (load it without quantization_config), or turn this one back into float "
            "first with piecewise_quant.quantization.dequantize_layers(model)"
        )
    # accelerate's CPU/disk offload keeps placeholders on meta behind a hook that loads them: those are fine
    hooked = {n for n, m in model.named_modules() if hasattr(m, "_hf_hook")}
    meta = [
        n for n, p in model.named_parameters()
        if p.is_meta and not any(n == h or n.startswith(h + ".") or not h for h in hooked)
    ]
    if meta:
        raise ValueError(
            f"the model's weights are on the meta device (e.g. {meta[0]!r}, {len(meta)} tensors): they were never "
            f"loaded, so there is nothing to {verb}; load real weights (from_pretrained without init_empty_weights / "
            "device_map='meta') first"
        )


def warn_unquantized(model: nn.Module) -> None:
    """One :class:`~piecewise_quant.errors.PiecewiseQuantWarning` naming the weight matrices left in
    float because their layer type is not supported (fused 3-D MoE experts, convolutions, GPT-2
    ``Conv1D``...), with their share of the model's weights."""
    from .report import model_size_report

    report = model_size_report(model)
    if not report.unsupported:
        return
    total = report.quantized_weights + report.float_matrix_weights
    n = sum(numel for _, numel in report.unsupported)
    shown = ", ".join(f"{name} ({numel:,} weights)" for name, numel in report.unsupported[:6])
    more = f" and {len(report.unsupported) - 6} more" if len(report.unsupported) > 6 else ""
    warnings.warn(
        f"piecewise-quant left {len(report.unsupported)} weight tensor(s) in float because their layer type is not "
        f"supported ({100 * n / max(total, 1):.1f}% of the model's weight-matrix weights): {shown}{more}. "
        f"model_size_report() counts them (overall_bits_per_weight={report.overall_bits_per_weight:.3f})",
        PiecewiseQuantWarning,
        stacklevel=3,
    )


def _record_in_host_config(model: nn.Module, config: PiecewiseQuantConfig) -> None:
    """A model with a Hugging Face style ``config`` (transformers, diffusers) gets the plan as
    ``config.quantization_config``, so its own ``save_pretrained`` writes a checkpoint that reloads
    quantized instead of silently re-initialising the layers."""
    host = getattr(model, "config", None)
    if host is not None and callable(getattr(host, "to_dict", None)):
        host.quantization_config = config.to_dict()
    from .plugins import load_plugins

    for impl in load_plugins().hook.piecewise_quant_prepare_host_model.get_hookimpls():
        try:
            impl.function(model=model, config=config)
        except Exception as exc:  # a host adapter must not undo a finished quantization
            warnings.warn(f"piecewise_quant plugin {impl.plugin_name!r} could not prepare the model for saving: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def dequantize_layers(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``QuantLinear`` of ``model`` (in place) by its dequantized ``nn.Linear``
    (:meth:`QuantLinear.to_linear`, in ``dtype`` or each layer's compute dtype) and forget the
    quantization plan; returns ``model``. What the hosts' ``model.dequantize()`` runs."""
    for name, layer in quantized_layers(model).items():
        model.set_submodule(name, layer.to_linear(dtype))
    if hasattr(model, "piecewise_quant_config"):
        del model.piecewise_quant_config
    return model


@torch.no_grad()
def calibrate_activation_scales(model: nn.Module, batches: Iterable) -> int:
    """Set static per-tensor activation scales from calibration ``batches`` (tensors of input ids,
    or dicts of model inputs). Returns the number of layers calibrated."""
    layers = [m for m in quantized_layers(model).values() if m.act_scale is not None]
    if not layers:
        return 0
    for m in layers:
        m.start_observing()
    seen = 0
    try:
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            else:
                model(batch)
            seen += 1
    finally:
        if seen == 0:
            for m in layers:
                m.stop_observing()
    if seen == 0:
        raise ValueError("calibrate_activation_scales got no calibration batches")
    for m in layers:
        m.finish_observing()
    return len(layers)
