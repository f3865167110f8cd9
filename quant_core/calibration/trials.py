"""Rotation trials (``CalibrationConfig(rotation_trials=K)``): calibrate with ``K`` rotation seeds,
keep the one whose quantized model is closest to the float model on held-aside samples.

A random Hadamard rotation spreads outliers evenly on average, but at 4-bit activations how well a
given draw does varies from seed to seed by more than most calibration steps change the result
(on the bundled Llama one W4A4 recipe gives +0.40 to +0.64 held-out perplexity over 20 seeds). The seed is free:
the rotation is rebuilt from it on load, so any seed costs the same at run time. Each trial is a
full calibration of a copy of the float model with ``rotation.seed + t``, scored by its distance
to the float model; then ``model`` itself is calibrated with the best seed, so its config and
checkpoint name that seed and nothing else changes.

Scored on what: samples of the calibration data that the calibration does not use, up to
``max(n_samples, TRIAL_SCORE_SAMPLES)`` of them (the next windows of the same seeded draw, or the
rows after the calibration rows of a 2-D id tensor;
:func:`~piecewise_quant.calibration.data.held_aside_batches`). GPTQ fits the calibration batches,
and how closely it fits them differs from seed to seed, so a distance taken on those batches says
little about other text; and the seeds' distances differ by a few percent, so the score needs many
windows to rank them. On the bundled Llama over 20 seeds (docs/rotation.md#rotation-trials) the
rank correlation with held-out perplexity is +0.20 on the 32 calibration windows, +0.32 on 32
held-aside windows and +0.46 on 256. Data given as model-input dicts has nothing to hold aside:
then the calibration batches are used, with a warning.

Distance: the mean KL divergence of the quantized model's next-token distribution from the float
model's, over real tokens, when the model returns ``logits``; otherwise the relative squared error
of its first output tensor (an encoder's hidden states, a denoiser's prediction).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import CalibrationConfig, PiecewiseQuantConfig
from .blocks import _accepts_use_cache

__all__ = ["calibrate_with_rotation_trials", "distance_to_float", "TRIAL_SCORE_SAMPLES"]

TRIAL_SCORE_SAMPLES = 256
"""Held-aside samples a trial is scored on, at least (``n_samples`` when that is larger); fewer when
the data has fewer beyond the calibration samples."""

logger = logging.getLogger(__name__)


def calibrate_with_rotation_trials(model: nn.Module, config: PiecewiseQuantConfig, cal: CalibrationConfig,
                                   batches: list[dict[str, Any]], calibrate: Callable[..., Any], progress: bool,
                                   score_batches: list[dict[str, Any]] | None = None) -> Any:
    """Run ``cal.rotation_trials`` calibrations of copies of ``model`` on ``batches`` (rotation
    seeds ``seed``, ``seed + 1``, ...), then ``calibrate`` ``model`` in place with the seed whose
    copy is closest to the float model on ``score_batches`` (``None``: on ``batches``, with a
    warning). Returns that last call's report, with ``rotation_trials`` set to the list of
    ``(seed, distance)``."""
    hooked = [n for n, m in model.named_modules() if hasattr(m, "_hf_hook")]
    if hooked:
        raise ValueError(
            f"calibration.rotation_trials={cal.rotation_trials} calibrates copies of the model, and this model is "
            f"dispatched by accelerate (device_map; e.g. {hooked[0] or 'the model'!r} has a hook), whose offloaded "
            "weights a copy would share; load it on one device, or set rotation_trials=1 and choose rotation.seed"
        )
    if score_batches is None:
        logger.warning(
            "rotation_trials: the calibration data leaves no samples aside (model-input dicts, or no window beyond "
            "the %d calibration samples), so the trials are scored on the calibration batches themselves, which "
            "predicts the seed's quality on other text less well; give text or token ids with more than n_samples "
            "windows", cal.n_samples)
        score_batches = batches
    rot = config.rotation
    base = rot.seed
    single = dataclasses.replace(cal, rotation_trials=1)
    scores: list[tuple[int, float]] = []
    bar = tqdm(range(cal.rotation_trials), desc="rotation trials", unit="seed", disable=not progress)
    for t in bar:  # ``model`` stays float until the last call: it is both the copies' source and the reference
        seed = base + t
        trial = copy.deepcopy(model)
        trial_cfg = dataclasses.replace(config, rotation=dataclasses.replace(rot, seed=seed), calibration=single)
        calibrate(trial, trial_cfg, batches, progress=False)
        scores.append((seed, distance_to_float(trial, model, score_batches)))
        del trial
        bar.set_postfix(seed=seed, distance=f"{scores[-1][1]:.4g}")
    best = min(scores, key=lambda s: (s[1], s[0]))[0]
    logger.info("rotation trials (seed, distance to float): %s; keeping seed %d", scores, best)
    chosen = dataclasses.replace(config, rotation=dataclasses.replace(rot, seed=best), calibration=single)
    report = calibrate(model, chosen, batches, progress=progress)
    report.rotation_trials = scores
    return report


@torch.no_grad()
def distance_to_float(model: nn.Module, float_model: nn.Module, batches: list[dict[str, Any]]) -> float:
    """How far ``model``'s outputs are from ``float_model``'s on ``batches`` (see the module
    docstring); padding positions (``attention_mask == 0``) are left out."""
    was = model.training, float_model.training
    model.eval()
    float_model.eval()
    total, count = 0.0, 0.0
    extra = {"use_cache": False} if _accepts_use_cache(model) else {}
    try:
        for batch in batches:
            yq, yf = _primary(model(**batch, **extra)), _primary(float_model(**batch, **extra))
            mask = batch.get("attention_mask")
            if isinstance(yq, tuple):  # logits: KL(float || quantized) per real token
                lp_f = torch.log_softmax(yf[1].float(), dim=-1)
                lp_q = torch.log_softmax(yq[1].float(), dim=-1)
                kl = _real((lp_f.exp() * (lp_f - lp_q)).sum(-1, keepdim=True), mask)
                total += float(kl.double().sum())
                count += kl.numel()
            else:
                total += float(_real((yq.float() - yf.float()).pow(2), mask).double().sum())
                count += float(_real(yf.float().pow(2), mask).double().sum())
    finally:
        model.train(was[0])
        float_model.train(was[1])
    if count == 0:
        raise ValueError("rotation_trials: the calibration batches give no output to compare (no real tokens)")
    return total / count


def _real(x: torch.Tensor, mask: Any) -> torch.Tensor:
    """``x`` (``(batch, tokens, ...)``) without its padding positions, when ``mask`` lines up."""
    if isinstance(mask, torch.Tensor) and x.dim() >= 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask.to(x.device).bool()]
    return x


def _primary(out: Any) -> Any:
    """``("logits", tensor)`` for outputs with logits, else the first output tensor."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return ("logits", logits)
    if isinstance(out, torch.Tensor):
        return out
    for key in ("last_hidden_state", "sample"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    seq = out.to_tuple() if hasattr(out, "to_tuple") else out
    if isinstance(seq, (tuple, list)) and seq and isinstance(seq[0], torch.Tensor):
        return seq[0]
    raise TypeError(f"rotation_trials: cannot compare this model's output ({type(out).__name__}): it has no logits "
                    "and no tensor output")
