"""Smoke benchmark of the Triton dequantize-matmul: correctness against the reference and timings
against dequantize + ``F.linear`` (cuBLAS), on a CUDA device.

    python benchmarks/kernels_smoke.py [--n 4096 --k 4096 --bits 4 --group-size 128]

Without CUDA (or Triton) it says so and exits 0. Results are printed, not stored.
"""

from __future__ import annotations

import argparse
import sys

import torch


def _quantized(fmt: str, n: int, k: int, bits: int, gs: int, device: str):
    from piecewise_quant.kernels import pack_codes
    from piecewise_quant.kernels import reference as ref

    g = torch.Generator().manual_seed(0)
    n_groups = k // gs
    qweight = pack_codes(torch.randint(0, 1 << bits, (n, k), generator=g), bits)
    scales = (torch.rand(n, n_groups, generator=g) * 0.01 + 1e-3).to(torch.float16)
    aux = None
    if fmt == "piecewise":
        scales = scales * torch.where(torch.rand(n, n_groups, generator=g) < 0.5, -1.0, 1.0).to(torch.float16)
    if fmt != "uniform_sym":
        aux = ref.pack_group_field(torch.randint(0, 1 << bits, (n, n_groups), generator=g), bits)
    return [t.to(device) if t is not None else None for t in (qweight, scales, aux)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--m", type=int, nargs="*", default=[1, 16, 128, 1024])
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("kernels_smoke: no CUDA device; the Triton kernel is only checked under TRITON_INTERPRET=1 on CPU "
              "(tests/kernels/test_triton_dequant_matmul.py)")
        return 0
    try:
        import triton.testing
    except ImportError:
        print("kernels_smoke: Triton is not installed")
        return 0
    from piecewise_quant.kernels import reference as ref
    from piecewise_quant.kernels.triton_dequant_matmul import triton_linear

    dtype = getattr(torch, args.dtype)
    n, k, bits, gs = args.n, args.k, args.bits, args.group_size
    print(f"{torch.cuda.get_device_name()}  N={n} K={k} bits={bits} group_size={gs} dtype={args.dtype}")
    print(f"{'format':13s} {'M':>5s} {'triton ms':>10s} {'deq+mm ms':>10s} {'mm only ms':>10s} {'rel err':>9s}")
    for fmt in ("uniform_sym", "uniform_asym", "piecewise"):
        qweight, scales, aux = _quantized(fmt, n, k, bits, gs, "cuda")
        w = ref.dequantize(qweight, scales, aux, fmt, bits, gs, k, dtype)
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            y = triton_linear(x, qweight, scales, aux, None, fmt, bits, gs, k)
            y_ref = torch.nn.functional.linear(x, w)
            err = ((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max()).item()
            t_tri = triton.testing.do_bench(lambda: triton_linear(x, qweight, scales, aux, None, fmt, bits, gs, k))
            t_deq = triton.testing.do_bench(lambda: ref.linear(x, qweight, scales, aux, None, None, fmt, bits, gs, k))
            t_mm = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w))
            print(f"{fmt:13s} {m:5d} {t_tri:10.4f} {t_deq:10.4f} {t_mm:10.4f} {err:9.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
