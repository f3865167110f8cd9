"""The ``kernel_worker`` fixture: the subprocess plumbing of the Triton kernel tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def kernel_worker():
    spec = importlib.util.spec_from_file_location("_kernel_worker", Path(__file__).with_name("_kernel_worker.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
