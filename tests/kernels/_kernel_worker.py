"""Plumbing shared by the Triton kernel tests (``test_triton_*.py``).

``triton.jit`` decides at decoration time whether a kernel is interpreted, so each test file runs
every kernel call in ONE subprocess: the file itself run as a script, with ``TRITON_INTERPRET=1``
on CPU. :func:`run` starts it and returns its JSON report (test side); :func:`serve` is the
script's side. The test side reaches this module through the ``kernel_worker`` fixture
(``conftest.py``); the script imports it directly (its folder is on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable


def run(script: str, cases: list[dict], device: str, timeout: int) -> dict:
    """Run ``script`` on ``cases`` (``device`` ``"cpu"``: under the interpreter) and return its report."""
    import pytest

    env = {**os.environ}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    env.pop("PIECEWISE_QUANT_KERNEL_BACKEND", None)
    proc = subprocess.run([sys.executable, script], input=json.dumps({"device": device, "cases": cases}),
                          capture_output=True, text=True, env=env, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"kernel worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1])


def assert_every_case(cases: list[dict], report: dict, assert_case: Callable[[dict, dict], None]) -> None:
    """``assert_case`` on every case, failing once with all the failures listed (the GPU tests)."""
    failures = []
    for case in cases:
        try:
            assert_case(report["cases"][case["id"]], case)
        except AssertionError as e:
            failures.append(f"{case['id']}: {e}")
    assert not failures, "\n".join(failures)


def assert_close(res: dict, case: dict, tol: float, shape: list[int] | None = None, path: str | None = None) -> None:
    """One case's result against the float64 reference: no error, the reference's shape (or
    ``shape``), the case's dtype when it names one, the expected kernel ``path`` when given, and a
    max error within ``tol`` of the reference's scale (an all-zero output only for empty input)."""
    assert "error" not in res, res.get("error")
    assert res["shape"] == (shape if shape is not None else res["ref_shape"]), res
    if "dtype" in res:
        assert res["dtype"] == case["dtype"]
    if path is not None:
        assert res["path"] == path, res
    if res["scale"] == 0:
        assert (case["lead"][0] if "lead" in case else case["m"]) == 0, res
        return
    assert res["err"] <= tol * res["scale"], res


def serve(checks: dict[str, Callable[[], None]], run_case: Callable[[dict, int, str], dict]) -> None:
    """The script's side: read the job from stdin, run the named ``checks`` (CPU only: they use CPU
    tensors; first, before any case could initialise CUDA), then ``run_case(case, index, device)``
    for every case, each failure reported under its name; print the JSON report."""
    job = json.loads(sys.stdin.read())
    device, cases = job["device"], job["cases"]
    assert (os.environ.get("TRITON_INTERPRET") == "1") == (device == "cpu")
    out: dict[str, Any] = {"cases": {}, "checks": {}}
    for name, fn in checks.items() if device == "cpu" else ():
        try:
            fn()
            out["checks"][name] = {"ok": True, "msg": ""}
        except Exception as e:
            out["checks"][name] = {"ok": False, "msg": f"{type(e).__name__}: {e}"}
    for i, case in enumerate(cases):
        try:
            out["cases"][case["id"]] = run_case(case, i, device)
        except Exception as e:  # reported per case
            out["cases"][case["id"]] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))
