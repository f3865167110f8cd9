"""``optimum-cli piecewise quantize``: piecewise-quant's command in optimum's CLI.

This file is a portion of optimum's PEP 420 namespace ``optimum.commands.register`` (the wheel
installs it as ``optimum/commands/register/piecewise.py``; pyproject ``[tool.setuptools]`` maps
the folder). ``optimum-cli`` imports every ``*.py`` of that namespace at each start and registers
the commands in its ``REGISTER_COMMANDS``, so this module imports only optimum's light CLI base
classes; torch, transformers and piecewise-quant's implementation are imported inside ``run()``.
There must be no ``__init__.py`` next to this file.

The options and the implementation are those of ``piecewise-quant quantize``
(:func:`piecewise_quant.integrations.cli.add_quantize_options` and its ``_quantize``).
"""

from __future__ import annotations

import argparse
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

__all__ = ["PiecewiseCommand", "PiecewiseQuantizeCommand", "REGISTER_COMMANDS"]

_EPILOG = """examples:
  optimum-cli piecewise quantize --model assets/tiny-llama-pydoc --output out/pw4 --eval
  optimum-cli piecewise quantize --model MODEL --output out/u3 --grid uniform --bits 3 --group-size 64
  optimum-cli piecewise quantize --model MODEL --output out/w4a8 --act-bits 8 --calibration-text my_corpus.txt

Same options and output as `piecewise-quant quantize`. The output directory is a normal Hugging Face
checkpoint: reload it with AutoModelForCausalLM.from_pretrained(OUTPUT)."""


class PiecewiseQuantizeCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="quantize",
                          help="quantize a causal LM with piecewise-quant and save it as a Hugging Face checkpoint")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        from piecewise_quant.integrations.cli import add_quantize_options  # argparse only: no torch

        parser.description = ("Quantize a float model with piecewise-quant (data-free, or calibrated with "
                               "--calibration / --calibration-text) and save model + tokenizer to --output.")
        parser.epilog = _EPILOG
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        add_quantize_options(parser)

    def run(self) -> None:
        from piecewise_quant.integrations.cli import _quantize, run_command

        status = run_command(_quantize, self.args)
        if status:
            sys.exit(status)


class PiecewiseCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="piecewise", help="piecewise-quant post-training quantization (piecewise, uniform, FP8 grids)")
    SUBCOMMANDS = (
        CommandInfo(name=PiecewiseQuantizeCommand.COMMAND.name, help=PiecewiseQuantizeCommand.COMMAND.help,
                    subcommand_class=PiecewiseQuantizeCommand),
    )


# read by optimum.commands.optimum_cli.load_optimum_namespace_cli_commands: a top-level command
REGISTER_COMMANDS = [PiecewiseCommand]
