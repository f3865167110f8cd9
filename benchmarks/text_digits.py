"""The text-conditioned counterpart of ``dit_digits.py``: a PixArt denoiser with a small causal text
encoder and a word-level tokenizer, trained here on scikit-learn's 8x8 handwritten digits with
captions such as "a handwritten seven", then quantized through ``pipe.enable_quant`` and judged by
what it generates for prompts it never saw in training.

Nothing can be downloaded on the development machines, so every part is built and trained here:

* **tokenizer**: the ``tokenizers`` package's ``WordLevel`` model over the caption vocabulary
  (lower-case, whitespace/punctuation split, ``[BOS] ... [EOS]`` then ``[PAD]``), wrapped as a
  transformers ``PreTrainedTokenizerFast``;
* **text encoder**: a 2-layer ``CLIPTextModel`` (width 64) from a config. It is causal, so token 0
  (``[BOS]``) gets the same embedding for every prompt: what MixDQ's BOS-aware quantization needs;
* **denoiser**: diffusers' ``PixArtTransformer2DModel`` (4 blocks, 3 heads x 32 = width 96, patch 2,
  pixel space 8x8: 16 tokens), cross-attending to the text embeddings;
* **pipeline**: :class:`TextDigitsPipeline`, diffusers' ``PixArtAlphaPipeline`` with defaults that
  fit this model (no resolution binning, 16 text tokens, no caption cleaning) and an identity "VAE".

Encoder and denoiser are trained jointly (epsilon objective, 10% of captions replaced by the empty
prompt, so classifier-free guidance works with the pipeline's default negative prompt ``""``).

Metrics (fixed seeds; DDIM; prompts from the held-out templates only): **accuracy** (the
``dit_digits`` digits classifier reads the digit the prompt names), **FD** (Frechet distance in that
classifier's feature space) and **PSNR** vs the float model's images from the same noise.

Usage::

    python benchmarks/text_digits.py train      # ~15 min on 1 CPU thread; writes assets/text-digits/
    python benchmarks/text_digits.py evaluate   # the table; writes docs/text_digits.json and .png
    python benchmarks/text_digits.py --quick    # seconds: tiny training + evaluation (tests use it)
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # ``python benchmarks/text_digits.py`` puts benchmarks/, not the root, on the path
    sys.path.insert(0, str(REPO))

from benchmarks import dit_digits as dd  # noqa: E402 - the data, the judge, FD and PSNR

ASSET = REPO / "assets" / "text-digits"
DOCS = REPO / "docs"

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {w}: the digit's name, {d}: the numeral
TRAIN_TEMPLATES = (
    "a handwritten {w}",
    "the digit {w}",
    "number {w}, written by hand",
    "a picture of the number {w}",
    "{w}",
    "handwritten digit {d}",
    "the number {d}",
    "a drawing of a {w}",
    "a small image of the digit {d}",
)
# used only for evaluation: new combinations of known words, plus "sketch" and "showing", which
# appear in no training caption (their embeddings stay as initialised)
HELD_OUT_TEMPLATES = (
    "a handwritten number {w}",
    "a sketch of the digit {w}",
    "an image showing a handwritten {d}",
)
SPECIAL = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
MAX_TOKENS = 16

TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu")
MODEL_CONFIG = dict(
    num_attention_heads=3, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=4, sample_size=8,
    patch_size=2, cross_attention_dim=96, caption_channels=TEXT_CONFIG["hidden_size"], norm_type="ada_norm_single",
    use_additional_conditions=False, dropout=0.0,
)
QUICK_TEXT_CONFIG = dict(TEXT_CONFIG, num_hidden_layers=1)
QUICK_CONFIG = dict(MODEL_CONFIG, num_attention_heads=2, attention_head_dim=16, num_layers=2, cross_attention_dim=32)
SCHEDULER_CONFIG = dd.SCHEDULER_CONFIG
CAPTION_DROPOUT = 0.1


# ---- captions and the tokenizer ---------------------------------------------------------------------


def caption(template: str, digit: int) -> str:
    return template.format(w=WORDS[digit], d=str(digit))


def vocabulary() -> list[str]:
    """Every word and punctuation mark of the train and held-out captions, after the special tokens."""
    from tokenizers.pre_tokenizers import Whitespace

    pre = Whitespace()
    words: set[str] = set()
    for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES:
        for d in range(10):
            words.update(w for w, _ in pre.pre_tokenize_str(caption(t, d).lower()))
    return list(SPECIAL) + sorted(words)


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast``: ``[BOS] words [EOS]``, padded with ``[PAD]`` to
    :data:`MAX_TOKENS` (position 0 is always ``[BOS]``)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]",
        model_max_length=MAX_TOKENS, padding_side="right",
    )


def build_text_encoder(tokenizer, config: dict):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config)
    return CLIPTextModel(cfg)


def encode(tokenizer, text_encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings and attention mask, exactly as ``PixArtAlphaPipeline.encode_prompt`` makes them."""
    t = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    return text_encoder(t.input_ids, attention_mask=t.attention_mask)[0], t.attention_mask


# ---- the pipeline ---------------------------------------------------------------------------------


def pixel_decoder():
    """The identity "VAE" of ``dit_digits`` with ``block_out_channels=[1]`` (``PixArtAlphaPipeline``
    derives its latent scale factor from it: 1, pixel space)."""
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.modeling_utils import ModelMixin

    class PixelDecoder(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, scaling_factor: float = 1.0, block_out_channels: tuple[int, ...] = (1,)) -> None:
            super().__init__()
            self.register_buffer("anchor", torch.zeros(()), persistent=False)

        def decode(self, z: torch.Tensor, return_dict: bool = True):
            return DecoderOutput(sample=z) if return_dict else (z,)

    return PixelDecoder()


def _pipeline_class():
    from diffusers import PixArtAlphaPipeline

    class TextDigitsPipeline(PixArtAlphaPipeline):
        """``PixArtAlphaPipeline`` with defaults for the 8x8 digits model: no resolution binning (its
        bins are for 256-1024 px), :data:`MAX_TOKENS` text tokens, no caption cleaning, guidance 2."""

        def __call__(self, prompt=None, negative_prompt: str = "", num_inference_steps: int = 20,
                     guidance_scale: float = 2.0, num_images_per_prompt: int = 1, generator=None,
                     output_type: str = "pt", return_dict: bool = True, **kwargs):
            kwargs.setdefault("use_resolution_binning", False)
            kwargs.setdefault("max_sequence_length", MAX_TOKENS)
            kwargs.setdefault("clean_caption", False)
            return super().__call__(prompt=prompt, negative_prompt=negative_prompt,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    num_images_per_prompt=num_images_per_prompt, generator=generator,
                                    output_type=output_type, return_dict=return_dict, **kwargs)

    return TextDigitsPipeline


def make_pipeline(transformer, tokenizer, text_encoder):
    """``TextDigitsPipeline`` (``PixArtAlphaPipeline``) + DDIM + the identity "VAE"."""
    from diffusers import DDIMScheduler

    pipe = _pipeline_class()(tokenizer=tokenizer, text_encoder=text_encoder, vae=pixel_decoder(),
                             transformer=transformer, scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(path: Path | str = ASSET):
    """The trained pipeline from ``path`` (``transformer/``, ``text_encoder/``, ``tokenizer/``), in float32."""
    path = Path(path)
    from diffusers import PixArtTransformer2DModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=torch.float32).eval()
    transformer = PixArtTransformer2DModel.from_pretrained(path / "transformer", torch_dtype=torch.float32).eval()
    return make_pipeline(transformer, tokenizer, text_encoder)


# ---- training ---------------------------------------------------------------------------------------


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, model_config: dict, text_config: dict,
          progress: bool = True) -> dict[str, Any]:
    from diffusers import DDPMScheduler, PixArtTransformer2DModel
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    x, y = dd.load_digits_tensors()
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer, text_config)
    model = PixArtTransformer2DModel(**model_config)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    params = list(model.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 50)
    lr_at = lambda s: lr * min(1.0, (s + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * s / steps)) * 0.9 + 0.1)  # noqa: E731
    modules = {"transformer": model, "text_encoder": text_encoder}
    ema = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
    ema_decay = 0.999 if steps >= 1000 else 0.9
    g = torch.Generator().manual_seed(seed)
    # every training caption tokenized once: ids[template, digit] and the empty (unconditional) prompt
    captions = [[caption(t, d) for d in range(10)] for t in TRAIN_TEMPLATES]
    tok = tokenizer([c for row in captions for c in row] + [""], padding="max_length", max_length=MAX_TOKENS,
                    truncation=True, return_tensors="pt")
    n_t = len(TRAIN_TEMPLATES)
    ids, mask = tok.input_ids[:-1].view(n_t, 10, -1), tok.attention_mask[:-1].view(n_t, 10, -1)
    empty_ids, empty_mask = tok.input_ids[-1], tok.attention_mask[-1]
    model.train()
    text_encoder.train()
    t0 = time.perf_counter()
    losses = []
    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress, mininterval=5)
    for step in bar:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
        x0, labels = x[idx], y[idx]
        if step % 2:  # shift by up to one pixel, as dit_digits does
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            x0 = torch.roll(x0, shifts=(dy, dx), dims=(2, 3))
        tmpl = torch.randint(0, n_t, (batch_size,), generator=g)
        b_ids, b_mask = ids[tmpl, labels].clone(), mask[tmpl, labels].clone()
        drop = torch.rand(batch_size, generator=g) < CAPTION_DROPOUT
        b_ids[drop], b_mask[drop] = empty_ids, empty_mask
        emb = text_encoder(b_ids, attention_mask=b_mask)[0]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        pred = model(xt, encoder_hidden_states=emb, encoder_attention_mask=b_mask, timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for n, m in modules.items():
                for k, v in m.state_dict().items():
                    e = ema[n][k]
                    e.mul_(ema_decay).add_(v.detach(), alpha=1 - ema_decay) if v.is_floating_point() else e.copy_(v)
        losses.append(loss.item())
        if step % 200 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
    wall = time.perf_counter() - t0
    for n, m in modules.items():
        m.load_state_dict(ema[n])
        m.eval()
    out.mkdir(parents=True, exist_ok=True)
    # fp16 storage keeps the asset small; load in float32
    model.to(torch.float16).save_pretrained(out / "transformer")
    text_encoder.to(torch.float16).save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    info = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "ema_decay": ema_decay,
        "caption_dropout": CAPTION_DROPOUT, "train_wall_s": round(wall, 1),
        "final_loss_avg_last_500": round(float(np.mean(losses[-500:])), 5), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "model_config": model_config, "text_config": text_config,
        "scheduler_config": SCHEDULER_CONFIG, "train_templates": list(TRAIN_TEMPLATES),
        "held_out_templates": list(HELD_OUT_TEMPLATES), "vocabulary_size": len(tokenizer),
        "parameters": {"transformer": sum(p.numel() for p in model.parameters()),
                       "text_encoder": sum(p.numel() for p in text_encoder.parameters())},
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# ---- evaluation -------------------------------------------------------------------------------------


def eval_prompts(per_class: int) -> tuple[list[str], np.ndarray]:
    """``per_class`` prompts per digit, cycling through the held-out templates, and the digits they name."""
    labels = np.repeat(np.arange(10), per_class)
    prompts = [caption(HELD_OUT_TEMPLATES[i % len(HELD_OUT_TEMPLATES)], int(d)) for i, d in enumerate(labels)]
    return prompts, labels


def calibration_prompts() -> list[str]:
    """Ten training captions, one per digit, templates in turn (never a held-out template)."""
    return [caption(TRAIN_TEMPLATES[d % len(TRAIN_TEMPLATES)], d) for d in range(10)]


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int, guidance: float, seed: int, batch: int = 250) -> np.ndarray:
    """One image per prompt, as ``(N, 8, 8)`` in [0, 1]."""
    out = []
    for i in range(0, len(prompts), batch):
        img = pipe(prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator("cpu").manual_seed(seed + i), output_type="pt").images
        out.append(img[:, 0].float().numpy())
    return np.concatenate(out)


@torch.no_grad()
def token_outliers(pipe) -> dict[str, float]:
    """How large token 0 ([BOS]) of the text embeddings is next to the real tokens (padding left out),
    over every train and held-out caption and the empty prompt."""
    prompts = [caption(t, d) for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES for d in range(10)] + [""]
    emb, mask = encode(pipe.tokenizer, pipe.text_encoder, prompts)
    others = emb[:, 1:][mask[:, 1:].bool()]
    return {"token0_absmax": float(emb[:, 0].abs().max()), "other_tokens_absmax": float(others.abs().max()),
            "token0_rms": float(emb[:, 0].pow(2).mean().sqrt()), "other_tokens_rms": float(others.pow(2).mean().sqrt()),
            "token0_max_spread_across_prompts": float((emb[:, 0] - emb[:1, 0]).abs().max())}


def recipes(quick: bool) -> list[tuple[str, Any, dict[str, Any]]]:
    """(row name, config, enable_quant keyword arguments); ``None`` is the float model."""
    import piecewise_quant as pq

    g = 16 if quick else 32
    u8 = dict(bits=8, grid="uniform", group_size="channel", modules_to_not_convert=[])
    w4a8 = dict(bits=4, grid="piecewise", group_size=g, act_bits=8, modules_to_not_convert=[])
    static = pq.PiecewiseQuantConfig(act_bits=8, act_mode="static_per_tensor", **u8)
    rows = [("float", None, {}),
            ("W8A8 static, shared scales", static, {}),
            ("W8A8 static, shared scales + BOS-aware", static, {"bos_aware": True})]
    if quick:
        return rows
    return rows + [
        ("W8A8 dynamic per-token", pq.PiecewiseQuantConfig(act_bits=8, **u8), {}),
        ("W8A8 dynamic per-token + BOS-aware", pq.PiecewiseQuantConfig(act_bits=8, **u8), {"bos_aware": True}),
        (f"W4A8 piecewise g{g}, per-token acts", pq.PiecewiseQuantConfig(**w4a8), {}),
        (f"W4A8 piecewise g{g}, per-token acts + BOS-aware", pq.PiecewiseQuantConfig(**w4a8), {"bos_aware": True}),
        (f"W4A8 piecewise g{g}, static shared acts",
         pq.PiecewiseQuantConfig(**{**w4a8, "act_mode": "static_per_tensor"}), {}),
        (f"W4A8 piecewise g{g}, static shared acts + BOS-aware",
         pq.PiecewiseQuantConfig(**{**w4a8, "act_mode": "static_per_tensor"}), {"bos_aware": True}),
    ]


def evaluate(model_path: Path, per_class: int, steps: int, guidance: float, quick: bool, progress: bool = True,
             only: str | None = None) -> dict[str, Any]:
    from piecewise_quant.integrations.diffusers import register_with_diffusers

    register_with_diffusers()
    judge = dd.DigitsJudge()
    pipe = load_pipeline(model_path)
    float_total = sum(t.numel() * t.element_size()
                      for t in list(pipe.transformer.parameters()) + list(pipe.transformer.buffers()))
    calib = dict(calibration_prompts=calibration_prompts(), num_inference_steps=steps, guidance_scale=guidance,
                 seed=12345, calibration_batch_size=10, progress=False)
    prompts, labels = eval_prompts(per_class)
    results: dict[str, Any] = {
        "settings": {"per_class": per_class, "steps": steps, "guidance_scale": guidance, "scheduler": "DDIM",
                     "eval_seeds": [0, 100000], "eval_templates": list(HELD_OUT_TEMPLATES),
                     "calibration": "10 training captions (one per digit) x 1 run, seed 12345",
                     "calibration_prompts": calibration_prompts()},
        "judge": {"real_test_accuracy": judge.real_accuracy, "real_train_vs_test_fd": judge.real_split_fd},
        "text_embeddings": token_outliers(pipe),
        "rows": [],
    }
    ref_images = None
    samples: dict[str, np.ndarray] = {}
    for name, config, kwargs in dd.select(recipes(quick), only):
        t0 = time.perf_counter()
        if config is None:
            bpw, total, bos = 32.0, float_total, None
        else:
            report = pipe.enable_quant(config, **calib, **kwargs)
            comp = report.components["transformer"]
            bpw, total, bos = comp.bits_per_weight, comp.total_bytes, comp.bos
        q_s = time.perf_counter() - t0
        images = generate(pipe, prompts, steps, guidance, seed=0)
        row = {
            "name": name, "bits_per_weight": round(bpw, 3), "weight_bytes": int(total),
            "accuracy": judge.accuracy(images, labels), "fd": judge.fd(images),
            "quantize_s": round(q_s, 1), "generate_s": round(time.perf_counter() - t0 - q_s, 1),
        }
        if bos is not None:
            row["bos_layers"] = {k: {"row0_absmax": a, "other_rows_absmax": b} for k, (a, b) in bos.layers.items()}
            row["bos_skipped"] = dict(bos.skipped)
        if config is None:
            ref_images = images
            row["psnr_vs_float"] = float("inf")
            other = generate(pipe, prompts, steps, guidance, seed=100000)
            results["float_other_seed"] = {"accuracy": judge.accuracy(other, labels), "fd": judge.fd(other)}
        else:
            row["psnr_vs_float"] = dd.psnr(images, ref_images)
            pipe.disable_quant()
        results["rows"].append(row)
        samples[name] = images[::per_class]  # one of each digit
        if progress:
            print(f"  {name}: acc {row['accuracy']:.3f}  FD {row['fd']:.2f}  PSNR {row['psnr_vs_float']:.1f}", file=sys.stderr)
    results["samples"] = samples
    return results


def table(results: dict[str, Any]) -> str:
    text = dd.table(results)
    t = results["text_embeddings"]
    bos_rows = [r for r in results["rows"] if r.get("bos_layers")]
    layers = ""
    if bos_rows:
        lay = bos_rows[0]["bos_layers"]
        k = next((n for n in lay if n.endswith("attn2.to_k")), next(iter(lay)))
        layers = (f" BOS-aware layers: {len(lay)} ({', '.join(sorted(lay))}); at {k} the BOS row's max|x| is "
                  f"{lay[k]['row0_absmax']:.2f} vs {lay[k]['other_rows_absmax']:.2f} for the other rows.")
    return text + (
        f"\nText embeddings: token 0 max|x| {t['token0_absmax']:.2f} (rms {t['token0_rms']:.2f}) vs the other tokens "
        f"{t['other_tokens_absmax']:.2f} (rms {t['other_tokens_rms']:.2f}); token 0 varies across prompts by at most "
        f"{t['token0_max_spread_across_prompts']:.2g}." + layers
    )


def save_outputs(results: dict[str, Any], out_dir: Path) -> None:
    """``text_digits.json`` and ``text_digits.png`` (one sample per digit and configuration), as
    ``dit_digits.save_outputs`` writes them, with this model's title."""
    dd.save_outputs(results, out_dir, stem="text_digits",
                    title="text-digits (PixArt + causal text encoder): held-out prompts for 0-9, same noise in every row")


def main(argv: list[str] | None = None) -> int:
    args = dd.parser(__doc__, ASSET, steps=6000, batch_size=64).parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        import tempfile

        out = args.out or Path(tempfile.mkdtemp(prefix="text_digits_quick_"))
        info = train(out / "model", 20, 32, 1e-3, 0, QUICK_CONFIG, QUICK_TEXT_CONFIG, progress=False)
        print(f"trained {sum(info['parameters'].values()):,} parameters for {info['steps']} steps in "
              f"{info['train_wall_s']} s")
        results = evaluate(out / "model", per_class=2, steps=4, guidance=args.guidance, quick=True, progress=False)
        print(table(results))
        save_outputs(results, out)
        print(f"wrote {out / 'text_digits.json'}")
        return 0
    if args.command in ("train", "all"):
        info = train(args.model, args.steps, args.batch_size, args.lr, 0, MODEL_CONFIG, TEXT_CONFIG)
        print(json.dumps(info, indent=2))
    if args.command in ("evaluate", "all"):
        t0 = time.perf_counter()
        results = evaluate(args.model, args.per_class, args.sample_steps, args.guidance, quick=False, only=args.only)
        results["settings"]["wall_s"] = round(time.perf_counter() - t0, 1)
        results["settings"]["threads"] = torch.get_num_threads()
        print(table(results))
        if args.only and args.out is None:  # a partial table never replaces the full one in docs/
            return 0
        save_outputs(results, args.out or DOCS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
