"""The C decode attention over a quantized KV cache (``kv_attend``) against a float64 reference
that dequantizes the history, on every instruction tier this CPU has (``PIECEWISE_QUANT_CPU_TIER``)."""

from __future__ import annotations

import itertools

import pytest
import torch

from piecewise_quant.args import KVArgs
from piecewise_quant.kernels import kv_attention
from piecewise_quant.kv import KVParts, decode_attention, decode_attention_reference, key_rotation, quantize_kv

pytestmark = pytest.mark.skipif(not kv_attention.available(), reason="the compiled CPU kernels are not built")


@pytest.fixture(params=["best", "avx2", "generic"])
def tier(request, monkeypatch):
    if request.param != "best":
        monkeypatch.setenv("PIECEWISE_QUANT_CPU_TIER", "1" if request.param == "avx2" else "0")
    return request.param


def _parts(bits, key_axis, symmetric, rotated, hkv, sink, window, d=64, g=32, b=2, n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if symmetric == "piecewise":
        args = KVArgs(bits=bits, key_axis=key_axis, group_size=g, grid="piecewise")
    else:
        args = KVArgs(bits=bits, key_axis=key_axis, group_size=g, symmetric=symmetric)
    keys = torch.randn(b, hkv, n, d, generator=gen) * 2 + 0.5
    if rotated:
        keys = key_rotation(d)(keys)
    n_v = n - g  # values flush one token at a time: a different split of the same tokens
    values = torch.randn(b, hkv, n_v, d, generator=gen)
    rand = lambda t: torch.randn(b, hkv, t, d, generator=gen)  # noqa: E731
    kp = KVParts(rand(sink), quantize_kv(keys, args, key_axis), rand(window), rotated)
    vp = KVParts(rand(sink), quantize_kv(values, args, "token"), rand(window + n - n_v))
    return kp, vp


CASES = list(itertools.product((2, 4, 8), ("channel", "token"), (False, True, "piecewise")))
_MODE = {False: "asym", True: "sym", "piecewise": "piecewise"}


@pytest.mark.parametrize("bits, key_axis, symmetric", CASES, ids=[f"int{b}-{a}-{_MODE[s]}" for b, a, s in CASES])
def test_matches_float64_reference(tier, bits, key_axis, symmetric):
    for rotated, (hq, hkv), sink, window in [(False, (4, 4), 0, 0), (True, (8, 2), 3, 5)]:
        kp, vp = _parts(bits, key_axis, symmetric, rotated, hkv, sink, window)
        q = torch.randn(2, hq, 64, generator=torch.Generator().manual_seed(1))
        mask = torch.zeros(2, kp.tokens)
        mask[1, :7] = float("-inf")  # left padding of the second row
        for m in (None, mask):
            got = decode_attention(q, kp, vp, 64**-0.5, m)
            ref = decode_attention_reference(q.double(), kp, vp, 64**-0.5, m)
            assert got.dtype == torch.float32
            assert (got.double() - ref).abs().max() <= 2e-5 * ref.abs().max()


@pytest.mark.parametrize("d, g", [(48, 16), (32, 8), (40, 8), (16, 16)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_other_head_dims(tier, d, g, bits):
    """Head sizes the vector paths cover only in part (the rest runs the generic loops)."""
    for key_axis, mode in itertools.product(("channel", "token"), (False, "piecewise")):
        kp, vp = _parts(bits, key_axis, mode, False, 1, 2, 3, d=d, g=g)
        q = torch.randn(2, 2, d, generator=torch.Generator().manual_seed(2))
        ref = decode_attention_reference(q.double(), kp, vp, 0.1)
        got = decode_attention(q, kp, vp, 0.1)
        assert (got.double() - ref).abs().max() <= 2e-5 * ref.abs().max()


def test_half_precision_query(tier):
    """A bfloat16 query is computed in float32 and returned in bfloat16."""
    kp, vp = _parts(4, "channel", False, False, 2, 1, 3, d=48, g=16)
    q = torch.randn(2, 2, 48, generator=torch.Generator().manual_seed(2))
    ref = decode_attention_reference(q.double(), kp, vp, 0.1)
    got16 = decode_attention(q.bfloat16(), kp, vp, 0.1)
    assert got16.dtype == torch.bfloat16
    assert (got16.double() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_long_history_many_threads_equals_one_thread():
    kp, vp = _parts(4, "channel", False, False, 8, 0, 16, n=2048, b=2)
    q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_attention(q, kp, vp, 0.125)
        torch.set_num_threads(max(2, threads))
        many = decode_attention(q, kp, vp, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    ref = decode_attention_reference(q.double(), kp, vp, 0.125)
    assert (one.double() - ref).abs().max() <= 2e-5 * ref.abs().max()


def test_inconsistent_inputs_are_refused():
    kp, vp = _parts(4, "channel", False, False, 2, 0, 4)
    q = torch.randn(2, 2, 64)
    with pytest.raises(ValueError, match="mask has shape"):
        decode_attention(q, kp, vp, 0.1, torch.zeros(2, kp.tokens + 1))
    short = KVParts(vp.sink, vp.history, vp.window[:, :, 1:])
    with pytest.raises(ValueError, match="different token counts"):
        decode_attention(q, kp, short, 0.1)
    with pytest.raises(ValueError, match="expected"):
        decode_attention(q, KVParts(kp.sink, kp.history, kp.window[:1]), vp, 0.1)
    fp8 = KVParts(vp.sink, quantize_kv(torch.randn(2, 2, 8, 64), KVArgs(format="fp8", bits=8, key_axis="token"), "token"),
                  vp.window[:, :, :0])
    assert not fp8.fusable()
    with pytest.raises(ValueError, match="int 2/4/8-bit"):
        decode_attention(q, kp, fp8, 0.1)
    from piecewise_quant.kv import _segment

    pk, pv = _parts(4, "token", "piecewise", False, 2, 0, 4)
    keys, base = (pk.sink, _segment(pk.history), pk.window), _segment(pv.history)
    for bad, match in [(dict(levels=None), "breakpoint ids and a level table"),
                       (dict(breakpoint=base.breakpoint.reshape(-1)[:-1]), "one per scale"),
                       (dict(levels=base.levels[:16]), "level table must be float32 of shape")]:
        with pytest.raises(ValueError, match=match):
            kv_attention.kv_attend(q, keys, (pv.sink, base._replace(**bad), pv.window), 0.1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_c_quantizer_is_bit_exact_with_the_torch_code(bits, symmetric):
    """Token-axis K/V writes run in C; codes and float16 metadata equal the torch code's, including
    tiny, zero and large groups (the scale's round-up and its 1e-6 floor)."""
    from piecewise_quant.kv import _quantize_torch, quantize_kv

    gen = torch.Generator().manual_seed(bits)
    for g, d, magnitude in [(8, 64, 1e-9), (16, 64, 1e-3), (32, 128, 1.0), (64, 64, 300.0), (64, 128, 3e4)]:
        x = torch.randn(2, 3, 17, d, generator=gen) * magnitude
        x[0, 0, 0, :g] = 0  # an all-zero group
        args = KVArgs(bits=bits, key_axis="token", group_size=g, symmetric=symmetric)
        fast, ref = quantize_kv(x, args, "token"), _quantize_torch(x, args, "token")
        assert torch.equal(fast.codes, ref.codes) and torch.equal(fast.scale, ref.scale)
        assert (ref.zero is None and fast.zero is None) or torch.equal(fast.zero, ref.zero)
    x[0, 0, 1, 3] = float("nan")  # NaN: the torch code runs (and its NaN scale shows the problem)
    assert torch.isnan(quantize_kv(x, args, "token").scale.float()).any()
