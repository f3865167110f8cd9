"""Finding a model's repeated blocks, capturing their inputs, and running them one at a time.

Blocks are found as the longest ``nn.ModuleList`` (or ``nn.Sequential``) of modules of one class
that contain Linear layers: ``model.layers`` in Llama/Qwen/Mistral, ``encoder.layer`` in BERT,
``transformer_blocks`` in DiTs. For an architecture where that guess is wrong, name the list:
``CalibrationConfig(blocks="path.to.list")``.

Inputs of the first block are captured by running the model until the block is called (a hook
stores its positional and keyword arguments, then stops the forward pass); later blocks get the
previous block's outputs with the same keyword arguments (masks, position embeddings).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..token_mask import token_mask

__all__ = [
    "find_blocks",
    "BlockInputs",
    "capture_block_inputs",
    "run_block",
    "relative_error",
    "onload_block",
    "hidden_of",
]

logger = logging.getLogger(__name__)


def _has_linear(m: nn.Module) -> bool:
    return any(isinstance(c, nn.Linear) for c in m.modules())


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.Module]:
    """``(dotted path, module list)`` of the model's repeated blocks."""
    if path is not None:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"calibration.blocks={path!r}: the model has no submodule of that name") from None
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise ValueError(
                f"calibration.blocks={path!r} is a {type(blocks).__name__}; it must name a non-empty "
                "nn.ModuleList or nn.Sequential of blocks"
            )
        return path, blocks
    best: tuple[int, str, nn.Module] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) == 0:
            continue
        kinds = {type(c) for c in m}
        if len(kinds) != 1 or not all(_has_linear(c) for c in m):
            continue
        if best is None or len(m) > best[0]:
            best = (len(m), name, m)
    if best is None:
        raise ValueError(
            f"found no repeated blocks in {type(model).__name__} (no nn.ModuleList of identical modules with "
            "Linear layers); name them with PiecewiseQuantConfig(calibration=CalibrationConfig(blocks='path.to.list'))"
        )
    return best[1], best[2]


class _Stop(Exception):
    pass


def hidden_of(out: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first element of a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"a block returned {type(out).__name__}; expected a tensor or a tuple starting with one")


@dataclass
class BlockInputs:
    """Per batch: the hidden states and the other arguments of a block call, and which positions
    are real tokens (``None``: all of them)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)  # positional arguments after the hidden states
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    hidden_in_kwargs: bool = False
    token_mask: list[torch.Tensor | None] = field(default_factory=list)

    def call(self, block: nn.Module, i: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden[i] if hidden is None else hidden
        with token_mask(self.token_mask[i] if i < len(self.token_mask) else None):
            if self.hidden_in_kwargs:
                return hidden_of(block(*self.args[i], **{**self.kwargs[i], "hidden_states": h}))
            return hidden_of(block(h, *self.args[i], **self.kwargs[i]))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.hidden)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[dict[str, Any]]) -> BlockInputs:
    """Run ``model`` on each batch until ``first_block`` is called; store that call's arguments."""
    inputs = BlockInputs()

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        if args:
            inputs.hidden.append(args[0].detach())
            inputs.args.append(tuple(args[1:]))
        elif "hidden_states" in kwargs:
            inputs.hidden.append(kwargs.pop("hidden_states").detach())
            inputs.args.append(())
            inputs.hidden_in_kwargs = True
        else:
            raise TypeError(f"the first block was called without hidden states (kwargs: {sorted(kwargs)})")
        for key in ("past_key_values", "past_key_value", "layer_past"):
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        inputs.kwargs.append(kwargs)
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            extra = {"use_cache": False} if _accepts_use_cache(model) else {}
            try:
                model(**batch, **extra)
            except _Stop:
                pass
            else:
                raise ValueError(f"calibration batch {i} ran through the model without reaching its blocks")
            inputs.token_mask.append(_padding_mask(batch.get("attention_mask"), inputs.hidden[-1]))
    finally:
        handle.remove()
    for i, h in enumerate(inputs.hidden):
        if h.is_floating_point() and not bool(torch.isfinite(h).all()):
            raise ValueError(f"calibration batch {i}: the hidden states entering the first block contain NaN or Inf")
    return inputs


def _padding_mask(mask: Any, hidden: torch.Tensor) -> torch.Tensor | None:
    """A batch's 2-D 0/1 ``attention_mask`` as a boolean mask of real tokens, when it marks
    padding and lines up with the block's hidden states; otherwise ``None``."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or hidden.dim() < 3:
        return None
    if tuple(mask.shape) != tuple(hidden.shape[:2]) or bool((mask != 0).all()):
        return None
    return (mask != 0).cpu()


def _accepts_use_cache(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "use_cache")


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, hidden: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The block's output for every batch (``hidden`` replaces the stored hidden states)."""
    outs = []
    for i in range(len(inputs.hidden) if hidden is None else len(hidden)):
        out = inputs.call(block, i, None if hidden is None else hidden[i])
        outs.append(out.detach())
    return outs


def relative_error(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """``sum ||out - ref||^2 / sum ||ref||^2`` over batches."""
    num = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(out, ref))
    den = sum(float(r.float().pow(2).sum()) for r in ref)
    return num / max(den, 1e-30)


def onload_block(block: nn.Module) -> bool:
    """Materialise a block whose weights accelerate offloaded to CPU/disk (``device_map``), and
    detach it from accelerate's hooks so calibration can change its weights for good. Returns
    whether anything was offloaded."""
    hooked = [m for m in block.modules() if hasattr(m, "_hf_hook")]
    if not hooked:
        return False
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    def offload_hooks(hook: Any) -> list[Any]:
        inner = getattr(hook, "hooks", None)
        return [h for h in (inner if inner is not None else [hook]) if getattr(h, "offload", False)]

    any_offloaded = False
    for m in hooked:
        for hook in offload_hooks(m._hf_hook):
            weights_map = hook.weights_map
            device = hook.execution_device if hook.execution_device is not None else "cpu"
            tensors = [n for n, _ in m.named_parameters(recurse=hook.place_submodules)]
            if hook.offload_buffers:
                tensors += [n for n, _ in m.named_buffers(recurse=hook.place_submodules)]
            for name in tensors:
                if name in weights_map:
                    set_module_tensor_to_device(m, name, device, value=weights_map[name])
                    any_offloaded = True
    remove_hook_from_module(block, recurse=True)
    for name, p in block.named_parameters():
        if p.is_meta:
            raise RuntimeError(f"block parameter {name!r} is still on the meta device after onloading")
    return any_offloaded
