"""``python -m piecewise_quant.integrations.cli``: the ``piecewise-quant`` command."""

import sys

from .app import main

sys.exit(main())
