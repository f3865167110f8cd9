"""Loading a benchmark script, or running its ``--quick`` mode, from a test (on ``sys.path`` through pytest's
``pythonpath``)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path, name: str) -> ModuleType:
    """A benchmark script as a module named ``name``: its folder on ``sys.path`` (scripts import their
    siblings, at load or later) and the module in ``sys.modules`` (dataclasses look their module up there)."""
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def quick_table_rows(repo_root: Path, script: str, out: Path, timeout: int = 600) -> tuple[dict[str, list[str]], str]:
    """Run ``script --quick --out OUT`` on one thread, assert it succeeds, and return the rows of the
    result table it prints (``{first cell: cells}``: 6-cell rows whose fourth cell is a 3-decimal
    number), in printed order, and everything it printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, script, "--quick", "--out", str(out)],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"\d+\.\d{3}", cells[3]):
            rows[cells[0]] = cells
    return rows, proc.stdout
