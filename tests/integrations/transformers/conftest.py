"""Fixtures for the transformers integration tests.

Quantizing a whole model with the piecewise grid takes long on 2 CPU cores, so most tests quantize
a subset of the tiny Llama (decoder layer 0, see ``SUBSET_SKIP``) with the ``minmax`` observer;
the integration does not depend on which layers or observer are used. The on-load quantized model
and its saved checkpoint are built once per session and shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import piecewise_quant as pq  # noqa: E402

# keep lm_head (default) and decoder layers 1-5 in float
SUBSET_SKIP = ["lm_head", r"re:model\.layers\.[1-5]\..*"]

PROMPTS = [
    "Return the number of items in a container.",
    "def read(path):\n    with open(path) as f:",
]


def subset_config(**kwargs) -> pq.PiecewiseQuantConfig:
    kwargs.setdefault("observer", "minmax")
    kwargs.setdefault("modules_to_not_convert", SUBSET_SKIP)
    return pq.PiecewiseQuantConfig(**kwargs)


# piecewise 4-bit, with an override: down_proj in 8-bit uniform
PIECEWISE_CFG = subset_config(overrides={"*.down_proj": {"bits": 8, "grid": "uniform"}})


@pytest.fixture(scope="session")
def tiny_inputs(tiny_llama_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    ids = tok(PROMPTS[1], return_tensors="pt")["input_ids"]
    assert ids.shape[1] >= 8
    return ids


def load_float(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_quantized(path, config, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, **kwargs)


@torch.no_grad()
def logits_of(model, ids) -> torch.Tensor:
    return model(ids).logits


@pytest.fixture(scope="session")
def piecewise_on_load(tiny_llama_path):
    """The tiny Llama quantized on load with ``PIECEWISE_CFG``."""
    return load_quantized(tiny_llama_path, PIECEWISE_CFG)


@pytest.fixture(scope="session")
def piecewise_saved(piecewise_on_load, tiny_inputs, tmp_path_factory) -> Path:
    """``piecewise_on_load`` saved with ``save_pretrained``; ``logits.pt`` holds its logits on
    ``tiny_inputs``."""
    out = tmp_path_factory.mktemp("piecewise_saved")
    piecewise_on_load.save_pretrained(out)
    torch.save({"ids": tiny_inputs, "logits": logits_of(piecewise_on_load, tiny_inputs)}, out / "logits.pt")
    return out


def run_python(code: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the venv's, so the ``.pth`` hook is active).

    It runs in an empty directory: ``python -c`` puts the working directory first on ``sys.path``,
    and from the repository root the folder ``kernels/`` would shadow Hugging Face's ``kernels``
    package that transformers probes."""
    env = dict(os.environ)
    env.pop("PIECEWISE_QUANT_NO_AUTOLOAD", None)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(env_extra or {})
    with tempfile.TemporaryDirectory(prefix="pq_tf_cwd_") as cwd:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd
        )


def read_quant_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())["quantization_config"]


@pytest.fixture(scope="session")
def tfh():
    """This module (helpers and constants), for test files: with ``--import-mode=importlib`` they
    cannot import a sibling module by name."""
    return sys.modules[__name__]
