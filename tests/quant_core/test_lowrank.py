"""Low-rank branch (``QuantSpec(low_rank=...)``, SVDQuant): config, storage, bits, compute, GPTQ,
calibration, save/reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import piecewise_quant as pq
from piecewise_quant import lowrank
from piecewise_quant.args import OnlineRotation
from piecewise_quant.calibration.gptq import gptq_quantize, hessian_from_inputs
from piecewise_quant.errors import CheckpointMismatchError
from piecewise_quant.quantization import layer_spec_for
from piecewise_quant.registry import get_format


def _weight(out: int = 48, inn: int = 128, seed: int = 0) -> torch.Tensor:
    """Gaussian weights plus two heavy input channels (the outliers a low-rank branch absorbs)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * 0.02
    w[:, 5] *= 30
    w[:, 77] *= 15
    return w


def _layer(low_rank=8, grid="uniform", bits=4, group_size=32, out=48, inn=128, rotation=None, **kw):
    spec = pq.QuantSpec(grid=grid, bits=bits, group_size=group_size, low_rank=low_rank, **kw)
    return layer_spec_for("l", spec, inn, out, rotation)


def _linear(w: torch.Tensor, seed: int = 1) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.randn(w.shape[0], generator=torch.Generator().manual_seed(seed)) * 0.1)
    return lin


# ---- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -3, True, "8", 8.0, 0.0, float("nan"), [4]])
def test_bad_low_rank_values_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="low_rank"):
        pq.QuantSpec(bits=4, low_rank=bad)
    with pytest.raises(ValueError, match=r"overrides\['\*.down_proj'\]: low_rank"):
        pq.PiecewiseQuantConfig(bits=4, overrides={"*.down_proj": {"low_rank": bad}})


def test_rank_not_below_the_smaller_side_is_refused_naming_layer_and_field():
    with pytest.raises(ValueError, match=r"layer 'l': low_rank=48 must be smaller than min\(out_features, in_features\) = 48"):
        _layer(low_rank=48)
    # a budget of at most 4 bits buys at most a quarter of the smaller side, but always rank >= 1
    with pytest.raises(ValueError, match=r"low_rank=0\.5 \(a budget of 0\.5 extra bits per weight: rank 1\)"):
        _layer(low_rank=0.5, group_size="channel", out=1, inn=64)
    assert lowrank.rank(_layer(low_rank=47)) == 47


def test_low_rank_and_outliers_do_not_combine():
    with pytest.raises(ValueError, match="low_rank and outliers do not combine"):
        pq.QuantSpec(bits=4, group_size=32, low_rank=4, outliers=1)


def test_config_round_trips_and_configs_without_low_rank_keep_their_bytes():
    cfg = pq.PiecewiseQuantConfig(bits=4, low_rank=16,
                                  overrides={"*.down_proj": {"low_rank": 0.5}, "*.q_proj": {"low_rank": None}})
    d = json.loads(cfg.to_json_string())
    assert d["low_rank"] == 16
    back = pq.PiecewiseQuantConfig.from_dict(d)
    assert back == cfg and back.spec_for("m.mlp.down_proj").low_rank == 0.5 and back.spec_for("m.q_proj").low_rank is None
    assert "low_rank" not in pq.PiecewiseQuantConfig(bits=4).to_dict()


def test_a_budget_buys_the_largest_rank_that_fits_it():
    # r = floor(b * out * in / (16 * (out + in))), at least 1
    assert lowrank.rank(_layer(low_rank=1.0, out=64, inn=128)) == 2  # 8192 / 3072 = 2.67
    assert lowrank.rank(_layer(low_rank=0.01, out=64, inn=128)) == 1
    layer = _layer(low_rank=2.0, out=64, inn=128)
    fmt = get_format("uniform")
    extra = fmt.bits_per_weight(layer) - fmt.bits_per_weight(lowrank.dense_layer(layer))
    assert extra <= 2.0 and extra + 16 * (64 + 128) / (64 * 128) > 2.0


# ---- storage and bits -----------------------------------------------------------------------------


@pytest.mark.parametrize("grid,group_size", [("uniform", 32), ("piecewise", "channel"), ("fp8", "channel")])
def test_layout_bits_and_round_trip_are_exact(grid, group_size):
    bits = 8 if grid == "fp8" else 4
    layer = _layer(low_rank=6, grid=grid, bits=bits, group_size=group_size)
    fmt = get_format(grid)
    w = _weight()
    tensors = fmt.quantize(w, layer)
    layout = fmt.layout(layer)
    assert list(tensors) == list(layout)
    for name, lay in layout.items():
        assert tuple(tensors[name].shape) == lay.shape and tensors[name].dtype == lay.dtype, name
    assert layout["lowrank_a"].shape == (48, 6) and layout["lowrank_b"].shape == (6, 128)
    assert layout["lowrank_a"].dtype == torch.float16
    dense = lowrank.dense_layer(layer)
    assert fmt.bits_per_weight(layer) == fmt.bits_per_weight(dense) + 16 * 6 * (48 + 128) / (48 * 128)
    # the stored weight is exactly the residual's grid values plus A B (float64 reference)
    res = fmt.dequantize(lowrank.split_tensors(tensors), dense, torch.float64)
    ref = res + tensors["lowrank_a"].double() @ tensors["lowrank_b"].double()
    assert torch.allclose(fmt.dequantize(tensors, layer, torch.float64), ref, atol=1e-12, rtol=0)
    # re-encoding the stored weight reproduces the stored tensors
    again = fmt.quantize(w, layer)
    for name in tensors:
        assert torch.equal(again[name], tensors[name]), name


def test_the_residual_error_shrinks_with_the_rank_and_vanishes_at_the_weights_rank():
    fmt = get_format("uniform")
    w = _weight()
    errors = []
    for r in (None, 2, 8, 32):
        layer = _layer(low_rank=r)
        errors.append(float((fmt.dequantize(fmt.quantize(w, layer), layer, torch.float64) - w.double()).norm()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[1] < 0.5 * errors[0]  # the two heavy channels are (close to) rank 2
    # a weight of rank 8 with a rank-8 branch: the residual is the factors' float16 rounding only
    g = torch.Generator().manual_seed(2)
    w8 = (torch.randn(48, 8, generator=g) @ torch.randn(8, 128, generator=g)) * 0.01
    layer = _layer(low_rank=8)
    got = fmt.dequantize(fmt.quantize(w8, layer), layer, torch.float64)
    rel = float((got - w8.double()).norm() / w8.double().norm())
    plain = _layer(low_rank=None)
    rel_plain = float((fmt.dequantize(fmt.quantize(w8, plain), plain, torch.float64) - w8.double()).norm() / w8.double().norm())
    assert rel < 2e-3 and rel < rel_plain / 20


def test_factors_are_the_top_singular_directions():
    w = _weight()
    layer = _layer(low_rank=4)
    a, b = lowrank.factors(w, layer)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(lowrank.product(a, b), best, atol=2e-3 * float(best.abs().max()))
    # balanced split: both factors have the same norm (sqrt of the singular values each)
    assert torch.allclose(a.double().norm(dim=0), b.double().norm(dim=1), rtol=2e-3)


def test_the_randomized_svd_of_large_weights_is_deterministic_and_near_optimal(monkeypatch):
    monkeypatch.setattr(lowrank, "EXACT_SVD_MAX", 64)  # 96 x 160 takes the randomized path
    g = torch.Generator().manual_seed(7)
    u = torch.linalg.qr(torch.randn(96, 40, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(160, 40, generator=g, dtype=torch.float64)).Q
    w = (u * torch.logspace(0, -2, 40, dtype=torch.float64)) @ v.T + 1e-3 * torch.randn(96, 160, generator=g, dtype=torch.float64)
    uu, s, vh = lowrank.top_singular(w, 8)
    again = lowrank.top_singular(w, 8)
    assert all(torch.equal(x, y) for x, y in zip((uu, s, vh), again))
    exact = torch.linalg.svdvals(w)
    assert torch.allclose(s, exact[:8], rtol=1e-9)
    optimal = float(exact[8:].square().sum().sqrt())
    assert float((w - (uu * s) @ vh).norm()) <= optimal * (1 + 1e-6)
    # the stored factors follow the same path
    layer = _layer(low_rank=8, out=96, inn=160)
    a, b = lowrank.factors(w.float(), layer)
    assert float((w - lowrank.product(a, b)).norm()) <= optimal * (1 + 1e-2)


# ---- the layer: every path adds the branch -----------------------------------------------------------


def test_quant_linear_adds_the_branch_on_the_fast_path_and_the_op_path(monkeypatch):
    from piecewise_quant.kernels import backends

    w = _weight()
    lin = _linear(w)
    layer = _layer(low_rank=8)
    q = pq.QuantLinear.from_linear(lin, layer, get_format("uniform"))
    assert "low_rank=8" in repr(q)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(3))
    ref = x.double() @ q.dequantize(torch.float64).t() + lin.bias.double()
    with torch.no_grad():
        fast = q(x)
        monkeypatch.setenv(backends.ENV_FORCE, "reference")
        op = q(x)
    for y in (fast, op):
        assert torch.allclose(y.double(), ref, atol=2e-5)
    # to_linear is the same map
    with torch.no_grad():
        assert torch.allclose(q.to_linear(torch.float64)(x.double()), ref, atol=1e-9)
    # the cast factors are cached, and rebuilt after an in-place write to the stored ones
    with torch.no_grad():
        q.lowrank_a.mul_(2)
        ab = q.lowrank_a.double() @ q.lowrank_b.double()
        assert torch.allclose(q(x).double(), ref + x.double() @ (ab / 2).t(), atol=2e-5)
        q.lowrank_a.div_(2)
    # gradients flow through the branch (LoRA on top of the layer trains through it)
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()
    assert torch.allclose(xg.grad.double(), q.dequantize(torch.float64).sum(0).expand(5, -1), atol=2e-5)


def _cpu_kernel_or_skip():
    from piecewise_quant.kernels import cpu_backend
    from piecewise_quant.qlinear import ensure_runtime

    if not cpu_backend.status()["available"]:
        pytest.skip("the compiled CPU kernels are not available here")
    ensure_runtime()


# (out, rank, in): whole blocks of 16, a rank of 1, and tails everywhere (r = 17, in = 31 or 9)
@pytest.mark.parametrize("shape", [(48, 8, 256), (7, 1, 9), (64, 17, 31)], ids=str)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_the_cpu_kernel_branch_matches_the_float64_product(shape, m):
    from piecewise_quant.kernels.lowrank_add import add

    _cpu_kernel_or_skip()
    out, r, inn = shape
    g = torch.Generator().manual_seed(m)
    a, b = torch.randn(out, r, generator=g).half(), torch.randn(r, inn, generator=g).half()
    for xd in (torch.float32, torch.bfloat16, torch.float16):
        for yd in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(m, 1, inn, generator=g).to(xd)  # m rows, 3-D as in a model
            y = torch.randn(m, 1, out, generator=g).to(yd)
            ref = y.double() + (x.double() @ b.double().t()) @ a.double().t()
            got = add(y.clone(), x, a, b)
            assert got is not None and got.dtype == yd and got.shape == y.shape
            # float32 throughout, one rounding into y's dtype
            ulp = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[yd]
            err = (got.double() - ref).abs()
            assert (err <= ulp * ref.abs() + 1e-5 * r * inn ** 0.5).all(), (xd, yd, err.max().item())


def test_the_cpu_kernel_branch_declines_what_it_does_not_take():
    from piecewise_quant.kernels.lowrank_add import MAX_ROWS, add

    _cpu_kernel_or_skip()
    a, b = torch.randn(16, 4).half(), torch.randn(4, 32).half()
    assert add(torch.zeros(MAX_ROWS + 1, 16), torch.randn(MAX_ROWS + 1, 32), a, b) is None  # prefill: torch's GEMM
    assert add(torch.zeros(2, 16), torch.randn(2, 32), a.float(), b.float()) is None  # not the stored float16
    assert add(torch.zeros(2, 16), torch.randn(2, 32, requires_grad=True), a, b) is None  # gradients
    assert add(torch.zeros(2, 16), torch.randn(2, 32), a, b) is not None


def test_the_cpu_kernel_branch_refuses_factors_of_another_layer():
    from piecewise_quant.kernels.lowrank_add import add

    _cpu_kernel_or_skip()
    a, b = torch.randn(16, 4).half(), torch.randn(4, 32).half()
    y = torch.zeros(2, 16)
    with pytest.raises(ValueError, match="another layer"):
        add(y, torch.randn(2, 32), a, torch.randn(5, 32).half())  # rank 4 against 5
    with pytest.raises(ValueError, match="another layer"):
        add(y, torch.randn(2, 48), a, b)  # 48 inputs against B's 32
    with pytest.raises(ValueError, match="another layer"):
        add(torch.zeros(2, 8), torch.randn(2, 32), a, b)  # 8 outputs against A's 16
    with pytest.raises(ValueError, match="another layer"):
        add(torch.zeros(3, 16), torch.randn(2, 32), a, b)  # 3 rows of y for 2 of x
    assert torch.equal(y, torch.zeros(2, 16))  # nothing written


def test_decoding_a_low_rank_layer_keeps_no_cast_copy_of_the_factors():
    _cpu_kernel_or_skip()
    w = _weight()
    lin = _linear(w)
    q = pq.QuantLinear.from_linear(lin, _layer(low_rank=8), get_format("uniform"))
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = q(x)
    assert getattr(q, "_lowrank", None) is None  # the kernel read lowrank_a / lowrank_b as stored
    ref = x.double() @ q.dequantize(torch.float64).t() + lin.bias.double()
    assert torch.allclose(y.double(), ref, atol=2e-5)
    with torch.no_grad():
        q(torch.randn(40, 128))  # prefill rows: F.linear on factors cast once
    assert q._lowrank[1].dtype == torch.float32


def test_the_cpu_kernel_branch_splits_over_threads_with_the_same_result():
    from piecewise_quant.kernels.lowrank_add import add

    _cpu_kernel_or_skip()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, 64, generator=g).half(), torch.randn(64, 4096, generator=g).half()
    x, y = torch.randn(16, 4096, generator=g), torch.randn(16, 4096, generator=g)  # over the 2-thread bar
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = add(y.clone(), x, a, b)
        torch.set_num_threads(2)
        two = add(y.clone(), x, a, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("act_bits", [8, 4])
def test_the_branch_reads_the_unquantized_input(act_bits):
    w = _weight()
    lin = _linear(w)
    layer = _layer(low_rank=8, act_bits=act_bits)
    q = pq.QuantLinear.from_linear(lin, layer, get_format("uniform"))
    # the same residual and activation scheme without the branch
    dense = pq.QuantLinear.empty(lowrank.dense_layer(layer), q.fmt, bias=True)
    dense.load_quantized(lowrank.split_tensors(q.quantized_tensors()))
    dense.bias.data.copy_(lin.bias)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(4))
    x[:, 5] *= 40  # an activation outlier channel: int quantization of x loses the small channels
    ab = q.lowrank_a.double() @ q.lowrank_b.double()
    with torch.no_grad():
        y = q(x).double()
        want = dense(x).double() + x.double() @ ab.t()
        assert torch.allclose(y, want, atol=5e-5)
        # reading the quantized input instead would be measurably different
        from piecewise_quant.kernels.ops import ActOperand, quantize_input

        _, act = q.act_quantizer.prepare(x)
        xq = quantize_input(x, ActOperand(*act))
        assert float((x - xq).abs().max()) > 1e-3
        assert float((y - (dense(x).double() + xq.double() @ ab.t())).abs().max()) > 1e-4


@pytest.mark.parametrize("side", ["input", "both"])
def test_online_rotations_are_honoured(side):
    w = _weight(out=64, inn=128)
    lin = _linear(w)
    rot = OnlineRotation(input=True, output=side == "both", seed=3)
    layer = _layer(low_rank=8, out=64, rotation=rot)
    q = pq.QuantLinear.from_linear(lin, layer, get_format("uniform"))
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = x.double() @ q.dequantize(torch.float64).t() + q.effective_bias().double()
        assert torch.allclose(q(x).double(), ref, atol=2e-5)


def test_a_kernel_less_plugin_format_gets_the_branch_through_its_linear():
    from piecewise_quant.formats.uniform import UniformFormat

    class NoKernel(UniformFormat):
        name = "nokernel-lowrank-test"

        def weight_operand(self, tensors, layer):  # no kernel: QuantLinear runs its linear()
            return None

    fmt = NoKernel()
    w = _weight()
    lin = _linear(w)
    spec = pq.QuantSpec(grid="uniform", bits=4, group_size=32, low_rank=4, act_bits=8)
    layer = layer_spec_for("l", spec, 128, 48)
    q = pq.QuantLinear.from_linear(lin, layer, fmt)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(6))
    from piecewise_quant.kernels.ops import ActOperand, quantize_input

    with torch.no_grad():
        _, act = q.act_quantizer.prepare(x)
        xq = quantize_input(x, ActOperand(*act)).double()
        res = fmt.dequantize(lowrank.split_tensors(q.quantized_tensors()), lowrank.dense_layer(layer), torch.float64)
        ab = q.lowrank_a.double() @ q.lowrank_b.double()
        want = xq @ res.t() + x.double() @ ab.t() + lin.bias.double()
        assert torch.allclose(q(x).double(), want, atol=5e-5)


def test_stored_dtypes_survive_a_model_cast():
    q = pq.QuantLinear.from_linear(_linear(_weight()), _layer(low_rank=4), get_format("uniform"))
    q = q.to(torch.bfloat16)
    assert q.lowrank_a.dtype == torch.float16 and q.compute_dtype == torch.bfloat16
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert q(x).dtype == torch.bfloat16


# ---- GPTQ -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_quantizes_the_residual_and_keeps_the_branch_exact(act_order):
    w = _weight(64, 256, seed=3)
    x = torch.randn(1024, 256, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.3, 2.0, 256)
    h = hessian_from_inputs(x)
    fmt = get_format("uniform")
    layer = _layer(low_rank=8, bits=3, group_size=64, out=64, inn=256)
    with_lr = gptq_quantize(w, h, layer, fmt, act_order=act_order)
    plain = gptq_quantize(w, h, lowrank.dense_layer(layer), fmt, act_order=act_order)
    assert set(with_lr.tensors) == set(fmt.layout(layer))
    assert torch.allclose(fmt.dequantize(with_lr.tensors, layer, torch.float32), with_lr.weight, atol=1e-6)
    # the branch is the weight's factors, GPTQ ran on W - A B
    a, b = lowrank.factors(w, layer)
    assert torch.equal(with_lr.tensors["lowrank_a"], a) and torch.equal(with_lr.tensors["lowrank_b"], b)
    on_residual = gptq_quantize(lowrank.residual(w, a, b), h, lowrank.dense_layer(layer), fmt, act_order=act_order)
    assert with_lr.error == pytest.approx(on_residual.error, rel=1e-6)
    assert with_lr.error < 0.5 * plain.error


# ---- calibration and a whole model --------------------------------------------------------------


def _tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a few heavy input channels, as trained models have
        for lin in (m for m in model.model.modules() if isinstance(m, torch.nn.Linear)):
            lin.weight[:, :2].mul_(12.0)
    return model


def _ids(n=8, length=32, seed=0):
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", ["aware", "gptq"])
def test_calibrated_low_rank_lowers_the_output_error(preset):
    base = _tiny_llama()
    with torch.no_grad():
        ref = base(_ids(2, 32, 9)).logits
    errors = {}
    for r in (None, 8):
        model = copy.deepcopy(base)
        cal = pq.CalibrationConfig.preset(preset, n_samples=8, seq_len=32)
        pq.calibrate(model, pq.PiecewiseQuantConfig(grid="uniform", bits=3, group_size=32, low_rank=r, calibration=cal),
                     _ids(), progress=False)
        assert all(("lowrank_a" in m.quantized_tensors()) == (r is not None) for m in pq.quantized_layers(model).values())
        with torch.no_grad():
            errors[r] = float((model(_ids(2, 32, 9)).logits - ref).square().mean())
    assert errors[8] < 0.7 * errors[None]


@pytest.mark.parametrize("preset", ["lwc", "omniquant"])
def test_calibration_steps_without_low_rank_support_are_refused(preset):
    model = _tiny_llama()
    cal = pq.CalibrationConfig.preset(preset, n_samples=2, seq_len=16)
    with pytest.raises(ValueError, match=r"calibration \[.*'lwc'.*\] does not support low_rank layers"):
        pq.calibrate(model, pq.PiecewiseQuantConfig(grid="uniform", bits=3, group_size=32, low_rank=4, calibration=cal),
                     _ids(2, 16), progress=False)


def test_from_pretrained_round_trip_is_bit_exact_and_strict(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    model = _tiny_llama()
    qcfg = pq.PiecewiseQuantConfig(grid="uniform", bits=4, group_size=32, low_rank=4, observer="minmax",
                                   overrides={"*.down_proj": {"low_rank": 1.0}, "*.q_proj": {"low_rank": None}})
    pq.quantize(model, qcfg, progress=False)
    size = pq.model_size_report(model)
    layers = pq.quantized_layers(model)
    assert size.quantized_bits == sum(
        round(q.bits_per_weight() * q.in_features * q.out_features) for q in layers.values())
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == qcfg.to_dict()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    down = back.model.layers[0].mlp.down_proj
    assert down.lowrank_a.shape == (64, 2)  # 1 bit per weight of 64x128: floor(8192 / 3072)
    assert "lowrank_a" not in back.model.layers[0].self_attn.q_proj.quantized_tensors()
    for name, q in layers.items():
        r = back.get_submodule(name)
        assert set(r.quantized_tensors()) == set(q.quantized_tensors())
        for t, v in q.quantized_tensors().items():
            assert torch.equal(r.quantized_tensors()[t], v), f"{name}.{t}"
    ids = _ids(1, 12)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    # strict loading: a missing factor, or a factor on a layer that has none, is refused by name
    (st,) = tmp_path.glob("*.safetensors")
    tensors = load_file(st)
    missing = {k: v for k, v in tensors.items() if k != "model.layers.0.mlp.up_proj.lowrank_b"}
    save_file(missing, st, metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"'model\.layers\.0\.mlp\.up_proj\.lowrank_b' is missing.*low_rank=4"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    extra = {**tensors, "model.layers.0.self_attn.q_proj.lowrank_a": torch.zeros(64, 4, dtype=torch.float16)}
    save_file(extra, st, metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.0\.self_attn\.q_proj\.lowrank_a"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_choose_ranks_writes_per_layer_ranks_by_energy_capped_by_the_config():
    model = _tiny_llama()
    with torch.no_grad():  # one layer is (nearly) rank 2: a small share of energy needs rank <= 2 there
        up = model.model.layers[0].mlp.up_proj
        up.weight.copy_(torch.randn(128, 2) @ torch.randn(2, 64) + 1e-4 * torch.randn(128, 64))
    cfg = pq.PiecewiseQuantConfig(grid="uniform", bits=4, group_size=32, low_rank=16,
                                  overrides={"*.down_proj": {"bits": 8, "grid": "piecewise"}, "*.o_proj": {"low_rank": None}})
    with pytest.raises(ValueError, match="energy must be a share"):
        lowrank.choose_ranks(model, cfg, 1.0)
    chosen = {e: lowrank.choose_ranks(model, cfg, e) for e in (0.2, 0.6, 0.99)}
    names = list(pq.quantization.plan_layers(model, cfg))
    for name in names:
        before = cfg.spec_for(name)
        ranks = [c.spec_for(name).low_rank for c in chosen.values()]
        if before.low_rank is None:
            assert ranks == [None] * 3, name
            continue
        assert ranks == sorted(ranks) and all(1 <= r <= 16 for r in ranks), (name, ranks)
        # everything else about the layer is unchanged
        assert chosen[0.6].spec_for(name) == before.with_changes({"low_rank": ranks[1]}), name
    assert chosen[0.99].spec_for("model.layers.0.mlp.up_proj").low_rank == 2
    assert chosen[0.2].spec_for("model.layers.0.mlp.down_proj").grid == "piecewise"
    # the ranks are stored in config.json as integers, and quantize with them
    back = pq.PiecewiseQuantConfig.from_json_string(chosen[0.6].to_json_string())
    assert back == chosen[0.6]
    pq.quantize(model, back, progress=False)
    q = pq.quantized_layers(model)["model.layers.0.mlp.up_proj"]
    assert q.lowrank_a.shape[1] == back.spec_for("model.layers.0.mlp.up_proj").low_rank


@pytest.mark.slow
def test_a_low_rank_layer_compiles_with_torch_compile():
    q = pq.QuantLinear.from_linear(_linear(_weight()), _layer(low_rank=4, act_bits=8), get_format("uniform"))
    x = torch.randn(4, 128)
    with torch.no_grad():
        eager = q(x)
        compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), eager)
