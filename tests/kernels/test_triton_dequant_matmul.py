"""The Triton dequantize-matmul against the pure-torch reference, under ``TRITON_INTERPRET=1``.

``triton.jit`` decides at decoration time (when ``triton_dequant_matmul`` is imported) whether a
kernel is interpreted, so every kernel run happens in ONE subprocess started with
``TRITON_INTERPRET=1`` (this file run as a script): the pytest process never imports the kernel
module, and another test module having imported Triton (or the kernel) already cannot change the
mode. The subprocess runs every case and check and returns a JSON report; each test below asserts
on its entry.

Interpreter quirks (Triton 3.9) the tolerances allow for: float32 -> bfloat16 casts truncate
instead of rounding to nearest even (on a GPU they round), and ``tl.dot`` on bfloat16 operands is
broken (the kernel upcasts them to float32 under the interpreter, see triton#11584).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.triton

FORMATS = {"uniform_sym": ("uniform", True), "uniform_asym": ("uniform", False), "piecewise": ("piecewise", None)}
# tolerance on max |y - y_ref|, relative to max |y_ref|
TOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 2e-2}


def _case(fmt, bits, dtype="float32", lead=(17,), n=40, k=96, gs=32, bias=True, **extra):
    c = dict(fmt=fmt, bits=bits, dtype=dtype, lead=list(lead), n=n, k=k, gs=gs, bias=bias, **extra)
    c["id"] = "-".join(
        [fmt, f"b{bits}", dtype, "x".join(map(str, lead)) + f"x{k}", f"n{n}", f"g{gs}", "bias" if bias else "nobias"]
        + [f"{key}={val}" for key, val in extra.items()]
    )
    return c


CASES = (
    # every format x bits x dtype on a shape that is ragged in M and N (tiles 16 x 32)
    [_case(f, b, d) for f in FORMATS for b in (2, 4, 8) for d in ("float32", "bfloat16", "float16")]
    # group sizes 16 / 64 and a non-power-of-two 48 (K tile 16), without bias
    + [_case(f, 4, gs=gs, k=k, n=24, lead=(3,), bias=False) for f in FORMATS for gs, k in ((16, 64), (64, 64), (48, 96))]
    + [_case(f, 2, gs=64, k=128, n=24, lead=(1,)) for f in FORMATS]
    # group 128 spans two K tiles of 64
    + [_case(f, 4, "float16", lead=(2,), n=24, k=256, gs=128) for f in FORMATS]
    # decode-sized and 3-D inputs, several tiles in both M and N
    + [_case(f, 8, lead=(1,), n=24, k=64, gs=16, bias=False) for f in FORMATS]
    + [_case(f, 4, "bfloat16", lead=(2, 3), n=24, k=64) for f in FORMATS]
    + [_case(f, 4, lead=(3, 11), n=72, k=64, gs=64) for f in FORMATS]
    # 3-bit codes (straddle bytes), other scale dtypes, a float32 bias on a 16-bit input, strided x
    + [_case(f, 3, d, lead=(5,), n=24, k=64) for f in FORMATS for d in ("float32", "bfloat16")]
    + [_case("piecewise", 4, "float32", scale_dtype="bfloat16"), _case("uniform_asym", 4, "bfloat16", scale_dtype="float32")]
    + [_case("piecewise", 4, "float16", bias_dtype="float32"), _case("uniform_sym", 2, "float32", strided=True)]
    + [_case("piecewise", 4, "float32", lead=(0,))]
)
CHECKS = ("import_no_gpu_one_config", "rejects_bad_arguments", "backend_dispatch", "piecewise_tails_used")


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PIECEWISE_QUANT_KERNEL_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, __file__], input=json.dumps(CASES), capture_output=True, text=True, env=env, timeout=900
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"kernel worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1])


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_matches_reference(report, case):
    res = report["cases"][case["id"]]
    assert "error" not in res, res.get("error")
    assert res["shape"] == res["ref_shape"]
    assert res["dtype"] == case["dtype"]
    if res["scale"] == 0:  # only the empty-input case has an all-zero output
        assert case["lead"][0] == 0
        return
    assert res["err"] <= TOL[case["dtype"]] * res["scale"], res


@pytest.mark.parametrize("check", CHECKS)
def test_check(report, check):
    res = report["checks"][check]
    assert res["ok"], res["msg"]


# ----------------------------------------------------------------------------------------- worker
def _quantize(torch, fmt, bits, n, k, gs, scale_dtype, seed):
    from piecewise_quant.config import LayerSpec, QuantSpec
    from piecewise_quant.registry import get_format

    grid, sym = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w += (torch.rand(n, k, generator=g) < 0.03) * torch.randn(n, k, generator=g) * 0.3  # outliers: tails
    spec = QuantSpec(grid=grid, bits=bits, group_size=gs, symmetric=sym, scale_dtype=scale_dtype)
    t = get_format(grid).quantize(w, LayerSpec(name="t", spec=spec, in_features=k, out_features=n, group_size=gs))
    return t["qweight"], t["scales"], t.get("qzeros", t.get("breakpoint_ids"))


def _run_case(torch, ref, triton_linear, c, seed):
    dtype = getattr(torch, c["dtype"])
    n, k, gs, bits = c["n"], c["k"], c["gs"], c["bits"]
    qweight, scales, aux = _quantize(torch, c["fmt"], bits, n, k, gs, c.get("scale_dtype", "float16"), seed)
    g = torch.Generator().manual_seed(seed + 1)
    if c.get("strided"):
        x = torch.randn(k, *c["lead"], generator=g).to(dtype).t()  # (M, K) with stride (1, M)
        assert not x.is_contiguous()
    else:
        x = torch.randn(*c["lead"], k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(getattr(torch, c.get("bias_dtype", c["dtype"]))) if c["bias"] else None
    y = triton_linear(x, qweight, scales, aux, bias, c["fmt"], bits, gs, k)
    y_ref = ref.linear(x, qweight, scales, aux, bias, None, c["fmt"], bits, gs, k)
    err = (y.double() - y_ref.double()).abs().max().item() if y.numel() else 0.0
    scale = y_ref.double().abs().max().item() if y.numel() else 0.0
    return {"err": err, "scale": scale, "shape": list(y.shape), "ref_shape": list(y_ref.shape),
            "dtype": str(y.dtype).removeprefix("torch.")}


def _check_import_no_gpu_one_config(torch, mod):
    assert not torch.cuda.is_initialized(), "importing the kernel module initialised CUDA"
    assert len(mod._dequant_matmul_kernel.configs) == 1, "the interpreter must autotune over exactly one config"


def _check_rejects_bad_arguments(torch, triton_linear):
    qweight, scales, aux = _quantize(torch, "uniform_asym", 4, 8, 64, 32, "float16", 0)
    x = torch.randn(2, 64)
    bad = [
        dict(weight_format="fp8_e4m3"), dict(bits=5), dict(group_size=24), dict(group_size=-1),
        dict(x=torch.randn(2, 32)), dict(aux=None), dict(scales=scales[:, :1]), dict(x=x.double()),
        dict(bias=torch.randn(3)), dict(qweight=qweight[:, :-1]),
    ]
    for override in bad:
        args = dict(x=x, qweight=qweight, scales=scales, aux=aux, bias=None, weight_format="uniform_asym", bits=4,
                    group_size=32, in_features=64)
        args.update(override)
        try:
            triton_linear(**args)
        except ValueError:
            continue
        raise AssertionError(f"no ValueError for {list(override)}")


def _check_backend_dispatch(torch, ref):
    """``piecewise_quant::linear`` reaches the kernel through the backend registry when forced
    (the Triton backend is registered for CUDA, so register its linear under a CPU test name)."""
    import piecewise_quant.kernels  # noqa: F401  (registers the op)
    from piecewise_quant.kernels import backends, triton_backend

    tb = triton_backend.triton_backend()
    backends.register_backend(backends.KernelBackend("triton_interpret", "cpu", tb.supports, tb.linear))
    os.environ[backends.ENV_FORCE] = "triton_interpret"
    calls = []
    import piecewise_quant.kernels.triton_dequant_matmul as mod

    real = mod.triton_linear
    mod.triton_linear = lambda *a: calls.append(1) or real(*a)
    try:
        qweight, scales, aux = _quantize(torch, "piecewise", 4, 24, 64, 32, "float16", 3)
        x = torch.randn(2, 3, 64, requires_grad=True)
        bias = torch.randn(24)
        args = (qweight, scales, aux, bias, None, "piecewise", 4, 32, 64, "none", "dynamic_per_token", 1.0, 0)
        y = torch.ops.piecewise_quant.linear(x, *args)
        y.sum().backward()
        y_ref = ref.linear(x.detach(), *args)
    finally:
        mod.triton_linear = real
        os.environ.pop(backends.ENV_FORCE)
        backends.unregister_backend("triton_interpret")
    assert calls, "the op did not dispatch to the Triton backend"
    assert (y.detach() - y_ref).abs().max() <= 1e-4 * y_ref.abs().max(), "dispatched result differs"
    w = ref.dequantize(qweight, scales, aux, "piecewise", 4, 32, 64)
    assert torch.allclose(x.grad, w.sum(0).expand_as(x), atol=1e-5), "wrong input gradient"


def _check_piecewise_tails_used(torch, ref):
    from piecewise_quant.kernels import piecewise_table, unpack_codes

    for bits in (2, 4, 8):
        qweight, scales, aux = _quantize(torch, "piecewise", bits, 40, 96, 32, "float16", 0)
        ids = ref.unpack_group_field(aux, bits, 40, 3).long()
        h = piecewise_table(bits)[ids, 0].repeat_interleave(32, dim=1)
        d = unpack_codes(qweight, bits, 96).float() - 2 ** (bits - 1)
        assert bool((d.abs() > h).any()), f"{bits}-bit piecewise test weights never reach the tails"


def _worker() -> None:
    cases = json.loads(sys.stdin.read())
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    import piecewise_quant.kernels.triton_dequant_matmul as mod
    from piecewise_quant.kernels import reference as ref

    out = {"cases": {}, "checks": {}}
    for i, c in enumerate(cases):
        try:
            out["cases"][c["id"]] = _run_case(torch, ref, mod.triton_linear, c, seed=1000 + i)
        except Exception as e:  # reported per case
            out["cases"][c["id"]] = {"error": f"{type(e).__name__}: {e}"}
    checks = {
        "import_no_gpu_one_config": lambda: _check_import_no_gpu_one_config(torch, mod),
        "rejects_bad_arguments": lambda: _check_rejects_bad_arguments(torch, mod.triton_linear),
        "backend_dispatch": lambda: _check_backend_dispatch(torch, ref),
        "piecewise_tails_used": lambda: _check_piecewise_tails_used(torch, ref),
    }
    for name, fn in checks.items():
        try:
            fn()
            out["checks"][name] = {"ok": True, "msg": ""}
        except Exception as e:
            out["checks"][name] = {"ok": False, "msg": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))


if __name__ == "__main__":
    _worker()
