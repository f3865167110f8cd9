"""setuptools entry (metadata lives in pyproject.toml): put the import-hook ``.pth`` file at the root of the wheel.

transformers and diffusers have no plugin discovery, so a ``.pth`` file (run by ``site`` at every
interpreter start) installs a lazy post-import hook that registers piecewise-quant the moment
``transformers.quantizers.auto`` is imported. See ``integrations/piecewise_quant_autoload.pth``.
"""

import os

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

    setup(cmdclass={"build_py": BuildPyWithPth, "egg_info": EggInfoOwnTopLevel})
