"""GPTQ error compensation (Frantar et al., ICLR 2023) on every built-in grid.

Quality is measured on a real weight (the bundled tiny Llama's ``layers.0.mlp.down_proj``, 256x768)
with correlated calibration inputs that have a few high-variance channels, as a layer's inputs
in a transformer do. The algorithm itself is checked against a direct, unoptimised float64
implementation of the optimal-brain-quantizer updates GPTQ is derived from.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors import safe_open

from piecewise_quant.calibration.gptq import GPTQResult, HessianAccumulator, gptq_quantize, hessian_from_inputs
from piecewise_quant.config import QuantSpec
from piecewise_quant.formats.base import TensorLayout, WeightFormat
from piecewise_quant.formats.groups import group_view, importance_view
from piecewise_quant.qlinear import QuantLinear
from piecewise_quant.quantization import layer_spec_for
from piecewise_quant.registry import get_format

N_TOKENS = 2048

# (grid, bits, group_size, symmetric): the grids of the acceptance criteria, plus per-tensor
GRIDS = {
    "uniform-asym-4b-g128": ("uniform", 4, 128, False),
    "uniform-sym-3b-channel": ("uniform", 3, "channel", True),
    "piecewise-4b-g128": ("piecewise", 4, 128, None),
    "piecewise-3b-g64": ("piecewise", 3, 64, None),
    "fp8-channel": ("fp8", 8, "channel", None),
    "uniform-sym-4b-tensor": ("uniform", 4, "tensor", True),
}
# Output-error ratio GPTQ / round-to-nearest measured on this layer, over 3 data seeds: 0.32-0.40 with
# act_order, 0.35-0.59 without (per-tensor is the weakest). The bound leaves headroom yet demands
# a 25% reduction, which nothing short of real error compensation reaches.
RATIO_VS_RTN = 0.75
# ... and against round-to-nearest with the same activation-aware group parameters: 0.36-0.61
RATIO_VS_AWARE_RTN = 0.8


def _layer(key: str, in_f: int, out_f: int, name: str = "model.layers.0.mlp.down_proj"):
    grid, bits, gs, sym = GRIDS[key]
    kw = {"grid": grid, "bits": bits, "group_size": gs}
    if sym is not None:
        kw["symmetric"] = sym
    return layer_spec_for(name, QuantSpec(**kw), in_f, out_f), get_format(grid)


def _inputs(n: int, in_f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, in_f, generator=g)
    a = torch.randn(in_f, in_f, generator=g) / math.sqrt(in_f)
    x = z @ a + 0.3 * torch.randn(n, in_f, generator=g)
    hot = torch.randperm(in_f, generator=g)[:8]
    x[:, hot] *= 10.0  # a few outlier channels
    return x


@pytest.fixture(scope="module")
def real_weight(tiny_llama_path) -> torch.Tensor:
    with safe_open(str(tiny_llama_path / "model.safetensors"), "pt") as f:
        return f.get_tensor("model.layers.0.mlp.down_proj.weight").to(torch.float32)


@pytest.fixture(scope="module")
def calib(real_weight):
    x = _inputs(N_TOKENS, real_weight.shape[1])
    return x, hessian_from_inputs(x, name="down_proj")


def _out_err(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x.double() @ (w - q).double().t()).square().sum())


# ---- quality and storage, every grid -------------------------------------------------------------


@pytest.mark.parametrize("act_order", [True, False], ids=["act_order", "natural"])
@pytest.mark.parametrize("key", list(GRIDS))
def test_gptq_beats_round_to_nearest_and_stores_what_it_chose(key, act_order, real_weight, calib):
    x, h = calib
    w = real_weight
    layer, fmt = _layer(key, w.shape[1], w.shape[0])
    res = gptq_quantize(w, h, layer, fmt, act_order=act_order)
    assert isinstance(res, GPTQResult)

    rtn = fmt.dequantize(fmt.quantize(w, layer), layer, torch.float32)
    imp = importance_view(torch.diagonal(h), layer)
    aware = fmt.dequantize(fmt.encode(w, fmt.fit(group_view(w, layer), layer, importance=imp), layer), layer, torch.float32)
    e_gptq, e_rtn, e_aware = _out_err(x, w, res.weight), _out_err(x, w, rtn), _out_err(x, w, aware)
    assert e_gptq < RATIO_VS_RTN * e_rtn, (e_gptq / e_rtn)
    assert e_gptq < RATIO_VS_AWARE_RTN * e_aware, (e_gptq / e_aware)
    # the reported objective is the mean squared output error per token
    assert res.error == pytest.approx(e_gptq / N_TOKENS, rel=1e-3)
    assert res.damp == pytest.approx(0.01) and res.n_dead == 0

    # the stored tensors: exactly the layout, and they represent exactly the returned weight
    layout = fmt.layout(layer)
    assert list(res.tensors) == list(layout)
    for name, lay in layout.items():
        assert tuple(res.tensors[name].shape) == lay.shape and res.tensors[name].dtype == lay.dtype, name
    assert res.weight.dtype == torch.float32 and res.weight.shape == w.shape
    assert torch.equal(fmt.dequantize(res.tensors, layer, torch.float32), res.weight)
    # every returned weight lies on the grid of the returned params (re-rounding changes nothing)
    groups = group_view(res.weight, layer)
    assert torch.equal(fmt.fake_quantize(groups, res.params, layer), groups)

    q = QuantLinear.empty(layer, fmt, bias=False)
    q.load_quantized(res.tensors)
    torch.testing.assert_close(q(x[:64]), x[:64] @ res.weight.t(), rtol=1e-4, atol=1e-4)


# ---- the algorithm against a direct float64 reference --------------------------------------------


def _reference_gptq(w, h, layer, fmt, params, order, damp=0.01, lazy_fit=False):
    """Optimal-brain-quantizer updates written out: after rounding column c, subtract
    ``err * Hinv[c, :]`` from every column and remove c from the inverse Hessian. No Cholesky, no
    blocks, float64; GPTQ must reach the same codes."""
    w = w.double().clone()
    h = h.double().clone()
    n = h.shape[0]
    h += damp * float(torch.diagonal(h).mean()) * torch.eye(n, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    out_f, g = layer.out_features, layer.group_size
    ng = layer.n_groups
    fitted: dict[str, torch.Tensor] = {}
    for c in order:
        j = c // g
        if lazy_fit and c % g == 0:
            p = fmt.fit(w[:, c:c + g].float(), layer)
            for k, v in p.items():
                fitted.setdefault(k, torch.zeros(out_f, ng, dtype=v.dtype))[:, j] = v
        src = fitted if lazy_fit else {k: v.reshape(out_f, ng) for k, v in params.items()}
        pc = {k: v[:, j] for k, v in src.items()}
        qc = fmt.fake_quantize(w[:, c:c + 1].float(), pc, layer).double().reshape(-1)
        err = (w[:, c] - qc) / hinv[c, c]
        w -= torch.outer(err, hinv[c])
        q[:, c] = qc
        hinv -= torch.outer(hinv[:, c], hinv[c]) / hinv[c, c]
    return q.float()


@pytest.mark.parametrize("grid,bits", [("uniform", 3), ("piecewise", 3)])
@pytest.mark.parametrize("mode", ["fixed-natural", "fixed-act_order", "lazy-groups"])
def test_matches_direct_reference(grid, bits, mode):
    out_f, in_f, gs = 24, 64, 16
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out_f, in_f, generator=g)
    x = _inputs(512, in_f, seed=2)
    h = hessian_from_inputs(x)
    layer = layer_spec_for("ref", QuantSpec(grid=grid, bits=bits, group_size=gs), in_f, out_f)
    fmt = get_format(grid)
    if mode == "lazy-groups":
        res = gptq_quantize(w, h, layer, fmt, act_order=False, activation_aware=False, block_size=24)
        ref = _reference_gptq(w, h, layer, fmt, None, range(in_f), lazy_fit=True)
    else:
        params = fmt.fit(group_view(w, layer), layer)
        act_order = mode == "fixed-act_order"
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True).tolist() if act_order else range(in_f)
        res = gptq_quantize(w, h, layer, fmt, params=params, act_order=act_order, block_size=24)
        ref = _reference_gptq(w, h, layer, fmt, params, order)
    same = (res.weight == ref).float().mean().item()
    assert same >= 0.97, same
    e_res, e_ref = _out_err(x, w, res.weight), _out_err(x, w, ref)
    assert e_res == pytest.approx(e_ref, rel=0.03)
    # and the reference itself beats rounding to nearest (measured 0.46-0.88 on this small layer; the codes matched exactly)
    rtn = fmt.dequantize(fmt.quantize(w, layer), layer, torch.float32)
    assert e_ref < 0.95 * _out_err(x, w, rtn)


def test_block_size_does_not_change_the_result(real_weight, calib):
    """Lazy batch updates are exact up to float summation order: blocks that split groups (and
    groups that span blocks) give the same result as one block over the whole matrix. A different
    order flips a few near-tie codes (0.3% measured with 2 BLAS threads, none with 1), which GPTQ's
    error feedback then carries, so the objective is compared tightly and the codes loosely."""
    _, h = calib
    w = real_weight
    layer, fmt = _layer("piecewise-3b-g64", w.shape[1], w.shape[0])
    whole = gptq_quantize(w, h, layer, fmt, act_order=False, block_size=w.shape[1])
    for bs in (37, 128):
        other = gptq_quantize(w, h, layer, fmt, act_order=False, block_size=bs)
        assert (other.weight != whole.weight).float().mean().item() < 0.02
        assert other.error == pytest.approx(whole.error, rel=1e-3)


# ---- degenerate Hessians -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["uniform-asym-4b-g128", "piecewise-3b-g64"])
@pytest.mark.parametrize("act_order", [True, False])
def test_rank_deficient_hessian_and_dead_inputs(key, act_order, real_weight):
    w = real_weight
    x = _inputs(100, w.shape[1], seed=3)  # 100 tokens for 768 inputs: H has rank <= 100
    dead = torch.tensor([0, 5, 64, 65, 300, 767])
    x[:, dead] = 0.0
    h = hessian_from_inputs(x)
    layer, fmt = _layer(key, w.shape[1], w.shape[0])
    res = gptq_quantize(w, h, layer, fmt, act_order=act_order)
    assert res.n_dead == len(dead)
    assert torch.all(res.weight[:, dead] == 0)
    assert torch.isfinite(res.weight).all() and math.isfinite(res.error)
    rtn = fmt.dequantize(fmt.quantize(w, layer), layer, torch.float32)
    assert _out_err(x, w, res.weight) < 0.5 * _out_err(x, w, rtn)
    assert torch.equal(fmt.dequantize(res.tensors, layer, torch.float32), res.weight)


def _indefinite(h: torch.Tensor, target: float) -> torch.Tensor:
    """``h - t v v^T`` (v: eigenvector of the smallest eigenvalue) whose smallest eigenvalue is
    ``target * mean(diag)`` of the result."""
    evals, evecs = torch.linalg.eigh(h.double())
    v = evecs[:, 0]
    n = h.shape[0]
    base = float(torch.diagonal(h).double().mean())
    # solve lam_min - t = target * (base - t / n) for t
    t = (float(evals[0]) - target * base) / (1.0 - target / n)
    out = h.double() - t * torch.outer(v, v)
    assert float(torch.linalg.eigvalsh(out)[0]) == pytest.approx(target * float(torch.diagonal(out).mean()), rel=1e-6)
    return out.float()


def test_not_positive_definite_retries_with_larger_damp(real_weight, calib, caplog):
    x, h = calib
    w = real_weight
    h_bad = _indefinite(h, -0.05)  # fails with damp 0.01, works with 0.1
    layer, fmt = _layer("uniform-asym-4b-g128", w.shape[1], w.shape[0])
    with caplog.at_level(logging.WARNING, logger="piecewise_quant.calibration.gptq"):
        res = gptq_quantize(w, h_bad, layer, fmt, damp=0.01)
    assert res.damp == pytest.approx(0.1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and layer.name in warnings[0].getMessage()
    assert torch.isfinite(res.weight).all()
    assert torch.equal(fmt.dequantize(res.tensors, layer, torch.float32), res.weight)


def test_hopeless_hessian_raises_naming_the_layer(real_weight, calib, caplog):
    _, h = calib
    w = real_weight
    h_bad = _indefinite(h, -1000.0)  # even damp 0.01 * 10**4 = 100 cannot fix it
    layer, fmt = _layer("piecewise-4b-g128", w.shape[1], w.shape[0])
    with caplog.at_level(logging.WARNING, logger="piecewise_quant.calibration.gptq"):
        with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*damp"):
            gptq_quantize(w, h_bad, layer, fmt, damp=0.01)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 4
    with pytest.raises(ValueError, match="down_proj.*not positive"):
        gptq_quantize(w, -h, layer, fmt)  # negative diagonal: not a sum of x^T x at all


# ---- fixed parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["uniform-asym-4b-g128", "piecewise-4b-g128", "fp8-channel"])
def test_fixed_params_are_honoured(key, real_weight, calib):
    x, h = calib
    w = real_weight
    layer, fmt = _layer(key, w.shape[1], w.shape[0])
    # parameters GPTQ would never fit itself (ranges for a weight 0.6x as large)
    given = fmt.fit(group_view(0.6 * w, layer), layer)
    res = gptq_quantize(w, h, layer, fmt, params={k: v.clone() for k, v in given.items()})
    assert set(res.params) == set(given)
    for k in given:
        assert torch.equal(res.params[k], given[k]), k
    assert torch.equal(res.tensors["scales"].reshape(-1), given["scale"].to(res.tensors["scales"].dtype))
    groups = group_view(res.weight, layer)
    assert torch.equal(fmt.fake_quantize(groups, given, layer), groups)
    rtn_same_params = fmt.dequantize(fmt.encode(w, given, layer), layer, torch.float32)
    assert _out_err(x, w, res.weight) < 0.6 * _out_err(x, w, rtn_same_params)


def test_fixed_params_with_wrong_shape_raise(real_weight, calib):
    _, h = calib
    layer, fmt = _layer("uniform-asym-4b-g128", real_weight.shape[1], real_weight.shape[0])
    params = fmt.fit(group_view(real_weight, layer), layer)
    params["scale"] = params["scale"][:-1]
    with pytest.raises(ValueError, match="scale"):
        gptq_quantize(real_weight, h, layer, fmt, params=params)


# ---- input validation ----------------------------------------------------------------------------


class _NoCalibration(WeightFormat):
    name = "nocal"
    supported_bits = (4,)

    def layout(self, layer):
        return {"qweight": TensorLayout((layer.out_features, layer.in_features), torch.float32)}

    def quantize(self, weight, layer):
        return {"qweight": weight.float()}

    def dequantize(self, tensors, layer, dtype):
        return tensors["qweight"].to(dtype)


def test_format_without_calibration_interface_is_refused():
    layer = layer_spec_for("lin", QuantSpec(grid="uniform", bits=4, group_size=16), 32, 8)
    with pytest.raises(ValueError, match=r"'nocal'.*fit\(\)/fake_quantize\(\)/encode\(\)"):
        gptq_quantize(torch.randn(8, 32), torch.eye(32), layer, _NoCalibration())


def test_bad_inputs_raise_naming_the_layer():
    layer, fmt = _layer("uniform-asym-4b-g128", 128, 16, name="blk.fc")
    w, h = torch.randn(16, 128), hessian_from_inputs(torch.randn(256, 128))
    bad = h.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"'blk\.fc'.*NaN"):
        gptq_quantize(w, bad, layer, fmt)
    wn = w.clone()
    wn[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"'blk\.fc'.*NaN or Inf"):
        gptq_quantize(wn, h, layer, fmt)
    with pytest.raises(ValueError, match=r"'blk\.fc'.*weight has shape"):
        gptq_quantize(w.t(), h, layer, fmt)
    with pytest.raises(ValueError, match=r"'blk\.fc'.*Hessian has shape"):
        gptq_quantize(w, h[:64, :64], layer, fmt)


def test_low_precision_weight_is_computed_in_float32():
    layer, fmt = _layer("piecewise-4b-g128", 128, 16, name="fc")
    w = torch.randn(16, 128)
    h = hessian_from_inputs(_inputs(512, 128, seed=4))
    a = gptq_quantize(w.to(torch.bfloat16), h.double(), layer, fmt)
    b = gptq_quantize(w.to(torch.bfloat16).float(), h, layer, fmt)
    assert a.weight.dtype == torch.float32
    assert torch.equal(a.weight, b.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_weight_device(real_weight, calib):
    x, h = calib
    layer, fmt = _layer("piecewise-4b-g128", real_weight.shape[1], real_weight.shape[0])
    res = gptq_quantize(real_weight.cuda(), h, layer, fmt)
    assert res.weight.is_cuda and all(t.is_cuda for t in res.tensors.values())
    cpu = gptq_quantize(real_weight, h, layer, fmt)
    assert (res.weight.cpu() != cpu.weight).float().mean().item() < 0.02
    assert res.error == pytest.approx(cpu.error, rel=0.02)


# ---- Hessian accumulation ------------------------------------------------------------------------


def test_hessian_accumulator_matches_definition():
    g = torch.Generator().manual_seed(5)
    chunks = [torch.randn(3, 7, 32, generator=g), torch.randn(50, 32, generator=g), torch.randn(2, 1, 5, 32, generator=g)]
    acc = HessianAccumulator(32, name="fc")
    for c in chunks:
        acc.add(c)
    x = torch.cat([c.reshape(-1, 32) for c in chunks]).double()
    assert acc.n_tokens == x.shape[0] == 81
    torch.testing.assert_close(acc.hessian, (2.0 / x.shape[0] * x.t() @ x).float())
    assert acc.hessian.dtype == torch.float32
    torch.testing.assert_close(hessian_from_inputs(x.float()), acc.hessian)
    # as a forward hook
    lin = torch.nn.Linear(32, 4)
    hooked = HessianAccumulator(32, name="fc")
    handle = lin.register_forward_hook(hooked.hook)
    for c in chunks:
        lin(c)
    handle.remove()
    torch.testing.assert_close(hooked.hessian, acc.hessian)


def test_hessian_accumulator_refuses_bad_input():
    acc = HessianAccumulator(16, name="model.layers.3.mlp.up_proj")
    with pytest.raises(ValueError, match="up_proj.*no calibration inputs"):
        acc.hessian  # noqa: B018 - the property raises
    x = torch.randn(4, 16)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"'model\.layers\.3\.mlp\.up_proj'.*NaN or Inf"):
        acc.add(x)
    x[2, 3] = float("inf")
    with pytest.raises(ValueError, match="up_proj.*NaN or Inf"):
        acc.add(x)
    with pytest.raises(ValueError, match=r"up_proj.*\(\.\.\., 16\)"):
        acc.add(torch.randn(4, 15))
    assert acc.n_tokens == 0
