"""The torch.library ops: reference semantics, fake tensors, autograd, torch.compile, backends."""

from __future__ import annotations

import pytest
import torch

import piecewise_quant as pq
from piecewise_quant.kernels import KernelBackend, ops, reference, register_backend, unregister_backend


def _layer(grid="piecewise", bits=4, group=32, act_bits=None, **kw):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    m = pq.quantize(torch.nn.Sequential(lin),
                    pq.PiecewiseQuantConfig(grid=grid, bits=bits, group_size=group, act_bits=act_bits, **kw),
                    progress=False)
    return m[0]


def _op_args(q, x):
    t = q.quantized_tensors()
    aux = t.get("qzeros", t.get("breakpoint_ids"))
    return (x, t["qweight"], t["scales"], aux, q.bias, None, q.fmt.kernel_format(q.spec), q.spec.bits,
            q.layer_spec.group_size, q.in_features, "none", "dynamic_per_token", 1.0, 0)


def test_ops_are_registered_under_the_project_namespace():
    assert hasattr(torch.ops.piecewise_quant, "linear")
    assert hasattr(torch.ops.piecewise_quant, "dequantize")
    assert hasattr(torch.ops.piecewise_quant, "quantize_activation")


def test_opcheck_passes_for_linear():
    q = _layer()
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.piecewise_quant.linear.default, _op_args(q, x))


def test_gradients_flow_to_input_and_bias_like_a_float_linear():
    q = _layer()
    q.bias.requires_grad_(True)
    x = torch.randn(5, 64, requires_grad=True)
    y = q(x)
    y.square().sum().backward()
    w = q.dequantize().detach()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = q.bias.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, w, b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(q.bias.grad, b2.grad)


def test_activation_quantization_passes_gradients_straight_through():
    q = _layer(act_bits=8)
    x = torch.randn(5, 64, requires_grad=True)
    q(x).sum().backward()
    expected = torch.ones(5, 48) @ q.dequantize()
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.slow
def test_quant_linear_compiles_with_torch_compile():
    q = _layer()
    x = torch.randn(4, 64)
    eager = q(x)
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)


def test_registered_backend_is_used_and_reference_can_be_forced(monkeypatch):
    calls = []

    def fake_linear(*args):
        calls.append(args[6])
        return reference.linear(*args) + 1.0

    register_backend(KernelBackend("test-cpu", "cpu", lambda *a: True, fake_linear, priority=99))
    try:
        q = _layer()
        x = torch.randn(2, 64)
        expected = reference.linear(*_op_args(q, x))
        torch.testing.assert_close(ops.linear(*_op_args(q, x)), expected + 1.0)
        assert calls == ["piecewise"]
        monkeypatch.setenv("PIECEWISE_QUANT_KERNEL_BACKEND", "reference")
        torch.testing.assert_close(ops.linear(*_op_args(q, x)), expected)
    finally:
        unregister_backend("test-cpu")
    with pytest.raises(ValueError, match="reserved"):
        register_backend(KernelBackend("reference", "cpu", lambda *a: True, fake_linear))


def test_builtin_triton_backend_is_registered_for_cuda_only_through_the_plugin_hook():
    from piecewise_quant.kernels import registered_backends
    from piecewise_quant.qlinear import ensure_runtime

    ensure_runtime()
    b = registered_backends()["triton"]
    assert b.device_type == "cuda"
    assert b.supports("piecewise", 4, 128, torch.float16, "none") in (True, False)  # True when triton imports
    assert not b.supports("piecewise", 3, 128, torch.float16, "none")
    assert not b.supports("piecewise", 4, 128, torch.float16, "int8")
