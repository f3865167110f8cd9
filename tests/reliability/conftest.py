"""Fixtures of the reliability suite: tiny models built from a config (nothing downloaded), a
state fingerprint to prove a model was left exactly as it was, and the bundled model's checkpoint
quantized once per session (tampered copies are made from it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import piecewise_quant as pq  # noqa: E402


def tiny_llama(layers: int = 2, tie: bool = False, seed: int = 0):
    """A random Llama small enough to calibrate in a second (hidden 64, vocab 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def fingerprint(model: torch.nn.Module) -> dict:
    """Every module's type and every tensor's value, by name."""
    types = {n: type(m).__name__ for n, m in model.named_modules()}
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"types": types, "tensors": tensors, "training": model.training,
            "config": getattr(model, "piecewise_quant_config", None)}


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = fingerprint(model)
    assert after["types"] == before["types"]
    assert after["config"] is before["config"]
    assert after["training"] == before["training"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k


SUBSET = pq.PiecewiseQuantConfig(bits=4, observer="minmax", modules_to_not_convert=["lm_head", r"re:model\.layers\.[1-5]\..*"])


@pytest.fixture(scope="session")
def saved_checkpoint(tiny_llama_path, tmp_path_factory) -> Path:
    """The bundled model with decoder layer 0 quantized on load and saved (with its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("reliability") / "pw4"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=SUBSET)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_path).save_pretrained(out)
    return out


@pytest.fixture
def checkpoint_copy(saved_checkpoint, tmp_path) -> Path:
    """A private copy of ``saved_checkpoint`` to tamper with."""
    dst = tmp_path / "ckpt"
    shutil.copytree(saved_checkpoint, dst)
    return dst


def run_python(code: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter of this venv (import hook active), in an empty directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PIECEWISE_QUANT_NO_AUTOLOAD", None)
    env.update(env_extra or {})
    with tempfile.TemporaryDirectory(prefix="pq_rel_cwd_") as cwd:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def rel():
    """This module (helpers), for the test files (importlib import mode: no sibling imports)."""
    return sys.modules[__name__]
