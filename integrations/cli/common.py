"""Helpers shared by the ``piecewise-quant`` commands: the :class:`UserError` they raise and
:func:`run_command` turns into ``error: ...`` with exit status 2, checks of the directories and
files a user names, model and tokenizer loading, option types, and the measures and labels more
than one command prints. torch and transformers are imported inside the functions only."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

CAUSAL_LM = "causal-lm"
FEATURE_EXTRACTION = "feature-extraction"
TASKS = (CAUSAL_LM, FEATURE_EXTRACTION)
DTYPES = ("float32", "bfloat16", "float16", "auto")
MODEL_HELP = "a Hugging Face causal-LM directory (default: the bundled tiny-llama-pydoc)"
DEMO_DECODE_TOKENS = 64


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as ``error: ...``, exit status 2."""


def run_command(func, args: argparse.Namespace) -> int:
    """Run a command function; a :class:`UserError` becomes ``error: ...`` on stderr and exit status 2.
    (Shared by this CLI and ``optimum-cli piecewise``.)"""
    try:
        return func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# ---- the parser ----------------------------------------------------------------------------------


def add_command(sub, name: str, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` ends with ``epilog`` (examples), laid out as written."""
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return v


def positive_int_list(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {value!r}")
    return out


def add_scheme_options(p: argparse.ArgumentParser) -> None:
    """``--grid``, ``--bits`` and ``--group-size`` (``quantize`` and ``bench``)."""
    p.add_argument("--grid", default="piecewise", help="weight grid: piecewise (default), uniform, fp8, mxfp4 or nvfp4")
    p.add_argument("--bits", type=int, default=None, help="bits per weight code: 2, 3, 4 (default) or 8 (fp8: 8)")
    p.add_argument("--group-size", default="auto",
                   help="weights per scale: a divisor of the layers' in_features, 'channel' or 'tensor' (default: the "
                        "grid's own, 128; fp8 'channel'; mxfp4 32, nvfp4 16)")


def parse_group_size(value: str) -> int | str:
    if value in ("channel", "tensor", "auto"):
        return value
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--group-size must be a positive integer, 'channel' or 'tensor'; got {value!r}") from None


# ---- the directories and files a user names ------------------------------------------------------


def model_dir(value: str | None, what: str = "--model") -> Path:
    """The Hugging Face model directory ``value`` (the bundled model when ``None``), checked."""
    if value is None:
        from piecewise_quant.evaluate import default_model_path

        try:
            return default_model_path()
        except FileNotFoundError as exc:
            raise UserError(str(exc)) from None
    path = Path(value)
    if not path.exists():
        raise UserError(f"{what} {value}: no such directory")
    if not path.is_dir():
        raise UserError(f"{what} {value}: not a directory")
    if not (path / "config.json").is_file():
        raise UserError(f"{what} {value}: has no config.json (not a Hugging Face model directory)")
    for f in [path / "config.json", *sorted(path.glob("*.safetensors"))]:
        if not os.access(f, os.R_OK):
            raise UserError(f"{what} {value}: {f.name} is not readable by this user (permission denied; mode "
                            f"{oct(f.stat().st_mode & 0o777)}); ask its owner to make it readable")
    return path


def check_output(out: Path, overwrite: bool, model_path: Path) -> None:
    """``--output`` may be written (empty, or ``--overwrite``) and is not ``--model`` itself."""
    from piecewise_quant.saving import check_output_dir

    try:
        check_output_dir(out, overwrite, what="--output")
    except ValueError as exc:
        raise UserError(str(exc).replace("overwrite=True / --overwrite", "--overwrite")) from None
    if out.resolve() == model_path.resolve():
        raise UserError("--output must differ from --model")


def check_task(path: Path, task: str) -> None:
    """An encoder given to a causal-LM command fails here, before any loading, with the fix."""
    import json

    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}/config.json cannot be read as JSON: {exc}") from None
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    if task == CAUSAL_LM and archs and not causal:
        raise UserError(
            f"{path} is a {', '.join(archs)}, not a causal language model; for an encoder (sentence embeddings) pass "
            f"--task {FEATURE_EXTRACTION}"
        )


def task_of(path: Path) -> str:
    """The task a checkpoint loads as: causal-lm, or feature-extraction for anything else."""
    try:
        check_task(path, CAUSAL_LM)
    except UserError:
        return FEATURE_EXTRACTION
    return CAUSAL_LM


def read_text(value: str, what: str) -> str:
    try:
        text = Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {value}: cannot be read as UTF-8 text ({exc.__class__.__name__}: {exc})") from None
    if not text.strip():
        raise UserError(f"{what} {value}: the file is empty")
    return text


def dir_bytes(path: Path) -> int:
    """Bytes of the ``.safetensors`` files in ``path``."""
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")


# ---- models, tokenizers, measures ------------------------------------------------------------------


def load(path: Path, task: str = CAUSAL_LM, dtype: str = "float32", **kwargs):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if task == CAUSAL_LM else AutoModel
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        return auto.from_pretrained(path, dtype=torch_dtype, **kwargs).eval()
    except (OSError, ValueError, KeyError) as exc:
        msg = str(exc).strip() or exc.__class__.__name__  # the whole message: its useful part is often not the first line
        what = "a causal language model" if task == CAUSAL_LM else "a model"
        raise UserError(f"cannot load {what} from {path}: {msg}") from None


def tokenizer(path: Path, option: str | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        fix = ("" if option else "; pass the float model's directory with --tokenizer DIR (a checkpoint written by "
               "model.save_pretrained alone has no tokenizer)")
        raise UserError(f"{path} has no usable tokenizer ({str(exc).strip()}){fix}") from None


def text_token_ids(args: argparse.Namespace, model_path: Path):
    """``eval``'s text as token ids: ``--text`` (else the bundled held-out text) through the
    tokenizer of ``--tokenizer`` (else of ``model_path``). Returns ``(tokenizer, ids)``."""
    from piecewise_quant.evaluate import heldout_text

    text = read_text(args.text, "--text") if args.text else heldout_text()
    tok_path = model_dir(args.tokenizer, "--tokenizer") if args.tokenizer else model_path
    tok = tokenizer(tok_path, "--tokenizer" if args.tokenizer else None)
    return tok, token_ids(tok, text)


def token_ids(tok, text: str):
    import torch

    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def perplexity(model, ids, seq_len: int, max_windows: int | None, progress: bool = False) -> tuple[float, int]:
    """Perplexity over the whole windows of ``seq_len`` tokens in ``ids`` (at most ``max_windows``)
    and the number of windows."""
    from piecewise_quant.evaluate import perplexity

    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return perplexity(model, input_ids=ids[: n * seq_len], window=seq_len, progress=progress), n


def decode_tokens_per_second(model, prompt, tokens: int = DEMO_DECODE_TOKENS, repeats: int = 3) -> float:
    """Greedy decode speed of ``model`` on ``prompt`` (``(batch, len)`` token ids): ``batch * (tokens - 1)``
    over the time of generating ``tokens`` minus that of generating one (which removes the prefill),
    best of ``repeats``."""
    import torch

    mask = torch.ones_like(prompt)

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=getattr(model.config, "pad_token_id", None) or 0)
        elapsed = time.perf_counter() - start
        if out.shape[1] != prompt.shape[1] + n:
            raise RuntimeError(f"generate stopped after {out.shape[1] - prompt.shape[1]} of {n} tokens")
        return elapsed

    timed(2)  # warm-up
    best = 0.0
    for _ in range(repeats):
        t_n, t_1 = timed(tokens), timed(1)
        rate = prompt.shape[0] * (tokens - 1) / (t_n - t_1) if t_n > t_1 else prompt.shape[0] * tokens / t_n
        best = max(best, rate)
    return best


# ---- labels --------------------------------------------------------------------------------------


def group_label(layer) -> str:
    """A layer spec's group size as the tables print it: ``tensor``, ``channel (N)`` or ``N``."""
    gs = layer.group_size
    if gs == -1:
        return "tensor"
    if gs == layer.in_features:
        return f"channel ({gs})"
    return str(gs)


def kernel_label(q, rows: int = 1) -> str:
    """Which CPU kernel a quantized layer runs for ``rows`` activation rows (1: decoding), or why none;
    with the path of its sparse outliers and of its low-rank branch where it has them."""
    from piecewise_quant.kernels import cpu_backend

    kernel = q.fmt.kernel_format(q.spec)
    if kernel is None:
        label = f"reference (grid {q.spec.grid!r} has no kernel format)"
    else:
        act_args = q.spec.act_args
        act = "none" if act_args is None else act_args.kernel_format
        qweight = q._buffers.get("qweight")
        label = cpu_backend.explain(kernel, q.spec.bits, q.layer_spec.group_size, q.in_features, q.compute_dtype,
                                    act, rows, prepacked=qweight is not None and cpu_backend.is_prepacked(qweight))
    return label + "".join(f" + {extra}" for extra in side_paths(q, rows))


def side_paths(q, rows: int = 1) -> list[str]:
    """How a layer's outliers and low-rank branch run on CPU for ``rows`` activation rows:
    ``"outliers (C kernel)"`` or ``"outliers (torch.sparse)"``, ``"low-rank (C kernel)"`` or
    ``"low-rank (F.linear)"``; empty for a layer with neither."""
    import torch

    from piecewise_quant.kernels import backends, cpu_backend
    from piecewise_quant.kernels.lowrank_add import MAX_ROWS
    from piecewise_quant.qlinear import ensure_runtime

    ensure_runtime()  # the built-in CPU backend registers with the plugins, on a layer's first call
    buffers = q._buffers
    kernels = cpu_backend.status()["available"] and backends.allows("cpu")
    paths = []
    vals = buffers.get("outlier_vals")
    if vals is not None:
        paths.append("outliers (C kernel)" if kernels and vals.dtype == torch.float16 else "outliers (torch.sparse)")
    a = buffers.get("lowrank_a")
    if a is not None:
        c = kernels and rows <= MAX_ROWS and a.dtype == torch.float16
        paths.append("low-rank (C kernel)" if c else "low-rank (F.linear)")
    return paths
