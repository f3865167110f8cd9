"""The Triton dequantize-matmul on FP4 weights (``mxfp4``, ``nvfp4``: E2M1 codes, block scales
decoded from their bits inside the kernel) against the pure-torch reference, under
``TRITON_INTERPRET=1`` on CPU (and on a GPU when there is one). Same plumbing and tolerances as
``test_triton_dequant_matmul.py``: every kernel run happens in one subprocess (this file run as a
script)."""

from __future__ import annotations

import functools

import pytest

pytestmark = pytest.mark.triton

TOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 2e-2}
BLOCK = {"mxfp4": 32, "nvfp4": 16}


def _case(fmt, dtype="float32", m=3, n=40, k=96, bias=True, raw=False):
    return dict(fmt=fmt, dtype=dtype, m=m, n=n, k=k, bias=bias, raw=raw,
                id=f"{fmt}-{dtype}-m{m}-n{n}-k{k}{'-bias' if bias else ''}{'-rawbits' if raw else ''}")


CASES = (
    # skinny (M <= 16) and large (M > 16) paths, every activation dtype
    [_case(f, d, m) for f in BLOCK for d in ("float32", "bfloat16", "float16") for m in (1, 17)]
    # 9..16 rows (tl.dot on padded rows where a phase is long enough), no bias, several K splits
    + [_case(f, "float16", 12, n=24, k=256, bias=False) for f in BLOCK]
    # scales from random bits: every E8M0 exponent near 2**0 and 2**-127 (subnormal), E4M3 subnormal and negative
    + [_case(f, "float32", m, raw=True) for f in BLOCK for m in (2, 20)]
)
GPU_CASES = [_case(f, d, m, n=n, k=k) for f in BLOCK for d in ("float16", "bfloat16")
             for m, n, k in ((1, 4096, 4096), (16, 11008, 4096), (300, 1024, 2048))]


def _assert_case(kernel_worker, res, case):
    kernel_worker.assert_close(res, case, TOL[case["dtype"]], shape=[case["m"], case["n"]],
                               path="skinny" if case["m"] <= 16 else "large")


@pytest.fixture(scope="module")
def report(kernel_worker):
    pytest.importorskip("triton")
    return kernel_worker.run(__file__, CASES, "cpu", timeout=600)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_matches_reference(report, case, kernel_worker):
    _assert_case(kernel_worker, report["cases"][case["id"]], case)


def test_bad_arguments_are_refused(report):
    res = report["checks"]["rejects_bad_arguments"]
    assert res["ok"], res["msg"]


def test_cuda_backend_routes_fp4_weights_to_the_kernel():
    """Weight-only FP4 calls go to the dequantize-GEMM; FP4 activations (simulated) to the reference."""
    pytest.importorskip("triton")
    torch = pytest.importorskip("torch")
    from piecewise_quant.kernels import triton_backend

    for fmt, block in BLOCK.items():
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            assert triton_backend._supports(fmt, 4, block, dtype, "none")
        assert not triton_backend._supports(fmt, 4, block, torch.float16, fmt)


@pytest.mark.gpu
def test_matches_reference_on_gpu_at_realistic_shapes(kernel_worker):
    pytest.importorskip("triton")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    kernel_worker.assert_every_case(GPU_CASES, kernel_worker.run(__file__, GPU_CASES, "cuda", timeout=1800),
                                    functools.partial(_assert_case, kernel_worker))


# ----------------------------------------------------------------------------------------- worker
def _tensors(torch, fmt, n, k, seed, raw):
    from piecewise_quant.config import LayerSpec, QuantSpec
    from piecewise_quant.registry import get_format

    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(grid=fmt)
    layer = LayerSpec(name="t", spec=spec, in_features=k, out_features=n, group_size=BLOCK[fmt])
    w = torch.randn(n, k, generator=g) * 0.05
    t = get_format(fmt).quantize(w, layer)
    if raw:
        shape = t["scales"].shape
        if fmt == "mxfp4":
            s = torch.randint(120, 131, shape, generator=g, dtype=torch.uint8)
            s[0, 0] = 0  # 2**-127
            t["scales"] = s
        else:
            bits = torch.randint(0, 0x7F, shape, generator=g, dtype=torch.uint8)  # no NaN (0x7F / 0xFF)
            bits[:, 0] = torch.arange(shape[0], dtype=torch.uint8) % 8  # subnormals and zero
            bits[::3] |= 0x80  # negative scales
            t["scales"] = bits.view(torch.float8_e4m3fn)
            t["global_scale"] = torch.tensor([0.01])
    return t["qweight"], t["scales"], t.get("global_scale")


def _run_case(torch, ref, mod, c, seed, device, paths):
    dtype = getattr(torch, c["dtype"])
    qweight, scales, aux = (t.to(device) if t is not None else None
                            for t in _tensors(torch, c["fmt"], c["n"], c["k"], seed, c["raw"]))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(c["m"], c["k"], generator=g).to(dtype).to(device)
    bias = torch.randn(c["n"], generator=g).to(dtype).to(device) if c["bias"] else None
    paths.clear()
    gs = BLOCK[c["fmt"]]
    y = mod.triton_linear(x, qweight, scales, aux, bias, c["fmt"], 4, gs, c["k"])
    y_ref = ref.linear(x, qweight, scales, aux, bias, None, c["fmt"], 4, gs, c["k"])
    return {"err": (y.double() - y_ref.double()).abs().max().item(), "scale": y_ref.double().abs().max().item(),
            "shape": list(y.shape), "path": paths[0] if len(paths) == 1 else None}


def _check_rejects_bad_arguments(torch, triton_linear):
    x = torch.randn(2, 64)
    for fmt in BLOCK:
        qweight, scales, aux = _tensors(torch, fmt, 8, 64, 0, False)
        bad = [dict(bits=2), dict(scales=scales.to(torch.float16)), dict(group_size=24)]
        if fmt == "nvfp4":
            bad += [dict(aux=None), dict(aux=aux.double()), dict(aux=torch.ones(2))]
        for override in bad:
            args = dict(x=x, qweight=qweight, scales=scales, aux=aux, bias=None, weight_format=fmt, bits=4,
                        group_size=BLOCK[fmt], in_features=64)
            args.update(override)
            try:
                triton_linear(**args)
            except ValueError:
                continue
            raise AssertionError(f"{fmt}: no ValueError for {list(override)}")


def _worker() -> None:
    import torch
    from _kernel_worker import serve

    import piecewise_quant.kernels.triton_dequant_matmul as mod
    from piecewise_quant.kernels import reference as ref

    paths: list[str] = []
    for name in ("skinny", "large"):
        launch = getattr(mod, f"_launch_{name}")
        setattr(mod, f"_launch_{name}", lambda *a, _f=launch, _n=name: paths.append(_n) or _f(*a))
    serve({"rejects_bad_arguments": lambda: _check_rejects_bad_arguments(torch, mod.triton_linear)},
          lambda c, i, device: _run_case(torch, ref, mod, c, 2000 + i, device, paths))


if __name__ == "__main__":
    _worker()
