"""The Triton dequantize-matmul (skinny split-K path for M <= 16, ``tl.dot`` tiles above) against
the pure-torch reference, under ``TRITON_INTERPRET=1`` on CPU, and on a GPU when there is one.

``triton.jit`` decides at decoration time (when ``triton_dequant_matmul`` is imported) whether a
kernel is interpreted, so every kernel run happens in ONE subprocess started with
``TRITON_INTERPRET=1`` (this file run as a script): the pytest process never imports the kernel
module, and another test module having imported Triton (or the kernel) already cannot change the
mode. The subprocess runs every case and check and returns a JSON report; each test below asserts
on its entry.

Interpreter quirks (Triton 3.9) the tolerances allow for: float32 -> bfloat16 casts truncate
instead of rounding to nearest even (on a GPU they round), and ``tl.dot`` on bfloat16 operands is
broken (the kernels upcast them to float32 under the interpreter, see triton#11584). The bf16
tolerance covers the truncation: the dequantized weight and the output are each cut to 8 bits of
mantissa instead of rounded (relative error up to 2**-7 per element rather than 2**-8).
"""

from __future__ import annotations

import functools
import os

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
    # skinny path (M <= 16): every bit width, M 1..16 (9..16 use tl.dot on 16 padded rows when a
    # phase has >= 16 codes), groups 32..256 (256 spans 8 K tiles of 32), 3-bit with group 16
    + [_case(f, b, d, lead=(m,), n=40, k=256, gs=gs)
       for f in FORMATS for b, d, m, gs in ((4, "float16", 16, 128), (3, "bfloat16", 7, 32), (8, "float16", 12, 64))]
    + [_case(f, b, "float16", lead=(m,), n=24, k=512, gs=256, bias=False) for f in FORMATS for b, m in ((4, 1), (2, 16))]
    + [_case("piecewise", 3, "float32", lead=(4,), n=24, k=64, gs=16), _case("uniform_asym", 2, "bfloat16", lead=(2, 2))]
)
CHECKS = ("import_no_gpu_one_config", "rejects_bad_arguments", "backend_dispatch", "piecewise_tails_used",
          "skinny_splits_k")
# realistic shapes for the GPU test: (format, bits, dtype, M, N, K, group size)
GPU_CASES = [
    _case(f, b, d, lead=(m,), n=n, k=k, gs=gs)
    for f in FORMATS
    for b, d, gs in ((4, "float16", 128), (3, "bfloat16", 128), (8, "float16", 256), (2, "bfloat16", 32))
    for m, n, k in ((1, 4096, 4096), (16, 11008, 4096), (64, 4096, 11008), (300, 1024, 2048))
]


def _expected_path(case) -> str | None:
    m = 1
    for d in case["lead"]:
        m *= d
    return None if m == 0 else ("skinny" if m <= 16 else "large")


def _assert_case(kernel_worker, res, case):
    kernel_worker.assert_close(res, case, TOL[case["dtype"]])
    assert res["path"] == _expected_path(case), res  # None for empty input: no kernel runs


@pytest.fixture(scope="module")
def report(kernel_worker):
    pytest.importorskip("triton")
    return kernel_worker.run(__file__, CASES, "cpu", timeout=900)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_matches_reference(report, case, kernel_worker):
    _assert_case(kernel_worker, report["cases"][case["id"]], case)


@pytest.mark.parametrize("check", CHECKS)
def test_check(report, check):
    res = report["checks"][check]
    assert res["ok"], res["msg"]


@pytest.mark.gpu
def test_matches_reference_on_gpu_at_realistic_shapes(kernel_worker):
    """The same comparison compiled for a GPU (no interpreter), on Llama-sized layers."""
    pytest.importorskip("triton")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    kernel_worker.assert_every_case(GPU_CASES, kernel_worker.run(__file__, GPU_CASES, "cuda", timeout=1800),
                                    functools.partial(_assert_case, kernel_worker))


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


def _run_case(torch, ref, mod, c, seed, device, paths):
    dtype = getattr(torch, c["dtype"])
    n, k, gs, bits = c["n"], c["k"], c["gs"], c["bits"]
    qweight, scales, aux = _quantize(torch, c["fmt"], bits, n, k, gs, c.get("scale_dtype", "float16"), seed)
    qweight, scales, aux = (t.to(device) if t is not None else None for t in (qweight, scales, aux))
    g = torch.Generator().manual_seed(seed + 1)
    if c.get("strided"):
        x = torch.randn(k, *c["lead"], generator=g).to(dtype).t()  # (M, K) with stride (1, M)
        assert not x.is_contiguous()
    else:
        x = torch.randn(*c["lead"], k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(getattr(torch, c.get("bias_dtype", c["dtype"]))) if c["bias"] else None
    x = x.to(device)
    bias = bias.to(device) if bias is not None else None
    paths.clear()
    y = mod.triton_linear(x, qweight, scales, aux, bias, c["fmt"], bits, gs, k)
    y_ref = ref.linear(x, qweight, scales, aux, bias, None, c["fmt"], bits, gs, k)
    err = (y.double() - y_ref.double()).abs().max().item() if y.numel() else 0.0
    scale = y_ref.double().abs().max().item() if y.numel() else 0.0
    return {"err": err, "scale": scale, "shape": list(y.shape), "ref_shape": list(y_ref.shape),
            "dtype": str(y.dtype).removeprefix("torch."), "path": paths[0] if len(paths) == 1 else None}


def _check_import_no_gpu_one_config(torch, mod):
    assert not torch.cuda.is_initialized(), "importing the kernel module initialised CUDA"
    for kernel in (mod._dequant_matmul_kernel, mod._skinny_kernel):
        assert len(kernel.configs) == 1, "the interpreter must autotune over exactly one config"


def _check_skinny_splits_k(torch, mod):
    """The interpreter's skinny config splits K of a (N=40, K=96, group 32) layer over 2 programs per
    column block (TARGET_PROGRAMS=4), one with 2 K tiles and one with 1, so partial sums are combined."""
    (cfg,) = mod._skinny_kernel.configs
    block_k = mod._skinny_block_k(32, 4, 16)
    args = {"N": 40, "K": 96, "TARGET_PROGRAMS": mod._target_programs(torch.device("cpu")), "BLOCK_K": block_k,
            **cfg.kwargs}
    tiles = 96 // block_k
    per_split = mod._tiles_per_split(args)
    assert 1 < per_split < tiles, (per_split, tiles)
    assert mod.choose_path(16) == "skinny" and mod.choose_path(17) == "large"


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
    import torch
    from _kernel_worker import serve

    import piecewise_quant.kernels.triton_dequant_matmul as mod
    from piecewise_quant.kernels import reference as ref

    paths: list[str] = []
    for name in ("skinny", "large"):  # record which kernel each call launched
        launch = getattr(mod, f"_launch_{name}")
        setattr(mod, f"_launch_{name}", lambda *a, _f=launch, _n=name: paths.append(_n) or _f(*a))

    serve(
        {
            "import_no_gpu_one_config": lambda: _check_import_no_gpu_one_config(torch, mod),
            "rejects_bad_arguments": lambda: _check_rejects_bad_arguments(torch, mod.triton_linear),
            "backend_dispatch": lambda: _check_backend_dispatch(torch, ref),
            "piecewise_tails_used": lambda: _check_piecewise_tails_used(torch, ref),
            "skinny_splits_k": lambda: _check_skinny_splits_k(torch, mod),
        },
        lambda c, i, device: _run_case(torch, ref, mod, c, 1000 + i, device, paths),
    )


if __name__ == "__main__":
    _worker()
