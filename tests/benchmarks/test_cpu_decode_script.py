"""benchmarks/cpu_decode.py: every variant timed in interleaved rounds, ratios from the same rounds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import cpu_decode  # noqa: E402

from piecewise_quant.kernels import cpu_backend  # noqa: E402


def test_ratios_are_the_median_of_per_round_ratios():
    fp32 = {"speeds": {"1": 2.0, "1 rounds": [1.0, 2.0, 4.0]}}
    quant = {"speeds": {"1": 6.0, "1 rounds": [5.0, 8.0, 6.0]}}
    # per round 5.0, 4.0, 1.5: median 4.0, where the ratio of the medians would say 3.0
    assert cpu_decode.ratio(quant, fp32, 1) == "4.00"
    # rows timed apart (vLLM): the ratio of the medians
    assert cpu_decode.ratio({"speeds": {"1": 9.0}}, {"speeds": {"1": 3.0}}, 1) == "3.00"
    assert cpu_decode.ratio(quant, None, 1) == ""


@pytest.mark.slow
def test_dry_run_times_every_transformers_variant(tmp_path):
    out = tmp_path / "decode.md"
    assert cpu_decode.main(["--dry-run", "--output", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| transformers")]
    expected = list(cpu_decode.VARIANTS)
    if not cpu_backend.onednn_int8_status()[0]:  # no VNNI: the prepacked variant is skipped, with the reason
        expected = [v for v in expected if v not in cpu_decode.PREPACKED]
    assert [r.split("|")[3].strip() for r in rows] == expected
    assert rows[0].split("|")[6].strip() == "1.00"  # fp32 against itself
    data = json.loads(out.with_suffix(".json").read_text())
    for row in data["rows"]:
        assert set(row["speeds"]) == {"1", "1 range", "1 rounds", "2", "2 range", "2 rounds"}
        assert all(v > 0 for v in row["speeds"]["1 rounds"])
    by_name = {r["variant"]: r for r in data["rows"]}
    # the 8-bit lm_head variant is smaller than the one that keeps lm_head in float
    assert by_name["W4 g128 uniform + lm_head W8"]["weight_mb"] < by_name["W4 g128 uniform"]["weight_mb"]
    with pytest.raises(SystemExit):
        cpu_decode.main(["--variants", "W5"])
