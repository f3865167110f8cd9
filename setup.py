"""setuptools entry (metadata lives in pyproject.toml): the import-hook ``.pth`` file at the root of
the wheel, and the CPU kernels extension.

transformers and diffusers have no plugin discovery, so a ``.pth`` file (run by ``site`` at every
interpreter start) installs a lazy post-import hook that registers piecewise-quant the moment
``transformers.quantizers.auto`` is imported. See ``integrations/piecewise_quant_autoload.pth``.

``piecewise_quant.kernels._pq_cpu`` (``kernels/csrc/pq_cpu.c``) is plain C with no torch headers, so it
builds with the system compiler in any build environment. It is optional: where it cannot be built
(no compiler, not x86-64, ``PIECEWISE_QUANT_NO_EXTENSION=1``) the package installs without it and
warns once at run time that quantized layers use the slower pure-torch kernels.
"""

import os
import platform
import sys

from setuptools import Extension
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.egg_info import egg_info

PTH = "piecewise_quant_autoload.pth"
SOURCE = os.path.join("integrations", PTH)


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(SOURCE, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


class OptionalBuildExt(build_ext):
    """Build the CPU kernels if possible; a failed build leaves a working install without them."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all
            self._skip(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    @staticmethod
    def _skip(exc: Exception) -> None:
        sys.stderr.write(
            f"WARNING: piecewise-quant's CPU kernels could not be built ({exc}); installing without them. "
            "Quantized layers will run the pure-torch reference on CPU.\n"
        )


def extensions() -> list[Extension]:
    if os.environ.get("PIECEWISE_QUANT_NO_EXTENSION") or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    if sys.platform == "win32":
        return []  # the kernels use GCC/Clang vector extensions and target attributes
    return [
        Extension(
            "piecewise_quant.kernels._pq_cpu",
            sources=["kernels/csrc/pq_cpu.c"],
            # baseline x86-64 code: the AVX2 / AVX-512 routines carry their own target attributes and
            # are chosen at run time; no FMA contraction, so dequantized weights match the reference
            extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-strict-aliasing", "-pthread"],
            extra_link_args=["-pthread"],
        )
    ]


class EggInfoOwnTopLevel(egg_info):
    """``top_level.txt`` lists ``piecewise_quant`` only. The wheel also ships one module into
    optimum's PEP 420 namespace (``optimum/commands/register/piecewise.py``); declaring ``optimum``
    as a top-level package of this distribution made ``importlib.metadata.packages_distributions()``
    map ``optimum`` to two distributions, and diffusers logs "Multiple distributions found for
    package optimum" on every import."""

    def run(self) -> None:
        super().run()
        path = os.path.join(self.egg_info, "top_level.txt")
        if os.path.exists(path):
            with open(path) as fh:
                names = [n for n in fh.read().split() if n != "optimum"]
            with open(path, "w") as fh:
                fh.write("\n".join(names) + "\n")


if __name__ == "__main__":
    from setuptools import setup

    setup(
        cmdclass={"build_py": BuildPyWithPth, "build_ext": OptionalBuildExt, "egg_info": EggInfoOwnTopLevel},
        ext_modules=extensions(),
    )
