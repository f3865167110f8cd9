"""MixDQ's BOS-aware quantization (Zhao et al. 2024): token 0 of the text embeddings stays out of
quantization.

A causal text encoder (CLIP) gives its first token, the ``[BOS]`` / start-of-text token, the same
embedding for every prompt, and that embedding often carries huge outliers. Every layer that reads
the text embeddings token by token (PixArt's ``caption_projection`` and cross-attention
``attn2.to_k``/``attn2.to_v``; SD3's/Flux's ``context_embedder``) would quantize that row with the
rest: its outliers set the activation range (a static or per-tensor scale then leaves the real
tokens a handful of levels) and its output carries the weight's rounding error into every
cross-attention. Since the row never changes, its output can be computed once, from the float
weight, and reused.

``enable_quant(..., bos_aware=True)``:

1. records the denoiser's inputs over the calibration runs and checks that token 0 of
   ``encoder_hidden_states`` is one and the same vector across all calibration prompts (zero rows,
   the "no text" embedding some pipelines use for the unconditional branch, are ignored). If it
   differs, the encoder is not causal (T5: token 0 attends to the whole prompt) and there is no fixed
   row to keep: the call is refused with a ``ValueError``;
2. finds the layers that read the text embeddings token by token, by what they read rather than by
   name: on one recorded call, every text token but token 0 is perturbed; a planned ``nn.Linear``
   qualifies when its input has the text's length, row 0 is unchanged and the other rows changed
   (layers behind a cross-attention or a joint attention see every token mixed into every row and
   drop out). Of those, a layer keeps a BOS row only if its row-0 input is the same in every
   recorded call (SD3's/Flux's dual-stream ``add_k_proj`` modulate the text stream by the timestep,
   so their row 0 moves and they are left out, with the reason in the report);
3. stores, per qualifying layer, ``bos_input`` (its row-0 input) and ``bos_output`` (the float
   layer's output for it, computed before the weight is quantized), both float32 buffers.

At run time (:func:`bos_forward`), for each sample whose input row 0 matches ``bos_input``
(elementwise ``|x - b| <= 1e-3 * (|b| + mean|b|)``: float roundoff of another batch passes, another
token does not), row 0 is zeroed before the quantized path (so it neither sets a dynamic per-tensor
scale nor, while calibrating, a static one) and its output is replaced by ``bos_output``. A sample
whose row 0 does not match (another encoder, a prompt embedding built by hand) goes through the
quantized path unchanged: the stored row is never applied to a different token.

Cost: ``in_features + out_features`` float32 numbers per qualifying layer, one row comparison per
call, and the pipeline runs of the calibration prompts (shared with static-scale or recipe
calibration when those run too).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["BOS_RTOL", "BosReport", "bos_match", "bos_forward", "find_bos_rows", "install_bos_rows",
           "add_empty_bos_buffers", "text_embeddings"]

BOS_RTOL = 1e-3


def bos_match(rows: torch.Tensor, bos: torch.Tensor) -> torch.Tensor:
    """Which of ``rows`` (``(..., C)``) are the stored BOS vector ``bos`` (``(C,)``): elementwise
    ``|row - bos| <= BOS_RTOL * (|bos| + mean|bos|)``. Returns a bool tensor of shape ``rows.shape[:-1]``."""
    b = bos.to(device=rows.device, dtype=torch.float32)
    tol = BOS_RTOL * (b.abs() + b.abs().mean())
    return ((rows.to(torch.float32) - b).abs() <= tol).all(dim=-1)


def bos_forward(layer: nn.Module, x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``forward(x)`` with token 0 kept out of quantization where it is the stored BOS row (see the
    module docstring); ``layer`` holds the ``bos_input`` / ``bos_output`` buffers."""
    if x.dim() < 3 or x.shape[-2] == 0:
        return forward(x)
    hit = bos_match(x[..., 0, :], layer.bos_input)
    if not bool(hit.any()):
        return forward(x)
    x0 = torch.where(hit.unsqueeze(-1), torch.zeros((), dtype=x.dtype, device=x.device), x[..., 0, :])
    y = forward(torch.cat([x0.unsqueeze(-2), x[..., 1:, :]], dim=-2))
    y0 = torch.where(hit.unsqueeze(-1), layer.bos_output.to(device=y.device, dtype=y.dtype), y[..., 0, :])
    return torch.cat([y0.unsqueeze(-2), y[..., 1:, :]], dim=-2)


@dataclass
class BosReport:
    """What the BOS-aware search found in one denoiser.

    ``token0_absmax`` / ``other_tokens_absmax``: the largest magnitude of token 0 of the text
    embeddings and of every other token, over the calibration calls; ``layers``: the layers that
    got a BOS row, with the largest magnitude of their row-0 input and of their other rows;
    ``skipped``: text-reading layers left out, and why."""

    token0_absmax: float
    other_tokens_absmax: float
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        ratio = self.token0_absmax / self.other_tokens_absmax if self.other_tokens_absmax > 0 else float("inf")
        text = (f"BOS-aware: {len(self.layers)} layers keep token 0 in float ({', '.join(self.layers) or 'none'}); "
                f"text token 0 max|x| {self.token0_absmax:.3g} vs other tokens {self.other_tokens_absmax:.3g} "
                f"(x{ratio:.2f})")
        if self.skipped:
            text += "; left out: " + ", ".join(f"{k} ({v})" for k, v in self.skipped.items())
        return text

    def __str__(self) -> str:
        return self.summary()


def text_embeddings(record: dict[str, Any]) -> torch.Tensor | None:
    """The ``(batch, tokens, channels)`` text embeddings of one recorded denoiser call, if any."""
    e = record.get("encoder_hidden_states")
    return e if isinstance(e, torch.Tensor) and e.dim() == 3 else None


def _bos_embedding(records: list[dict[str, Any]], component: str, n_prompts: int) -> torch.Tensor:
    """Token 0 of the text embeddings, checked to be the same for every calibration prompt."""
    rows = []
    for rec in records:
        e = text_embeddings(rec)
        if e is None:
            raise ValueError(
                f"bos_aware=True: component {component!r} is not text-conditioned (its calls have no 3-D "
                "encoder_hidden_states); BOS-aware quantization applies to text-to-image pipelines (PixArt, SD3...)"
            )
        rows.append(e[:, 0].float())
    rows_t = torch.cat(rows)
    rows_t = rows_t[rows_t.abs().amax(-1) > 0]  # an all-zero row is a "no text" embedding, not a token
    if rows_t.shape[0] == 0:
        raise ValueError(f"bos_aware=True: token 0 of component {component!r}'s text embeddings is zero in every "
                         "calibration call; there is no BOS row to keep")
    bos = rows_t[0]
    same = bos_match(rows_t, bos)
    if not bool(same.all()):
        diff = float((rows_t[~same] - bos).abs().amax())
        raise ValueError(
            f"bos_aware=True: token 0 of the text embeddings of component {component!r} differs across the "
            f"calibration prompts (max |difference| {diff:.3g}, {int((~same).sum())} of {rows_t.shape[0]} rows), so the "
            "text encoder is not causal (a T5-style encoder, as in PixArt or Flux, gives token 0 a prompt-dependent "
            "embedding) and there is no fixed BOS row to keep in float; use bos_aware=False"
        )
    if n_prompts < 2:
        warnings.warn(
            "bos_aware=True with a single calibration prompt cannot check that token 0 is the same for every prompt "
            "(a causal encoder); give two or more calibration_prompts", stacklevel=4,
        )
    return bos


class _Capture:
    """Forward pre-hooks on named layers that keep each layer's first input of a call."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            def hook(module: nn.Module, args: tuple, _name: str = name) -> None:
                if args and isinstance(args[0], torch.Tensor) and _name not in self.inputs:
                    self.inputs[_name] = args[0].detach()

            self.handles.append(model.get_submodule(name).register_forward_pre_hook(hook))

    def run(self, model: nn.Module, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.inputs = {}
        model(**record)
        return self.inputs

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _text_side_layers(model: nn.Module, names: list[str], record: dict[str, Any]) -> list[str]:
    """The layers whose row 0 depends on token 0 of the text embeddings only (see the module docstring)."""
    e = text_embeddings(record)
    n_tokens = e.shape[1]
    if n_tokens < 2:
        return []
    g = torch.Generator().manual_seed(0)
    other = e.clone()
    noise = torch.randn(other[:, 1:].shape, generator=g, dtype=torch.float32).to(e.dtype)
    other[:, 1:] = other[:, 1:] + noise * (other[:, 1:].float().std() + 1.0).to(e.dtype)
    cap = _Capture(model, names)
    try:
        a = cap.run(model, record)
        b = cap.run(model, {**record, "encoder_hidden_states": other})
    finally:
        cap.close()
    found = []
    for name in names:
        xa, xb = a.get(name), b.get(name)
        if xa is None or xb is None or xa.dim() < 3 or xa.shape[-2] != n_tokens or xa.shape != xb.shape:
            continue
        if torch.equal(xa[..., 0, :], xb[..., 0, :]) and not torch.equal(xa[..., 1:, :], xb[..., 1:, :]):
            found.append(name)
    return found


@torch.no_grad()
def find_bos_rows(
    model: nn.Module, records: list[dict[str, Any]], plan: dict[str, Any], component: str, n_prompts: int,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], BosReport]:
    """On the float ``model`` and its recorded calls: ``{layer: (bos_input, bos_output)}`` for every
    planned layer that reads token 0 of the text embeddings unchanged in every call, and the report.
    Raises ``ValueError`` when token 0 is not the same for every prompt (a non-causal encoder)."""
    bos = _bos_embedding(records, component, n_prompts)
    token0 = max(float(text_embeddings(r)[:, 0].abs().amax()) for r in records)
    others = max(float(text_embeddings(r)[:, 1:].abs().amax()) if text_embeddings(r).shape[1] > 1 else 0.0
                 for r in records)
    names = [n for n in plan if isinstance(model.get_submodule(n), nn.Linear)]
    text_side = _text_side_layers(model, names, records[0])
    report = BosReport(token0, others)
    rows: dict[str, torch.Tensor] = {}
    bad: dict[str, str] = {}
    cap = _Capture(model, text_side)
    try:
        for rec in records:
            hit = bos_match(text_embeddings(rec)[:, 0], bos)
            inputs = cap.run(model, rec)
            for name in text_side:
                x = inputs.get(name)
                if name in bad or x is None:
                    continue
                if x.shape[0] != hit.shape[0]:
                    bad[name] = "its batch does not follow the text embeddings' batch"
                    continue
                x0 = x[..., 0, :][hit].reshape(-1, x.shape[-1])
                if x0.shape[0] == 0:
                    continue
                ref = rows.setdefault(name, x0[0].float().clone())
                if not bool(bos_match(x0, ref).all()):
                    bad[name] = "its row-0 input changes across calls (e.g. modulated by the timestep)"
                if name not in report.layers:
                    report.layers[name] = (float(x[..., 0, :].abs().amax()), float(x[..., 1:, :].abs().amax()))
    finally:
        cap.close()
    out = {}
    for name in text_side:
        if name in bad or name not in rows:
            report.skipped[name] = bad.get(name, "no calibration call had the BOS token")
            report.layers.pop(name, None)
            continue
        lin = model.get_submodule(name)
        inp = rows[name]
        out[name] = (inp, lin(inp.to(lin.weight.dtype).unsqueeze(0)).squeeze(0).float())
    return out, report


def install_bos_rows(model: nn.Module, rows: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give each quantized layer named in ``rows`` its ``bos_input`` / ``bos_output`` buffers."""
    for name, (inp, outp) in rows.items():
        layer = model.get_submodule(name)
        if not hasattr(layer, "set_bos_row"):
            raise TypeError(f"layer {name!r} is a {type(layer).__name__}, not a DiffusionQuantLinear; cannot keep a BOS row")
        layer.set_bos_row(inp, outp)


def add_empty_bos_buffers(model: nn.Module, plan: dict[str, Any], names: tuple[str, ...]) -> None:
    """Before a pre-quantized checkpoint loads: empty (meta) BOS buffers on the layers its config lists."""
    from piecewise_quant.checkpoint import CheckpointMismatchError

    unknown = [n for n in names if n not in plan]
    if unknown:
        raise CheckpointMismatchError(
            f"piecewise-quant: the checkpoint's diffusion.bos_layers name {unknown}, which its quantization_config "
            "does not quantize; the config.json is corrupt or belongs to another model"
        )
    for name in names:
        layer = model.get_submodule(name)
        layer.set_bos_row(torch.empty(layer.in_features, device="meta"), torch.empty(layer.out_features, device="meta"))
