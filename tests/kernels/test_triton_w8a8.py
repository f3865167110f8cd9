"""The Triton W8A8 GEMM (int8 and FP8 E4M3) and its activation-quantization producer against the
pure-torch reference, under ``TRITON_INTERPRET=1`` on CPU, and on a GPU when there is one.

As in ``test_triton_dequant_matmul.py``, every kernel run happens in ONE subprocess (this file run
as a script) because ``triton.jit`` decides interpretation at decoration time; it returns a JSON
report that the tests below assert on.

Interpreter quirks (Triton 3.9): float32 -> bfloat16 casts truncate (the bf16 tolerance allows for
it), and float32 -> fp8 casts are wrong when rounding carries into the exponent (31.5 -> 16), so
under the interpreter the producer rounds to the E4M3 grid itself before the cast
(``FP8_GRID_FIX``); the GPU uses the hardware conversion. FP8 ``tl.dot`` runs in the interpreter.
"""

from __future__ import annotations

import functools
import os

import pytest

pytestmark = pytest.mark.triton

PAIRS = {"int8": ("uniform", "uniform_sym", "int8"), "fp8": ("fp8", "fp8_e4m3", "fp8_e4m3")}
# tolerance on max |y - y_ref|, relative to max |y_ref|; the reference rounds the dequantized
# operands to x's dtype before its float matmul, the kernel scales an exact 8-bit product once
TOL = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}


def _case(kind, dtype="float16", lead=(17,), n=40, k=100, mode="dynamic_per_token", per_tensor=False, bias=True,
          clip=1.0, **extra):
    c = dict(kind=kind, dtype=dtype, lead=list(lead), n=n, k=k, mode=mode, per_tensor=per_tensor, bias=bias,
             clip=clip, **extra)
    c["id"] = "-".join([kind, dtype, "x".join(map(str, lead)) + f"x{k}", f"n{n}", mode.split("_")[0],
                        "tensor" if per_tensor else "channel", "bias" if bias else "nobias", f"clip{clip}"]
                       + [f"{key}={val}" for key, val in extra.items()])
    return c


CASES = (
    # both kinds x dtypes x modes on a shape ragged in M, N and K (tiles 16 x 32 x 32)
    [_case(kind, d, mode=m) for kind in PAIRS for d in ("float32", "bfloat16", "float16")
     for m in ("dynamic_per_token", "static_per_tensor")]
    # decode-sized, 3-D, per-tensor weight scale, clipping, several M tiles, a zero row
    + [_case(kind, "float16", lead=(1,), n=24, k=64, bias=False) for kind in PAIRS]
    + [_case(kind, "bfloat16", lead=(2, 3), n=72, k=96, per_tensor=True, clip=0.8) for kind in PAIRS]
    + [_case(kind, "float16", lead=(37,), n=24, k=2100, clip=0.9) for kind in PAIRS]
    + [_case(kind, "float32", lead=(5,), n=24, k=64, zero_row=True) for kind in PAIRS]
    + [_case("int8", "float32", lead=(0,))]
)
CHECKS = ("import_no_gpu_one_config", "activation_codes_exact", "rejects_bad_arguments", "backend_dispatch")
GPU_CASES = [_case(kind, d, lead=(m,), n=n, k=k)
             for kind in PAIRS for d in ("float16", "bfloat16")
             for m, n, k in ((1, 4096, 4096), (16, 11008, 4096), (256, 4096, 11008), (1000, 2048, 2048))]


def _assert_case(kernel_worker, res, case):
    kernel_worker.assert_close(res, case, TOL[case["dtype"]])


@pytest.fixture(scope="module")
def report(kernel_worker):
    pytest.importorskip("triton")
    return kernel_worker.run(__file__, CASES, "cpu", timeout=600)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_matches_reference(report, case, kernel_worker):
    _assert_case(kernel_worker, report["cases"][case["id"]], case)


@pytest.mark.parametrize("check", CHECKS)
def test_check(report, check):
    res = report["checks"][check]
    assert res["ok"], res["msg"]


@pytest.mark.gpu
def test_matches_reference_on_gpu_at_realistic_shapes(kernel_worker):
    """The same comparison compiled for a GPU; FP8 cases need compute capability 8.9+."""
    pytest.importorskip("triton")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cases = GPU_CASES if torch.cuda.get_device_capability() >= (8, 9) else [c for c in GPU_CASES if c["kind"] == "int8"]
    kernel_worker.assert_every_case(cases, kernel_worker.run(__file__, cases, "cuda", timeout=1800),
                                    functools.partial(_assert_case, kernel_worker))


# ----------------------------------------------------------------------------------------- worker
def _quantize(torch, kind, n, k, per_tensor, seed):
    from piecewise_quant.config import LayerSpec, QuantSpec
    from piecewise_quant.registry import get_format

    grid = PAIRS[kind][0]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    spec = QuantSpec(grid=grid, bits=8, group_size="tensor" if per_tensor else "channel", symmetric=True)
    gs = -1 if per_tensor else k
    t = get_format(grid).quantize(w, LayerSpec(name="t", spec=spec, in_features=k, out_features=n, group_size=gs))
    return t["qweight"], t["scales"], gs


def _inputs(torch, c, seed, device):
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, c["dtype"])
    x = torch.randn(*c["lead"], c["k"], generator=g) * 2
    x += (torch.rand(x.shape, generator=g) < 0.01) * torch.randn(x.shape, generator=g) * 20  # outlier channels
    if c.get("zero_row"):
        x[1] = 0
    bias = torch.randn(c["n"], generator=g).to(dtype).to(device) if c["bias"] else None
    act_scale = None
    if c["mode"] == "static_per_tensor":
        qmax = 127.0 if c["kind"] == "int8" else 448.0
        act_scale = (x.abs().amax() * 0.5 / qmax).reshape(()).to(device)  # clips the largest values
    return x.to(dtype).to(device), bias, act_scale


def _run_case(torch, ref, mod, c, seed, device):
    qweight, scales, gs = _quantize(torch, c["kind"], c["n"], c["k"], c["per_tensor"], seed)
    qweight, scales = qweight.to(device), scales.to(device)
    x, bias, act_scale = _inputs(torch, c, seed + 1, device)
    _, wfmt, afmt = PAIRS[c["kind"]]
    y = mod.w8a8_linear(x, qweight, scales, bias, wfmt, gs, c["k"], afmt, c["mode"], act_scale, c["clip"])
    y_ref = ref.linear(x, qweight, scales, None, bias, act_scale, wfmt, 8, gs, c["k"], afmt, c["mode"], c["clip"], 0)
    err = (y.double() - y_ref.double()).abs().max().item() if y.numel() else 0.0
    scale = y_ref.double().abs().max().item() if y.numel() else 0.0
    return {"err": err, "scale": scale, "shape": list(y.shape), "ref_shape": list(y_ref.shape),
            "dtype": str(y.dtype).removeprefix("torch.")}


def _check_import_no_gpu_one_config(torch, mod):
    assert not torch.cuda.is_initialized(), "importing the kernel module initialised CUDA"
    assert len(mod._w8a8_kernel.configs) == 1, "the interpreter must autotune over exactly one config"


def _check_activation_codes_exact(torch, ref, mod):
    """``q * s`` equals the reference's float32 quantize-dequantize exactly, including round-half-even
    ties, values that round up to the next E4M3 binade, clipping and a zero row."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 300, generator=g) * 30
    x[0, :8] = torch.tensor([0.5, 1.5, 2.5, -2.5, 31.5, -31.5, 15.75, 127.0]) / 127.0 * 1000  # ties at s=1000/127
    x[0, 8] = 1000.0
    x[3] = 0
    for fmt in ("int8", "fp8_e4m3"):
        for mode, scale in (("dynamic_per_token", None), ("static_per_tensor", torch.tensor(0.07))):
            for clip in (1.0, 0.7):
                q, s = mod.quantize_activation_8bit(x, fmt, mode, scale, clip)
                want = ref.quantize_activation(x, fmt, mode, scale, clip, 0)
                got = q.to(torch.float32) * s[:, None]
                bad = (got != want).sum().item()
                assert bad == 0, f"{fmt} {mode} clip={clip}: {bad} codes differ"


def _check_rejects_bad_arguments(torch, mod):
    qweight, scales, gs = _quantize(torch, "int8", 8, 64, False, 0)
    x = torch.randn(2, 64)
    bad = [
        dict(weight_format="piecewise"), dict(act_format="fp8_e4m3"), dict(group_size=32),
        dict(x=torch.randn(2, 32)), dict(x=x.double()), dict(scales=scales[:1]),
        dict(qweight=qweight.to(torch.int8)), dict(bias=torch.randn(3)),
        dict(act_mode="static_per_tensor"), dict(act_mode="per_group"),
    ]
    for override in bad:
        args = dict(x=x, qweight=qweight, scales=scales, bias=None, weight_format="uniform_sym", group_size=gs,
                    in_features=64, act_format="int8")
        args.update(override)
        try:
            mod.w8a8_linear(**args)
        except ValueError:
            continue
        raise AssertionError(f"no ValueError for {list(override)}")


def _check_backend_dispatch(torch, ref):
    """``piecewise_quant::linear`` reaches the W8A8 kernel through the backend (registered under a CPU
    test name) for per-channel int8 calls, and falls back to the reference for top-k clipping and
    grouped 8-bit weights; FP8 needs a GPU of capability 8.9+, so on CPU it falls back too."""
    import piecewise_quant.kernels  # noqa: F401  (registers the op)
    import piecewise_quant.kernels.triton_w8a8 as mod
    from piecewise_quant.kernels import backends, triton_backend

    tb = triton_backend.triton_backend()
    backends.register_backend(backends.KernelBackend("triton_interpret", "cpu", tb.supports, tb.linear))
    os.environ[backends.ENV_FORCE] = "triton_interpret"
    calls = []
    real = mod.w8a8_linear
    mod.w8a8_linear = lambda *a: calls.append(1) or real(*a)
    try:
        results = {}
        for name, kind, topk, grouped in (("int8", "int8", 0, False), ("topk", "int8", 2, False),
                                          ("grouped", "int8", 0, True), ("fp8", "fp8", 0, False)):
            if grouped:
                from piecewise_quant.config import LayerSpec, QuantSpec
                from piecewise_quant.registry import get_format

                spec = QuantSpec(grid="uniform", bits=8, group_size=32, symmetric=True)
                w = torch.randn(24, 64) * 0.05
                t = get_format("uniform").quantize(w, LayerSpec(name="t", spec=spec, in_features=64, out_features=24,
                                                                group_size=32))
                qweight, scales, gs = t["qweight"], t["scales"], 32
            else:
                qweight, scales, gs = _quantize(torch, kind, 24, 64, False, 3)
            _, wfmt, afmt = PAIRS[kind]
            x = torch.randn(2, 3, 64)
            args = (qweight, scales, None, None, None, wfmt, 8, gs, 64, afmt, "dynamic_per_token", 1.0, topk)
            before = len(calls)
            y = torch.ops.piecewise_quant.linear(x, *args)
            y_ref = ref.linear(x, *args)
            results[name] = (len(calls) > before, (y - y_ref).abs().max().item() / y_ref.abs().max().item())
    finally:
        mod.w8a8_linear = real
        os.environ.pop(backends.ENV_FORCE)
        backends.unregister_backend("triton_interpret")
    assert results["int8"][0], "the per-channel int8 call did not reach the W8A8 kernel"
    for name in ("topk", "grouped", "fp8"):
        assert not results[name][0], f"the {name} call should fall back to the reference"
    for name, (_, err) in results.items():
        assert err <= 1e-5, f"{name}: dispatched result differs by {err}"


def _worker() -> None:
    import torch
    from _kernel_worker import serve

    import piecewise_quant.kernels.triton_w8a8 as mod
    from piecewise_quant.kernels import reference as ref

    serve(
        {
            "import_no_gpu_one_config": lambda: _check_import_no_gpu_one_config(torch, mod),
            "activation_codes_exact": lambda: _check_activation_codes_exact(torch, ref, mod),
            "rejects_bad_arguments": lambda: _check_rejects_bad_arguments(torch, mod),
            "backend_dispatch": lambda: _check_backend_dispatch(torch, ref),
        },
        lambda c, i, device: _run_case(torch, ref, mod, c, 2000 + 2 * i, device),
    )


if __name__ == "__main__":
    _worker()
