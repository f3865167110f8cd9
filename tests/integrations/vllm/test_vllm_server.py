"""``vllm serve DIR --quantization piecewise`` under load: 8 clients x 20 requests through the
OpenAI-compatible API, every answer well formed, then a clean stop."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "vllm_serving.py"


def _bench():
    spec = importlib.util.spec_from_file_location("vllm_serving_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_server_answers_concurrent_clients_and_stops_cleanly(checkpoints, tmp_path):
    bench = _bench()
    port = bench.free_port()
    log = tmp_path / "server.log"
    proc = bench.serve(checkpoints["bundled_w4"], port, ["--quantization", "piecewise", "--dtype", "float32"], log=log)
    try:
        bench.wait_ready(proc, port, timeout=300)
        result = bench.run_load(port, clients=8, requests=20, max_tokens=8)
    except Exception:
        print(log.read_text()[-5000:])
        raise
    finally:
        code = bench.stop(proc, timeout=60)
    assert result["requests"] == 160
    assert result["ok"] == 160, result["failures"]
    assert code in (0, -2), f"vllm serve exited with {code}:\n{log.read_text()[-3000:]}"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert "piecewise" in log.read_text()
