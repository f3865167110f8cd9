"""The ``piecewise-quant`` command line. ``piecewise-quant demo`` is the README's main job: quantize
the bundled model on load with transformers, save it, reload it with plain ``from_pretrained``,
and print what each configuration costs and keeps. ``piecewise-quant serve MODEL ...`` is
``vllm serve MODEL ...`` (see :mod:`piecewise_quant.integrations.vllm.serve`).

``quantize``, ``eval``, ``inspect``, ``bench`` and ``export`` are the everyday commands (docs/cli.md). User
mistakes (a missing directory, a bad option value, an unknown layer) print ``error: ...`` to stderr
and exit with status 2; torch and transformers are imported only inside the commands.

One module per command (``quantize``, ``eval``, ``inspect``, ``bench``, ``export``, ``demo``,
``serve``), each with its ``add_parser`` and ``run``; the parser and :func:`main` in ``app``,
the matplotlib code in ``plotting``, shared helpers in ``common``."""

from __future__ import annotations

from .app import build_parser, main
from .common import (
    CAUSAL_LM,
    DEMO_DECODE_TOKENS,
    DTYPES,
    FEATURE_EXTRACTION,
    TASKS,
    UserError,
    decode_tokens_per_second,
    run_command,
)
from .demo import DEMO_CONFIGS, DemoRow, format_table, run_demo
from .plotting import group_levels
from .quantize import add_quantize_options
from .quantize import run as _quantize  # optimum-cli piecewise quantize runs it (integrations/optimum_register)

__all__ = ["main", "run_demo", "DemoRow", "UserError", "build_parser", "add_quantize_options"]
