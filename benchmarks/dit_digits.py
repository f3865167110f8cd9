"""A real quality benchmark for quantized diffusion transformers: a class-conditional DiT trained on
scikit-learn's handwritten digits, then quantized through ``pipe.enable_quant`` and judged by what
it generates.

There are no pretrained DiT weights on the development machines, so the script trains one:
diffusers' ``DiTTransformer2DModel`` on the 1,797 8x8 digits of ``sklearn.datasets.load_digits``,
in pixel space (1 channel, 2x2 patches: 16 tokens), with the epsilon objective and DiT's built-in
10% label dropout (so classifier-free guidance works with ``DiTPipeline``'s null class 1000).

Metrics (fixed seeds; images generated with ``DiTPipeline`` + DDIM):

* **accuracy**: a digits classifier (scikit-learn MLP trained on the real digits) reads the class
  of every generated image; the fraction that matches the requested class;
* **FD**: Frechet distance between generated and real digits in that classifier's hidden-layer
  feature space (the digits analogue of FID);
* **PSNR**: quantized vs float images generated from the same noise.

Usage::

    python benchmarks/dit_digits.py train      # ~14 min on 1 CPU thread; writes assets/dit-digits/
    python benchmarks/dit_digits.py evaluate   # the table; writes docs/dit_digits.json and .png
    python benchmarks/dit_digits.py --quick    # seconds: tiny training + evaluation (tests use it)
    python benchmarks/dit_digits.py evaluate --eval-seeds 4 --only "REGEX" --out DIR   # each row from 4 noise seeds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
ASSET = REPO / "assets" / "dit-digits"
DOCS = REPO / "docs"

NUM_CLASSES = 1000  # DiTPipeline hard-codes the null (unconditional) class id 1000
MODEL_CONFIG = dict(
    num_attention_heads=3, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=4, sample_size=8,
    patch_size=2, num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero", dropout=0.0,
)
QUICK_CONFIG = dict(MODEL_CONFIG, num_attention_heads=2, attention_head_dim=16, num_layers=2)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True, prediction_type="epsilon")


# ---- data ------------------------------------------------------------------------------------------


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits as ``(N, 1, 8, 8)`` floats in [-1, 1] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


# ---- the pixel-space "VAE" -----------------------------------------------------------------------


def pixel_decoder():
    """An identity decoder with the interface ``DiTPipeline`` calls (``config.scaling_factor``,
    ``decode(z).sample``): the DiT works in pixel space."""
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.modeling_utils import ModelMixin

    class PixelDecoder(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, scaling_factor: float = 1.0) -> None:
            super().__init__()
            # diffusers finds a pipeline's device from its modules' tensors
            self.register_buffer("anchor", torch.zeros(()), persistent=False)

        def decode(self, z: torch.Tensor, return_dict: bool = True):
            return DecoderOutput(sample=z) if return_dict else (z,)

    return PixelDecoder()


def make_pipeline(transformer):
    from diffusers import DDIMScheduler, DiTPipeline

    pipe = DiTPipeline(transformer=transformer, vae=pixel_decoder(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- training ---------------------------------------------------------------------------------------


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, model_config: dict,
          progress: bool = True) -> dict[str, Any]:
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    x, y = load_digits_tensors()
    model = DiTTransformer2DModel(**model_config)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 50)
    lr_at = lambda s: lr * min(1.0, (s + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * s / steps)) * 0.9 + 0.1)  # noqa: E731
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema_decay = 0.999 if steps >= 1000 else 0.9
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    losses = []
    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress, mininterval=5)
    for step in bar:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
        x0 = x[idx]
        # light augmentation: shift by up to one pixel (digits are centred, not fixed in place)
        if step % 2:
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            x0 = torch.roll(x0, shifts=(dy, dx), dims=(2, 3))
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        pred = model(xt, timestep=t, class_labels=y[idx]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(ema_decay).add_(v.detach(), alpha=1 - ema_decay) if v.is_floating_point() else ema[k].copy_(v)
        losses.append(float(loss))
        if step % 200 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
    wall = time.perf_counter() - t0
    model.load_state_dict(ema)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)  # fp16 storage keeps the asset small; load in float32
    info = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "ema_decay": ema_decay,
        "train_wall_s": round(wall, 1), "final_loss_avg_last_500": round(float(np.mean(losses[-500:])), 5),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "model_config": model_config,
        "scheduler_config": SCHEDULER_CONFIG, "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_model(path: Path):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32).eval()


# ---- the judge: a digits classifier and its feature space ----------------------------------------


class DigitsJudge:
    """An MLP classifier trained on 75% of the real digits (the rest measures its own accuracy);
    its hidden layer is the feature space of the Frechet distance."""

    def __init__(self, seed: int = 0) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        d = load_digits()
        x = d.data / 16.0
        xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.25, random_state=seed, stratify=d.target)
        self.clf = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=1000, random_state=seed).fit(xtr, ytr)
        self.real_accuracy = float(self.clf.score(xte, yte))
        self.real = x
        self.real_features = self.features(x)
        self.real_split_fd = frechet_distance(self.features(xtr), self.features(xte))

    def features(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.clf.predict(images.reshape(len(images), -1)) == labels).mean())

    def fd(self, images: np.ndarray) -> float:
        return frechet_distance(self.features(images.reshape(len(images), -1)), self.real_features)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, the trace of the matrix square root
    taken as the sum of square roots of the eigenvalues of ``S_a^(1/2) S_b S_a^(1/2)`` (symmetric,
    so stable for the rank-deficient covariances of ReLU features)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    mid = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = float(np.sqrt(np.clip(mid, 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ---- generation and the table -------------------------------------------------------------------------


@torch.no_grad()
def generate(pipe, per_class: int, steps: int, guidance: float, seed: int, batch: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of each digit, as ``(N, 8, 8)`` in [0, 1], and their requested labels."""
    labels = np.repeat(np.arange(10), per_class)
    out = []
    for i in range(0, len(labels), batch):
        lab = labels[i : i + batch].tolist()
        img = pipe(class_labels=lab, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator("cpu").manual_seed(seed + i), output_type="pt").images
        out.append(img[:, 0].float().numpy())
    return np.concatenate(out), labels


def to_judge(images: np.ndarray) -> np.ndarray:
    """Images at the judge's 8x8 (a model generating 16x16 digits, ``assets/dit-digits16``, is
    averaged over 2x2 pixels, as ``fast_attention_quality.py`` does)."""
    k = images.shape[-1] // 8
    if k <= 1:
        return images
    n, h, w = images.shape
    return images.reshape(n, h // k, k, w // k, k).mean(axis=(2, 4))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def recipes(quick: bool) -> list[tuple[str, Any, dict[str, Any]]]:
    """(row name, config, enable_quant keyword arguments); ``None`` is the float model."""
    import piecewise_quant as pq
    from piecewise_quant.integrations.diffusers.recipes import conditioning_scheme, diffusion_recipe

    g = 16 if quick else 32
    u8 = dict(bits=8, grid="uniform", group_size="channel", modules_to_not_convert=[])
    w = lambda grid, bits, **kw: pq.PiecewiseQuantConfig(bits=bits, grid=grid, group_size=g, modules_to_not_convert=[], **kw)  # noqa: E731
    rows = [
        ("float", None, {}),
        ("W8A8 static, shared scales", pq.PiecewiseQuantConfig(act_bits=8, act_mode="static_per_tensor", **u8),
         {"act_scales": "shared"}),
        ("W8A8 static, per-timestep scales", pq.PiecewiseQuantConfig(act_bits=8, act_mode="static_per_tensor", **u8),
         {"act_scales": "per_timestep"}),
        ("W8A8 dynamic per-token", pq.PiecewiseQuantConfig(act_bits=8, **u8), {}),
        (f"W4A16 uniform g{g}", w("uniform", 4), {}),
        (f"W4A16 piecewise g{g}", w("piecewise", 4), {}),
    ]
    if quick:
        return rows
    rows += [
        (f"W4A8 uniform g{g}, per-token acts", w("uniform", 4, act_bits=8), {}),
        (f"W4A8 piecewise g{g}, per-token acts", w("piecewise", 4, act_bits=8), {}),
        (f"W4A8 piecewise g{g}, group-wise acts (G={g})", w("piecewise", 4, act_bits=8), {"act_group_size": g}),
        (f"W3A16 uniform g{g}", w("uniform", 3), {}),
        (f"W3A16 piecewise g{g}", w("piecewise", 3), {}),
        ("mixed: 4-bit piecewise attn/MLP + 8-bit uniform embeddings/adaLN/output layer, A8",
         diffusion_recipe(bits=4, group_size=g, act_bits=8), {}),
        (f"W4A16 piecewise g{g} + GPTQ (calibrated through the pipeline)", w("piecewise", 4, calibration="gptq"), {}),
        # ViDiT-Q's channel balance (smoothing scale over all timesteps + Hadamard, dynamic per-token acts)
        (f"W4A8 piecewise g{g} + GPTQ", w("piecewise", 4, act_bits=8, calibration="gptq"), {}),
        (f"W4A8 piecewise g{g} + balance", w("piecewise", 4, act_bits=8, rotation=BALANCE), {}),
        (f"W4A8 piecewise g{g} + balance + GPTQ", w("piecewise", 4, act_bits=8, rotation=BALANCE, calibration="gptq"), {}),
        (f"W4A4 piecewise g{g}, per-token acts (no balance)", w("piecewise", 4, act_bits=4), {}),
        (f"W4A4 piecewise g{g} + balance", w("piecewise", 4, act_bits=4, rotation=BALANCE), {}),
        (f"W4A4 piecewise g{g} + balance + GPTQ", w("piecewise", 4, act_bits=4, rotation=BALANCE, calibration="gptq"), {}),
        # SVDQuant: a 16-bit low-rank branch (rank from a budget of +1 bit per weight) beside the 4-bit residual
        (f"W4A4 piecewise g{g} + low-rank (+1 bit/weight) + GPTQ", w("piecewise", 4, act_bits=4, low_rank=1.0,
                                                                     calibration="gptq"), {}),
        (f"W4A4 piecewise g{g} + balance + low-rank (+1 bit/weight) + GPTQ",
         w("piecewise", 4, act_bits=4, low_rank=1.0, rotation=BALANCE, calibration="gptq"), {}),
        (f"W4A8 piecewise g{g} + balance + low-rank (+1 bit/weight) + GPTQ",
         w("piecewise", 4, act_bits=8, low_rank=1.0, rotation=BALANCE, calibration="gptq"), {}),
        # FP4 (HQ-DiT): E2M1 weights and activations with MX (block 32) or NV (block 16) scales
        ("W4A8 mxfp4 weights", fp4("mxfp4", act_bits=8), {}),
        ("W4A4 mxfp4 weights and activations", fp4("mxfp4", act_bits=4, act_format="mxfp4"), {}),
        ("W4A4 nvfp4 weights and activations", fp4("nvfp4", act_bits=4, act_format="nvfp4"), {}),
        ("W4A4 mxfp4 + balance", fp4("mxfp4", act_bits=4, act_format="mxfp4", rotation=BALANCE), {}),
        ("W4A4 nvfp4 + balance", fp4("nvfp4", act_bits=4, act_format="nvfp4", rotation=BALANCE), {}),
        # the recipe: embeddings, adaLN and output layers on 8-bit weights with float activations
        (f"recipe W4A4 piecewise g{g} (8-bit conditioning + output layer, float acts) + balance + GPTQ",
         diffusion_recipe(bits=4, group_size=g, act_bits=4, balance=True, calibration="gptq"), {}),
        (f"recipe W4A4 piecewise g{g} (8-bit conditioning + output layer, float acts) + balance + low-rank "
         "(+1 bit/weight) + GPTQ",
         diffusion_recipe(bits=4, group_size=g, act_bits=4, balance=True, low_rank=1.0, calibration="gptq"), {}),
        # asymmetric per-token activations (a scale and an offset per token: all 2^bits levels on the token's range)
        (f"W4A8 piecewise g{g} + balance + GPTQ, asymmetric A8",
         w("piecewise", 4, act_bits=8, act_mode=ASYM, rotation=BALANCE, calibration="gptq"), {}),
        (f"W4A4 piecewise g{g} + balance + GPTQ, asymmetric A4",
         w("piecewise", 4, act_bits=4, act_mode=ASYM, rotation=BALANCE, calibration="gptq"), {}),
        (f"recipe W4A4 piecewise g{g} (8-bit conditioning + output layer, float acts) + balance + GPTQ, asymmetric A4",
         diffusion_recipe(bits=4, group_size=g, act_bits=4, act_mode=ASYM, balance=True, calibration="gptq"), {}),
        # group-wise dynamic int4 activations (one scale per token and per group of channels, as NVFP4's blocks)
        *[(f"W4A4 piecewise g{g} + balance + GPTQ, group-wise acts (G={a})",
           w("piecewise", 4, act_bits=4, rotation=BALANCE, calibration="gptq"), {"act_group_size": a}) for a in (32, 16)],
        *[(f"W4A4 piecewise g{g} + balance + GPTQ, group-wise acts (G={a}), asymmetric A4",
           w("piecewise", 4, act_bits=4, act_mode=ASYM, rotation=BALANCE, calibration="gptq"), {"act_group_size": a})
          for a in (32, 16)],
        (f"W4A4 piecewise g{g} + balance + low-rank (+1 bit/weight) + GPTQ, group-wise acts (G=16), asymmetric A4",
         w("piecewise", 4, act_bits=4, act_mode=ASYM, low_rank=1.0, rotation=BALANCE, calibration="gptq"),
         {"act_group_size": 16}),
        # the recipe's 8-bit, float-activation output layer (proj_out_2) on the best W4A4 activations above
        (f"recipe W4A4 piecewise g{g} (8-bit conditioning + output layer, float acts) + balance + GPTQ, "
         "group-wise acts (G=16), asymmetric A4",
         diffusion_recipe(bits=4, group_size=g, act_bits=4, act_mode=ASYM, balance=True, calibration="gptq"),
         {"act_group_size": 16}),
        (f"recipe W4A4 piecewise g{g} (8-bit conditioning + output layer, float acts) + balance + low-rank "
         "(+1 bit/weight) + GPTQ, group-wise acts (G=16), asymmetric A4",
         diffusion_recipe(bits=4, group_size=g, act_bits=4, act_mode=ASYM, balance=True, low_rank=1.0, calibration="gptq"),
         {"act_group_size": 16}),
        (f"W4A4 piecewise g{g} + balance + GPTQ, group-wise acts (G=16), asymmetric A4, output layer 8-bit float acts",
         w("piecewise", 4, act_bits=4, act_mode=ASYM, rotation=BALANCE, calibration="gptq",
           overrides={"proj_out_2": conditioning_scheme()}),
         {"act_group_size": 16}),
        (f"W4A4 piecewise g{g} + balance + low-rank (+1 bit/weight) + GPTQ, group-wise acts (G=16), asymmetric A4, "
         "output layer 8-bit float acts",
         w("piecewise", 4, act_bits=4, act_mode=ASYM, low_rank=1.0, rotation=BALANCE, calibration="gptq",
           overrides={"proj_out_2": conditioning_scheme()}),
         {"act_group_size": 16}),
        # every weight on 4 bits: the conditioning layers on the 4-bit piecewise grid (float activations)
        (f"recipe W4A4 piecewise g{g} (4-bit conditioning + output layer, float acts) + balance + low-rank "
         "(+1 bit/weight) + GPTQ, group-wise acts (G=16), asymmetric A4",
         diffusion_recipe(bits=4, group_size=g, act_bits=4, act_mode=ASYM, balance=True, low_rank=1.0, calibration="gptq",
                          conditioning_bits=4, conditioning_grid="piecewise"),
         {"act_group_size": 16}),
        # W4A8 with the output layer kept on 8-bit weights and float activations
        (f"W4A8 piecewise g{g} + balance + GPTQ, output layer 8-bit float acts",
         w("piecewise", 4, act_bits=8, rotation=BALANCE, calibration="gptq",
           overrides={"proj_out_2": conditioning_scheme()}), {}),
        (f"recipe W4A8 piecewise g{g} (8-bit conditioning + output layer, float acts) + balance + GPTQ",
         diffusion_recipe(bits=4, group_size=g, act_bits=8, balance=True, calibration="gptq"), {}),
        # activation clip ratio per layer, chosen on the calibration rows (calibration act_clip_search)
        (f"W4A4 piecewise g{g} + balance + GPTQ + act clip search",
         w("piecewise", 4, act_bits=4, rotation=BALANCE, calibration=CLIP), {}),
        (f"W4A4 piecewise g{g} + balance + GPTQ + act clip search, asymmetric A4",
         w("piecewise", 4, act_bits=4, act_mode=ASYM, rotation=BALANCE, calibration=CLIP), {}),
        # mixed precision: 4- or 8-bit piecewise per layer by measured sensitivity, average <= 5 bits/weight
        (f"mixed W4/W8 piecewise g{g} (<= 5.0 bits/weight) A8 + GPTQ", w("piecewise", 4, act_bits=8, calibration=MIXED5), {}),
        (f"mixed W4/W8 piecewise g{g} (<= 5.0 bits/weight) A8 + balance + GPTQ",
         w("piecewise", 4, act_bits=8, rotation=BALANCE, calibration=MIXED5), {}),
        # MixDQ: metric-decoupled sensitivities (content layers by image error, the rest by denoiser SQNR)
        (f"MixDQ W5 (4/8-bit codes, avg 5) piecewise g{g} A8 + GPTQ",
         mixdq(w("piecewise", 4, act_bits=8), 5.0, "codes", calibration="gptq"), {}),
        (f"MixDQ <= 5.0 bits/weight piecewise g{g} A8 + GPTQ",
         mixdq(w("piecewise", 4, act_bits=8), 5.0, "bits_per_weight", calibration="gptq"), {}),
        (f"MixDQ W5 (4/8-bit codes, avg 5) piecewise g{g} A8 + balance + GPTQ",
         mixdq(w("piecewise", 4, act_bits=8), 5.0, "codes", calibration="gptq", rotation=BALANCE), {}),
    ]
    return rows


def fp4(grid: str, **kw: Any):
    import piecewise_quant as pq

    return pq.PiecewiseQuantConfig(grid=grid, bits=4, modules_to_not_convert=[], **kw)


def mixdq(base: Any, budget: float, unit: str, **extra: Any):
    """A row whose config is planned on the pipeline by ``mixdq_plan`` (with the calibration runs'
    prompts and seed), then given ``extra`` fields (calibration recipe, rotation)."""
    import dataclasses

    from piecewise_quant.integrations.diffusers import mixdq_plan

    def plan(pipe, calib: dict[str, Any]):
        keep = {k: calib[k] for k in ("calibration_prompts", "num_inference_steps", "guidance_scale", "seed",
                                      "calibration_batch_size")}
        p = mixdq_plan(pipe, base, weight_budget=budget, budget_unit=unit, progress=False, **keep)
        return dataclasses.replace(p.config, **extra)
    return plan


ASYM = "dynamic_per_token_asym"  # act_mode: a scale and an offset per token
BALANCE = {"rotations": ["balance"]}  # balance_alpha "auto": chosen per layer on the calibration inputs
MIXED5 = {"gptq": True, "mixed_precision_budget": 5.0, "mixed_precision_bits": [4, 8],
          "mixed_precision_grids": ["piecewise"]}
CLIP = {"gptq": True, "act_clip_search": True}  # GPTQ, then each layer's activation clip ratio chosen on its calibration rows


def select(rows: list, pattern: str | None) -> list:
    """The float row plus the rows whose name matches the regular expression ``pattern``."""
    if not pattern:
        return rows
    import re

    return [r for r in rows if r[1] is None or re.search(pattern, r[0])]


def eval_seeds(n: int) -> list[int]:
    """The noise seeds of ``--eval-seeds n``: 0 (every table's seed), then 100000 (the float row's
    "other seed"), 200000, ..."""
    if n < 1:
        raise SystemExit(f"--eval-seeds must be at least 1; got {n}")
    return [100000 * k for k in range(n)]


def evaluate(model_path: Path, per_class: int, steps: int, guidance: float, quick: bool, progress: bool = True,
             only: str | None = None, n_seeds: int = 1) -> dict[str, Any]:
    """Every selected row's images from noise seed 0, judged; with ``n_seeds`` > 1 each row is also
    generated from the other :func:`eval_seeds` and judged per seed (``row["seeds"]``), its PSNR
    taken against the float images of the same seed."""
    from piecewise_quant.integrations.diffusers import register_with_diffusers

    register_with_diffusers()
    judge = DigitsJudge()
    pipe = make_pipeline(load_model(model_path))
    float_total = sum(t.numel() * t.element_size()
                      for t in list(pipe.transformer.parameters()) + list(pipe.transformer.buffers()))
    calib = dict(calibration_prompts=list(range(10)), num_inference_steps=steps, guidance_scale=guidance, seed=12345,
                 calibration_batch_size=10, progress=False)
    results: dict[str, Any] = {
        "settings": {"per_class": per_class, "steps": steps, "guidance_scale": guidance, "scheduler": "DDIM",
                     "eval_seeds": [0, 100000], "calibration": "10 class labels x 1 run, seed 12345"},
        "judge": {"real_test_accuracy": judge.real_accuracy, "real_train_vs_test_fd": judge.real_split_fd},
        "rows": [],
    }
    if n_seeds > 1:
        results["settings"]["row_seeds"] = eval_seeds(n_seeds)
    ref_by_seed: dict[int, np.ndarray] = {}  # the float images of each noise seed
    samples: dict[str, np.ndarray] = {}
    for name, config, kwargs in select(recipes(quick), only):
        t0 = time.perf_counter()
        if config is None:
            report = None
            bpw, total = 32.0, float_total
        else:
            if callable(config):  # planned on the pipeline first (MixDQ)
                config = config(pipe, calib)
            report = pipe.enable_quant(config, **calib, **kwargs)
            comp = report.components["transformer"]
            bpw, total = comp.bits_per_weight, comp.total_bytes
        q_s = time.perf_counter() - t0
        images, labels = generate(pipe, per_class, steps, guidance, seed=0)
        images = to_judge(images)
        row = {
            "name": name, "bits_per_weight": round(bpw, 3), "weight_bytes": int(total),
            "accuracy": judge.accuracy(images, labels), "fd": judge.fd(images),
            "quantize_s": round(q_s, 1), "generate_s": round(time.perf_counter() - t0 - q_s, 1),
        }
        if config is None:
            ref_by_seed[0] = images
            row["psnr_vs_float"] = float("inf")
            other, olabels = generate(pipe, per_class, steps, guidance, seed=100000)
            other = to_judge(other)
            ref_by_seed[100000] = other
            results["float_other_seed"] = {"accuracy": judge.accuracy(other, olabels), "fd": judge.fd(other)}
        else:
            row["psnr_vs_float"] = psnr(images, ref_by_seed[0])
        if n_seeds > 1:
            row["seeds"] = [{"seed": 0, "accuracy": row["accuracy"], "fd": row["fd"], "psnr_vs_float": row["psnr_vs_float"]}]
            for seed in eval_seeds(n_seeds)[1:]:
                if config is None and seed in ref_by_seed:  # the "other seed" images, already made
                    more, more_labels = ref_by_seed[seed], labels
                else:
                    more, more_labels = generate(pipe, per_class, steps, guidance, seed=seed)
                    more = to_judge(more)
                if config is None:
                    ref_by_seed[seed] = more
                row["seeds"].append({"seed": seed, "accuracy": judge.accuracy(more, more_labels), "fd": judge.fd(more),
                                     "psnr_vs_float": psnr(more, ref_by_seed[seed])})
            row["accuracy_mean"] = float(np.mean([r["accuracy"] for r in row["seeds"]]))
            row["fd_mean"] = float(np.mean([r["fd"] for r in row["seeds"]]))
        if config is not None:
            pipe.disable_quant()
        results["rows"].append(row)
        samples[name] = images[::per_class]  # one of each digit
        if progress:
            print(f"  {name}: acc {row['accuracy']:.3f}  FD {row['fd']:.2f}  PSNR {row['psnr_vs_float']:.1f}", file=sys.stderr)
    results["samples"] = samples
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        "| configuration | bits/weight | weight bytes | accuracy | FD | PSNR vs float (dB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    seeds = results["settings"].get("row_seeds")
    if seeds:
        lines[0] += f" accuracy, {len(seeds)} seeds: mean (min-max) | FD, {len(seeds)} seeds: mean (min-max) |"
        lines[1] += "---:|---:|"
    for r in results["rows"]:
        p = "—" if r["psnr_vs_float"] == float("inf") else f"{r['psnr_vs_float']:.1f}"
        bpw = "32 (float)" if r["name"] == "float" else f"{r['bits_per_weight']:.3f}"
        line = f"| {r['name']} | {bpw} | {r['weight_bytes']:,} | {r['accuracy']:.3f} | {r['fd']:.2f} | {p} |"
        if seeds:
            acc, fd = [x["accuracy"] for x in r["seeds"]], [x["fd"] for x in r["seeds"]]
            line += (f" {r['accuracy_mean']:.3f} ({min(acc):.3f}-{max(acc):.3f}) |"
                     f" {r['fd_mean']:.2f} ({min(fd):.2f}-{max(fd):.2f}) |")
        lines.append(line)
    o = results["float_other_seed"]
    j = results["judge"]
    lines.append("")
    lines.append(
        f"Noise: float with other noise seeds gives accuracy {o['accuracy']:.3f}, FD {o['fd']:.2f}. "
        f"Judge: {j['real_test_accuracy']:.3f} accuracy on held-out real digits; FD between real train and test "
        f"digits {j['real_train_vs_test_fd']:.2f}."
    )
    return "\n".join(lines)


SAMPLES_TITLE = "DiT on sklearn digits: one sample per class, same noise in every row"


def save_outputs(results: dict[str, Any], out_dir: Path, stem: str = "dit_digits", title: str = SAMPLES_TITLE) -> None:
    """``<stem>.json`` (the results without the images) and ``<stem>.png``: one sample per digit
    for every configuration, a row each, under ``title``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples")
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    names = list(samples)
    fig, axes = plt.subplots(len(names), 10, figsize=(10 * 0.7, len(names) * 0.75))
    axes = np.atleast_2d(axes)
    for i, name in enumerate(names):
        for k in range(10):
            ax = axes[i, k]
            ax.imshow(samples[name][k], cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.png", dpi=110)
    plt.close(fig)


def parser(doc: str | None, asset: Path, steps: int, batch_size: int) -> argparse.ArgumentParser:
    """The command line this script and ``text_digits.py`` share (train / evaluate a bundled model)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", choices=["train", "evaluate", "all"], default="evaluate")
    ap.add_argument("--quick", action="store_true", help="tiny training run and evaluation (seconds); outputs to --out")
    ap.add_argument("--model", type=Path, default=asset, help=f"checkpoint directory (default: assets/{asset.name})")
    ap.add_argument("--out", type=Path, default=None, help="where JSON/PNG go (default: docs/, or a temp dir with --quick)")
    ap.add_argument("--steps", type=int, default=steps, help="training steps")
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--per-class", type=int, default=50, help="generated images per digit")
    ap.add_argument("--sample-steps", type=int, default=20, help="DDIM steps when generating")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="regular expression: evaluate only the matching rows (and float)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, ASSET, steps=3000, batch_size=128)
    ap.add_argument("--eval-seeds", type=int, default=1,
                    help="generate every row from this many noise seeds (0, 100000, ...) and add their mean and range "
                         "to the table (default 1: seed 0 only)")
    args = ap.parse_args(argv)
    eval_seeds(args.eval_seeds)
    torch.set_num_threads(args.threads)
    if args.quick:
        import tempfile

        out = args.out or Path(tempfile.mkdtemp(prefix="dit_digits_quick_"))
        info = train(out / "model", 20, 32, 1e-3, 0, QUICK_CONFIG, progress=False)
        print(f"trained {info['parameters']:,} parameters for {info['steps']} steps in {info['train_wall_s']} s")
        results = evaluate(out / "model", per_class=2, steps=4, guidance=args.guidance, quick=True, progress=False,
                           n_seeds=args.eval_seeds)
        print(table(results))
        save_outputs(results, out)
        print(f"wrote {out / 'dit_digits.json'}")
        return 0
    if args.command in ("train", "all"):
        info = train(args.model, args.steps, args.batch_size, args.lr, 0, MODEL_CONFIG)
        print(json.dumps(info, indent=2))
    if args.command in ("evaluate", "all"):
        t0 = time.perf_counter()
        results = evaluate(args.model, args.per_class, args.sample_steps, args.guidance, quick=False, only=args.only,
                           n_seeds=args.eval_seeds)
        results["settings"]["wall_s"] = round(time.perf_counter() - t0, 1)
        results["settings"]["threads"] = torch.get_num_threads()
        print(table(results))
        if args.only and args.out is None:  # a partial table never replaces the full one in docs/
            return 0
        save_outputs(results, args.out or DOCS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
