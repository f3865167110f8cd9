"""FP4 (E2M1) formats: ``mxfp4`` and ``nvfp4`` weights, FP4 activations, the CPU kernels' FP4 path
and checkpoints, against float64 re-implementations of the number formats."""

from __future__ import annotations

import math

import pytest
import torch

import piecewise_quant as pq
from piecewise_quant.config import LayerSpec, QuantSpec
from piecewise_quant.kernels import fp4, packed_length
from piecewise_quant.kernels import reference as ref
from piecewise_quant.registry import get_format

MAGS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _nearest_e2m1(v: float) -> float:
    """Round to nearest E2M1 value, ties to the even code (the code of the magnitude's index), saturating."""
    a = min(abs(v), 6.0)
    best = min(range(8), key=lambda i: (abs(a - MAGS[i]), i % 2))
    return math.copysign(MAGS[best], v) if MAGS[best] else 0.0


def _layer(grid: str, out: int = 24, inp: int = 64, observer: str = "mse") -> LayerSpec:
    spec = QuantSpec(grid=grid, observer=observer)
    return LayerSpec(name="l", spec=spec, in_features=inp, out_features=out, group_size=spec.group_size)


def test_e2m1_codes_round_to_nearest_even_and_saturate():
    midpoints = [(a + b) / 2 for a, b in zip(MAGS, MAGS[1:])]
    g = torch.Generator().manual_seed(0)
    vals = torch.cat([torch.tensor(MAGS + midpoints + [7.0, 1e6]), torch.randn(2000, generator=g) * 3])
    vals = torch.cat([vals, -vals])
    got = fp4.e2m1_decode(fp4.e2m1_encode(vals))
    want = torch.tensor([_nearest_e2m1(float(v)) for v in vals])
    assert torch.equal(got, want)
    # every code decodes to its value and re-encodes to itself (code 8, "-0", to 0)
    codes = torch.arange(16, dtype=torch.uint8)
    assert fp4.e2m1_decode(codes).tolist() == MAGS + [-m if m else 0.0 for m in MAGS]
    assert torch.equal(fp4.e2m1_encode(fp4.e2m1_decode(codes)), torch.where(codes == 8, 0, codes).to(torch.uint8))


def test_e8m0_scales_are_exact_powers_of_two_and_follow_the_ocp_rule():
    e = torch.arange(255, dtype=torch.uint8)
    assert [float(v) for v in fp4.e8m0_to_float(e)] == [2.0 ** (int(i) - 127) for i in e]
    g = torch.Generator().manual_seed(1)
    amax = torch.exp(torch.randn(500, generator=g) * 8).to(torch.float32)
    want = torch.tensor([math.floor(math.log2(float(a))) - 2 for a in amax], dtype=torch.int32)
    assert torch.equal(fp4.mx_spec_exponent(amax), want)
    blocks = torch.randn(400, 32, generator=g) * torch.exp(torch.randn(400, 1, generator=g))
    errs = {}
    for rule in ("spec", "ceil", "mse"):
        s = fp4.e8m0_to_float(fp4.mx_scale_exponents(blocks, rule)).unsqueeze(1)
        errs[rule] = (fp4.e2m1_decode(fp4.e2m1_encode(blocks / s)) * s - blocks).pow(2).sum(1)
        if rule == "ceil":  # no saturation: amax / scale <= 6
            assert bool(((blocks.abs().amax(1, keepdim=True) / s) <= 6).all())
    # the search takes, per block, the better of the OCP exponent and the one above it (= ceil or spec)
    assert bool((errs["mse"] <= torch.minimum(errs["spec"], errs["ceil"]) + 1e-12).all())
    assert float(errs["mse"].sum()) < float(errs["spec"].sum())
    with pytest.raises(ValueError, match="'spec', 'ceil' or 'mse'"):
        fp4.mx_scale_exponents(blocks, "round")


@pytest.mark.parametrize("grid", ["mxfp4", "nvfp4"])
def test_weights_layout_bits_and_dequantization(grid):
    fmt = get_format(grid)
    layer = _layer(grid)
    block = 32 if grid == "mxfp4" else 16
    assert layer.group_size == block and layer.spec.bits == 4
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 64, generator=g) * 0.02
    w[3, 5] = 0.3  # an outlier
    w[7, :block] = 0.0  # an all-zero block
    t = fmt.quantize(w, layer)
    lay = fmt.layout(layer)
    assert list(t) == list(lay)
    assert all(tuple(t[k].shape) == lay[k].shape and t[k].dtype == lay[k].dtype for k in lay)
    assert t["qweight"].shape == (24, packed_length(64, 4)) == (24, 32)  # two codes per byte
    bpw = 4 + 8 / 32 if grid == "mxfp4" else 4 + 8 / 16 + 32 / (24 * 64)
    assert fmt.bits_per_weight(layer) == bpw
    # dequantization in float64 from the stored bits: E2M1 value x block scale
    codes = ref.unpack_codes(t["qweight"], 4, 64).reshape(24, -1, block)
    vals = torch.tensor([_nearest_e2m1(v) for v in MAGS] + [-m for m in MAGS], dtype=torch.float64)[codes.long()]
    if grid == "mxfp4":
        s = torch.pow(2.0, t["scales"].double() - 127)
    else:
        s = t["scales"].double() * float(t["global_scale"])
        assert math.isclose(float(t["global_scale"]), float(w.abs().max()) / (6 * 448), rel_tol=1e-6)
    want = (vals * s.unsqueeze(-1)).reshape(24, 64)
    deq = fmt.dequantize(t, layer, torch.float32)
    assert torch.allclose(deq.double(), want, rtol=1e-6, atol=0)
    assert bool((deq[7, :block] == 0).all())
    rel = float((deq - w).pow(2).sum() / w.pow(2).sum())
    assert 1e-4 < rel < 0.03, rel  # 4-bit floats on Gaussian weights: about 1%
    # the largest magnitude of every block is represented within one E2M1 step
    assert abs(float(deq[3, 5]) - 0.3) < 0.3 * 0.2
    # levels() lists the 15 values of each block
    lv = fmt.levels(t, layer)
    assert lv.shape == (24, 64 // block, 15)
    assert bool(torch.isin(deq.reshape(24, -1, block)[0, 0], lv[0, 0]).all())


def test_invalid_settings_name_the_problem():
    with pytest.raises(ValueError, match="bits=4 and group_size=32"):
        pq.PiecewiseQuantConfig(grid="mxfp4", group_size=128)
    with pytest.raises(ValueError, match="group_size=16"):
        pq.PiecewiseQuantConfig(grid="nvfp4", bits=8)
    with pytest.raises(ValueError, match="act_bits=4"):
        pq.PiecewiseQuantConfig(act_bits=8, act_format="mxfp4")
    with pytest.raises(ValueError, match="dynamic_per_token"):
        pq.PiecewiseQuantConfig(act_bits=4, act_format="nvfp4", act_mode="static_per_tensor")
    with pytest.raises(ValueError, match="act_clip_ratio and act_topk"):
        pq.PiecewiseQuantConfig(act_bits=4, act_format="nvfp4", act_topk=2)
    with pytest.raises(ValueError, match="observer 'mse' or 'minmax'"):
        get_format("mxfp4").validate(QuantSpec(grid="mxfp4", observer="percentile"))
    with pytest.raises(ValueError, match="cannot keep outliers"):  # nvfp4 has no fit(): data-free only
        get_format("nvfp4").layout(_layer("nvfp4").__class__(
            "l", QuantSpec(grid="nvfp4", outliers=1), 64, 24, 16))
    # a grid switch through overrides re-derives the fixed block
    cfg = pq.PiecewiseQuantConfig(bits=3, group_size=128, overrides={"*.up": {"grid": "mxfp4"}})
    assert cfg.spec_for("m.up").group_size == 32 and cfg.spec_for("m.up").bits == 4
    # a layer whose in_features the block does not divide
    with pytest.raises(ValueError, match="group_size=32 does not divide its in_features=48"):
        pq.quantize(torch.nn.Sequential(torch.nn.Linear(48, 8)), pq.PiecewiseQuantConfig(grid="mxfp4", modules_to_not_convert=[]))


@pytest.mark.parametrize("act_format", ["mxfp4", "nvfp4"])
def test_fp4_activations_per_token_blocks(act_format):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 64, generator=g) * torch.exp(torch.randn(2, 5, 1, generator=g))
    y = ref.quantize_activation(x, act_format, "dynamic_per_token")
    block = 32 if act_format == "mxfp4" else 16
    xb, yb = x.reshape(-1, block).double(), y.reshape(-1, block).double()
    if act_format == "mxfp4":
        s = torch.pow(2.0, torch.floor(torch.log2(xb.abs().amax(1, keepdim=True))) - 2)
    else:  # E4M3 block scale of amax/6 over the token's amax/(6*448)
        tok = x.reshape(10, -1).abs().amax(1).double().repeat_interleave(64 // block).unsqueeze(1) / 2688
        s = (xb.abs().amax(1, keepdim=True) / 6 / tok).float().to(torch.float8_e4m3fn).double() * tok
    want = torch.tensor([_nearest_e2m1(float(v)) for v in (xb / s).reshape(-1)], dtype=torch.float64).reshape(xb.shape) * s
    assert torch.allclose(yb, want, rtol=1e-6, atol=1e-30)
    assert float((y - x).pow(2).sum() / x.pow(2).sum()) < 0.03
    assert y.dtype == x.dtype
    with pytest.raises(ValueError, match=f"blocks of {block}"):
        ref.quantize_activation(torch.randn(3, block + 8), act_format, "dynamic_per_token")
    # a layer with FP4 activations: F.linear of the quantized input and the dequantized weight
    lin = torch.nn.Linear(64, 16)
    cfg = pq.PiecewiseQuantConfig(grid=act_format, act_bits=4, act_format=act_format, modules_to_not_convert=[])
    q = pq.quantize(torch.nn.Sequential(lin), cfg, progress=False)[0]
    with torch.no_grad():
        out = q(x)
        want = torch.nn.functional.linear(ref.quantize_activation(x, act_format, "dynamic_per_token"), q.dequantize(),
                                          q.bias)
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-6)
    assert q.act_quantizer.args.describe() == f"{act_format}/token"


@pytest.mark.parametrize("grid", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernels_match_the_reference(grid, dtype, monkeypatch):
    from piecewise_quant.kernels import cpu_backend

    if not cpu_backend.status()["available"]:
        pytest.skip("the CPU kernels are not available here")
    g = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(256, 40).to(dtype)
    q = pq.quantize(torch.nn.Sequential(lin), pq.PiecewiseQuantConfig(grid=grid, modules_to_not_convert=[]),
                    progress=False)[0]
    w = q.dequantize(torch.float32)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for m in (1, 5, 8, 12, 40):  # fused kernels up to FP4_GEMV_MAX_ROWS rows, dequantized blocks above
        x = torch.randn(m, 256, generator=g).to(dtype)
        with torch.no_grad():
            y = q(x)
            y_op = torch.ops.piecewise_quant.linear(x, q.qweight, q.scales, getattr(q, "global_scale", None), q.bias, None,
                                                    grid, 4, q.layer_spec.group_size, 256, "none", "dynamic_per_token",
                                                    1.0, 0)
        want = torch.nn.functional.linear(x.float(), w, q.bias.float())
        for got in (y, y_op):
            assert got.dtype == dtype
            assert float((got.float() - want).abs().max()) <= tol * float(want.abs().max()), (m, got, want)
    assert isinstance(q._prepared, cpu_backend.Prepared)
    assert cpu_backend.explain(grid, 4, q.layer_spec.group_size, 256, dtype).startswith("cpu ")
    # an in-place change of the stored scales is seen (the decoded scales are not reused stale)
    x = torch.randn(1, 256, generator=g).to(dtype)
    with torch.no_grad():
        before = q(x)
        if grid == "mxfp4":
            q.scales.add_(1)  # every block scale doubles
        else:
            q.global_scale.mul_(2)
        after = q(x)
    assert torch.allclose(after.float() - q.bias.float(), 2 * (before.float() - q.bias.float()), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("grid", ["mxfp4", "nvfp4"])
def test_checkpoint_round_trip_is_bit_exact_and_corruption_is_refused(grid, tmp_path):
    from safetensors.torch import load_file, save_file

    from piecewise_quant.checkpoint import CheckpointMismatchError
    from piecewise_quant.serialization import load_quantized, save_quantized

    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    fresh = [torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)) for _ in range(3)]
    pq.quantize(model, pq.PiecewiseQuantConfig(grid=grid, modules_to_not_convert=[]), progress=False)
    save_quantized(model, tmp_path / "ck")
    back = load_quantized(fresh[0], tmp_path / "ck")
    for a, b in zip(model.modules(), back.modules()):
        if isinstance(a, pq.QuantLinear):
            for k, t in a.quantized_tensors().items():
                got = b.quantized_tensors()[k]
                assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8)), k
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    files = list((tmp_path / "ck").glob("*.safetensors"))
    assert len(files) == 1
    sd = load_file(str(files[0]))
    key = next(k for k in sd if k.endswith("0.scales"))
    bad = dict(sd)
    bad[key] = sd[key].to(torch.float16)  # wrong dtype
    save_file(bad, str(files[0]), metadata={"format": "pt"})
    with pytest.raises((CheckpointMismatchError, ValueError), match="scales"):
        load_quantized(fresh[1], tmp_path / "ck")
    bad = dict(sd)
    if grid == "mxfp4":
        bad[key] = sd[key].clone()
        bad[key][0, 0] = 255  # E8M0 NaN
        needle = "E8M0"
    else:
        gkey = key.replace("scales", "global_scale")
        bad[gkey] = torch.tensor([float("nan")])
        needle = "NaN"
    save_file(bad, str(files[0]), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=needle):
        load_quantized(fresh[2], tmp_path / "ck")


def test_mxfp4_calibrates_with_gptq():
    """mxfp4 implements fit/fake_quantize/encode, so the calibration algorithms run on it (GPTQ
    here), and they lower the output error of data-free rounding on a tiny random Llama."""
    import copy

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    test_ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref_logits = base(test_ids).logits
    errors = {}
    for cal in (None, pq.CalibrationConfig.preset("gptq", n_samples=8, seq_len=32)):
        model = copy.deepcopy(base)
        config = pq.PiecewiseQuantConfig(grid="mxfp4", calibration=cal)
        if cal is None:
            pq.quantize(model, config, progress=False)
        else:
            pq.calibrate(model, config, ids, progress=False)
        layers = pq.quantized_layers(model)
        assert layers and all(m.spec.grid == "mxfp4" for m in layers.values())
        with torch.no_grad():
            errors[cal is None] = float((model(test_ids).logits - ref_logits).square().mean())
    assert errors[False] < errors[True], errors
