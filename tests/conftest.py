"""Shared fixtures: the repository root and the bundled model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the property tests on a fixed, reproducible set of examples; local runs explore new ones
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
TINY_LLAMA = REPO / "assets" / "tiny-llama-pydoc"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_llama_path() -> Path:
    assert (TINY_LLAMA / "model.safetensors").is_file(), "assets/tiny-llama-pydoc is missing"
    return TINY_LLAMA
