"""benchmarks/cpu_kernel_ab.py runs two builds of the CPU extension side by side (here the same build twice)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from piecewise_quant.kernels import cpu_backend

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import cpu_kernel_ab  # noqa: E402


@pytest.mark.skipif(not cpu_backend.status()["available"], reason="CPU kernels unavailable")
def test_the_ab_script_times_both_builds(capsys):
    from piecewise_quant.kernels import _pq_cpu

    so = Path(_pq_cpu.__file__)
    assert cpu_kernel_ab.main(["--a", str(so), "--b", str(so), "--cases", "W8A8,MXFP4", "--m", "1,5", "--size", "256",
                               "--copies", "2", "--reps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| W8A8") or line.startswith("| MXFP4")]
    assert len(rows) == 8  # 2 cases x 2 dtypes x 2 row counts
    assert all(float(r.split("|")[4]) > 0 and float(r.split("|")[5]) > 0 for r in rows)
    with pytest.raises(SystemExit):
        cpu_kernel_ab.main(["--a", str(so), "--b", str(so), "--cases", "W5"])
