"""KV-cache quantization, framework-free: quantize, pack, dequantize and fake-quantize K/V tensors.

Tensors are attention states shaped ``(batch, heads, tokens, head_dim)``. Two axes
(:class:`~piecewise_quant.args.KVArgs`):

* ``"token"``: a scale (and zero point) per token and per ``group_size`` channels of head_dim;
* ``"channel"``: a scale per channel for each block of ``group_size`` tokens (KIVI keys); the
  token count must be a multiple of ``group_size``.

Codes are packed along head_dim with :mod:`piecewise_quant.kernels.packing`'s layout (low bits
first; 3-bit codes take 3 bits), so a :class:`KVQTensor` really holds ``bits`` per value plus
float16 metadata. Quantized tensors concatenate along tokens (:func:`cat`) and select along batch,
which is all a cache needs: history is never re-quantized.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from .args import KVArgs
from .formats.base import round_scale
from .formats.piecewise import _encode as encode_piecewise
from .formats.piecewise import _sq_error as sq_error
from .kernels import kv_attention
from .kernels.grids import outer_levels, piecewise_levels, piecewise_table
from .kernels.hadamard import get_rotation
from .kernels.packing import pack_codes, unpack_codes

__all__ = [
    "KVQTensor",
    "KVParts",
    "quantize_kv",
    "dequantize_kv",
    "fake_quantize_kv",
    "cat",
    "storage_bytes",
    "key_rotation",
    "decode_attention",
    "decode_attention_reference",
]

META_DTYPE = torch.float16
_FAST_BITS = (2, 4, 8)


@dataclass(frozen=True)
class KVQTensor:
    """Packed K or V codes with their metadata.

    ``codes``: uint8, ``(B, H, T, packed)`` (token axis) or ``(B, H, T//G, G, packed)`` (channel axis);
    ``scale``/``zero``: float16, ``(B, H, T, D//G, 1)`` or ``(B, H, T//G, 1, D)`` (``zero`` is
    ``None`` when symmetric and for the piecewise grid). ``breakpoint``: the piecewise grid's
    breakpoint id per group (uint8, ``scale``'s shape; its ``scale`` is signed), else ``None``.
    Dimension 2 is always the token (or token-block) dimension.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    axis: str
    bits: int
    format: str
    head_dim: int
    breakpoint: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        n = self.codes.shape[2]
        return n * self.codes.shape[3] if self.axis == "channel" else n

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.zero, self.breakpoint) if t is not None]

    def map(self, fn) -> "KVQTensor":
        """The same codes with ``fn`` applied to every tensor (batch selection, device moves)."""
        return replace(self, codes=fn(self.codes), scale=fn(self.scale), zero=None if self.zero is None else fn(self.zero),
                       breakpoint=None if self.breakpoint is None else fn(self.breakpoint))


def _groups(x: torch.Tensor, axis: str, g: int) -> tuple[torch.Tensor, int]:
    """``x`` reshaped so that each group is reduced over dimension ``red`` (returned)."""
    b, h, t, d = x.shape
    if axis == "token":
        if d % g:
            raise ValueError(f"kv_cache.group_size={g} must divide head_dim={d} for per-token quantization")
        return x.reshape(b, h, t, d // g, g), -1
    if t % g:
        raise ValueError(f"per-channel KV quantization needs a multiple of group_size={g} tokens; got {t}")
    return x.reshape(b, h, t // g, g, d), -2


def _round_up_half(x: torch.Tensor) -> torch.Tensor:
    """float16 no smaller than ``x`` (a rounded-down scale would clip the group's extreme)."""
    y = x.to(META_DTYPE)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _quantize_tokens_c(x: torch.Tensor, args: KVArgs) -> KVQTensor | None:
    """The token axis in C (bit for bit what the torch code below computes), or ``None``."""
    ext = kv_attention._ext()
    b, h, t, d = x.shape
    if (ext is None or args.format != "int" or args.grid != "uniform" or args.bits not in _FAST_BITS or not x.is_cpu
            or d % args.group_size or d > 4096):
        return None
    xf = x.to(torch.float32).contiguous()
    codes = torch.empty(b, h, t, d * args.bits // 8, dtype=torch.uint8)
    scale = torch.empty(b, h, t, d // args.group_size, 1, dtype=META_DTYPE)
    zero = None if args.symmetric else torch.empty_like(scale)
    ok = ext.kv_quantize(xf.data_ptr(), b * h * t, d, args.group_size, args.bits, int(args.symmetric), codes.data_ptr(),
                         scale.data_ptr(), 0 if zero is None else zero.data_ptr())
    return KVQTensor(codes, scale, zero, "token", args.bits, args.format, d) if ok else None


def quantize_kv(x: torch.Tensor, args: KVArgs, axis: str) -> KVQTensor:
    """Quantize ``x`` (``(B, H, T, D)``) along ``axis`` as ``args`` say."""
    if args.static_scales:
        raise ValueError(
            "kv_cache.static_scales=True uses one calibrated scale per layer, not per-group scales; use "
            "piecewise_quant.kv_static (static_kv_fake_quant, or plain generate() on the calibrated model)"
        )
    if axis == "token" and not (x.requires_grad and torch.is_grad_enabled()):
        fast = _quantize_tokens_c(x, args)
        if fast is not None:
            return fast
    return _quantize_torch(x, args, axis)


def _quantize_torch(x: torch.Tensor, args: KVArgs, axis: str) -> KVQTensor:
    g = args.group_size
    xg, red = _groups(x.float(), axis, g)
    if args.grid == "piecewise":
        return _quantize_piecewise(xg, red, args, axis, x.shape[-1])
    if args.symmetric:
        amax = xg.abs().amax(dim=red, keepdim=True)
        scale = _round_up_half((amax / args.qmax).clamp_min(1e-6))
        zero = None
        q = xg / scale.float()
        if args.format == "fp8":
            codes = q.clamp(-args.qmax, args.qmax).to(torch.float8_e4m3fn).view(torch.uint8)
        else:
            offset = 2 ** (args.bits - 1)
            codes = (torch.round(q).clamp(-args.qmax, args.qmax) + offset).to(torch.uint8)
    else:
        lo = xg.amin(dim=red, keepdim=True)
        hi = xg.amax(dim=red, keepdim=True)
        zero = lo.to(META_DTYPE)
        scale = _round_up_half(((hi - zero.float()) / args.qmax).clamp_min(1e-6))
        codes = torch.round((xg - zero.float()) / scale.float()).clamp(0, args.qmax).to(torch.uint8)
    codes = codes.reshape(*codes.shape[:3], -1) if axis == "token" else codes
    return KVQTensor(_pack(codes, args.bits, args.format), scale, zero, axis, args.bits, args.format, x.shape[-1])


PIECEWISE_SCALES = {2: 0.3, 3: 0.45}  # the smallest scale factor tried, per bits (else 0.55): the format's MSE range
_SEARCH_ELEMENTS = 1 << 21  # per chunk of groups: bounds the search's temporary memory on a long prefill


def piecewise_search(groups: torch.Tensor, bits: int, mse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The piecewise grid's breakpoint search, every breakpoint id at once: for each group of
    ``groups`` ``(n, g)`` (float32), the (signed scale, breakpoint id) with the smallest squared
    error. ``mse=False``: each id with the scale that covers the group, the same choice as
    ``PiecewiseFormat.search(groups, bits, "minmax")``; ``mse=True``: every id at six scales from
    that one down (the format's coarse MSE scales, without its finer stage), so its error is never
    above the min-max choice's. 8 bits looks at every 8th id, as the format does. (The C kernel
    ``kv_piecewise`` runs the same search on the CPU.)"""
    ids = _candidates(bits, groups.device)[0]
    factors = _factors(bits, mse).to(groups.device)
    chunk = max(1, _SEARCH_ELEMENTS // (ids.numel() * factors.numel() * max(1, groups.shape[1])))
    out = [_search_chunk(c, bits, ids, factors) for c in groups.split(chunk)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


@functools.lru_cache(maxsize=16)
def _factors(bits: int, mse: bool) -> torch.Tensor:
    return torch.linspace(1.0, PIECEWISE_SCALES.get(bits, 0.55), 6) if mse else torch.ones(1)


@functools.lru_cache(maxsize=16)
def _candidates(bits: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The breakpoint ids the search tries (every 8th at 8 bits) and their ``h, r`` and outer levels."""
    table = piecewise_table(bits, device)
    neg_outer, pos_outer = outer_levels(bits, device)
    ids = torch.arange(0, table.shape[0], max(1, table.shape[0] // 32), device=device)
    return ids, table[ids, 0].contiguous(), table[ids, 1].contiguous(), neg_outer[ids].contiguous(), pos_outer[ids].contiguous()


def _search_chunk(groups: torch.Tensor, bits: int, ids: torch.Tensor, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`piecewise_search` on one chunk of groups: every id at every scale factor."""
    _, h, r, no, po = _candidates(bits, groups.device)
    lo, hi = groups.amin(dim=1).clamp(max=0), groups.amax(dim=1).clamp(min=0)
    neg_big = (-lo) >= hi  # the larger side goes on the negative codes, which have one more level
    sign = torch.where(neg_big, 1.0, -1.0)
    big, small = torch.where(neg_big, -lo, hi), torch.where(neg_big, hi, -lo)
    f = factors.numel()
    cover = torch.maximum(big[:, None] / no, small[:, None] / po)  # (n, ids)
    scale = (cover[:, :, None] * factors).flatten(1)  # (n, ids * factors), id-major
    per = [t.repeat_interleave(f)[None, :] for t in (h, r, no, po)]  # each candidate's grid, broadcast over groups
    err = sq_error(groups * sign[:, None], scale, *per)
    best = err.argmin(dim=1)
    return scale.gather(1, best[:, None]).squeeze(1) * sign, ids[best // f]


def _piecewise_c(flat: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...] | None:
    """:func:`piecewise_search` and the encoding in C (``kv_piecewise``): ``(codes, scale, ids)``, or
    ``None`` where the kernel is not built, the tensor is not on the CPU, or it holds NaN."""
    ext = kv_attention._ext()
    if ext is None or not hasattr(ext, "kv_piecewise") or not flat.is_cpu:
        return None
    x = flat.contiguous()
    ids, h, r, no, po = _candidates(bits, x.device)
    fac = _factors(bits, True)
    n, g = x.shape
    codes = torch.empty(n, g, dtype=torch.uint8)
    scale = torch.empty(n, dtype=META_DTYPE)
    bp = torch.empty(n, dtype=torch.uint8)
    ok = ext.kv_piecewise(x.data_ptr(), n, g, bits, ids.numel(), h.data_ptr(), r.data_ptr(), no.data_ptr(), po.data_ptr(),
                          ids.data_ptr(), fac.numel(), fac.data_ptr(), codes.data_ptr(), scale.data_ptr(), bp.data_ptr())
    return (codes, scale, bp) if ok else None


def _piecewise_torch(flat: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    s, k = piecewise_search(flat, bits)
    s = round_scale(s, META_DTYPE, "kv_cache").float()
    table = piecewise_table(bits, flat.device)
    half = float(1 << (bits - 1))
    safe = torch.where(s != 0, s, torch.ones_like(s))[:, None]
    d = encode_piecewise(flat / safe, table[k, 0][:, None], table[k, 1][:, None], half)
    return (d + half).to(torch.uint8), s.to(META_DTYPE), k.to(torch.uint8)


def _quantize_piecewise(xg: torch.Tensor, red: int, args: KVArgs, axis: str, head_dim: int) -> KVQTensor:
    """Piecewise codes of the groups of ``xg`` (reduced over dimension ``red``)."""
    moved = xg.movedim(red, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    out = _piecewise_c(flat, args.bits) if not (flat.requires_grad and torch.is_grad_enabled()) else None
    codes, s, k = out if out is not None else _piecewise_torch(flat, args.bits)
    codes = codes.reshape(moved.shape).movedim(-1, red)
    meta_shape = (*moved.shape[:-1], 1)
    scale = s.reshape(meta_shape).movedim(-1, red)
    bp = k.reshape(meta_shape).movedim(-1, red)
    codes = codes.reshape(*codes.shape[:3], -1) if axis == "token" else codes
    return KVQTensor(_pack(codes, args.bits, "int"), scale, None, axis, args.bits, "int", head_dim, bp)


_LEVELS: dict[tuple[int, torch.device], torch.Tensor] = {}


def level_table(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Every piecewise level in units of the scale, ``(256, 2**bits)`` float32: row ``id``, column
    ``code``; rows past the grid's ``2**bits`` ids are zero, so any uint8 id stays inside it."""
    key = (bits, torch.device(device))
    if key not in _LEVELS:
        table = piecewise_table(bits, device)
        d = torch.arange(1 << bits, dtype=torch.float32, device=device) - (1 << (bits - 1))
        lut = torch.zeros(256, 1 << bits, dtype=torch.float32, device=device)
        lut[: table.shape[0]] = piecewise_levels(d[None, :], table[:, :1], table[:, 1:])
        _LEVELS[key] = lut
    return _LEVELS[key]


def _pack(codes: torch.Tensor, bits: int, fmt: str) -> torch.Tensor:
    if fmt == "fp8" or bits == 8:
        return codes.contiguous()
    if bits not in _FAST_BITS:
        return pack_codes(codes, bits)
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (c << shifts).sum(-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, fmt: str, d: int) -> torch.Tensor:
    if fmt == "fp8":
        return packed.view(torch.float8_e4m3fn).float()
    if bits == 8:
        return packed.float()
    if bits not in _FAST_BITS:
        return unpack_codes(packed, bits, d).float()
    # one uint8 op per code position, stacked (measured faster than a broadcast shift or a table lookup)
    mask = (1 << bits) - 1
    codes = torch.stack([(packed >> s) & mask for s in range(0, 8, bits)], dim=-1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :d].float()


def dequantize_kv(q: KVQTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(B, H, T, D)`` tensor that ``q`` stores, in ``dtype``."""
    vals = _unpack(q.codes, q.bits, q.format, q.head_dim)
    if q.axis == "token":
        b, h, t, d = vals.shape
        vals = vals.reshape(b, h, t, q.scale.shape[3], -1)
    if q.breakpoint is not None:  # one look-up of (breakpoint id, code) in the table of grid levels
        lut = level_table(q.bits, vals.device).reshape(-1)
        out = lut[q.breakpoint.long() * (1 << q.bits) + vals.long()] * q.scale.float()
    elif q.zero is None:
        if q.format == "int":
            vals = vals - 2 ** (q.bits - 1)
        out = vals * q.scale.float()
    else:
        out = torch.addcmul(q.zero.float(), vals, q.scale.float())
    b, h = out.shape[:2]
    return out.reshape(b, h, -1, q.head_dim).to(dtype)


def fake_quantize_kv(x: torch.Tensor, args: KVArgs, axis: str) -> torch.Tensor:
    """``dequantize_kv(quantize_kv(x))`` in ``x``'s dtype. On the channel axis a trailing partial
    block of tokens is quantized as a block of its own."""
    if axis == "channel" and x.shape[2] % args.group_size:
        cut = x.shape[2] - x.shape[2] % args.group_size
        tail = fake_quantize_kv(x[:, :, cut:], replace(args, group_size=x.shape[2] - cut), axis)
        head = fake_quantize_kv(x[:, :, :cut], args, axis) if cut else x[:, :, :0]
        return torch.cat([head, tail], dim=2)
    if x.shape[2] == 0:
        return x
    return dequantize_kv(quantize_kv(x, args, axis), x.dtype)


def cat(parts: list[KVQTensor]) -> KVQTensor:
    """Concatenate quantized tensors along tokens (same axis, bits and format)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    zero = None if first.zero is None else torch.cat([p.zero for p in parts], dim=2)
    bp = None if first.breakpoint is None else torch.cat([p.breakpoint for p in parts], dim=2)
    return replace(
        first,
        codes=torch.cat([p.codes for p in parts], dim=2),
        scale=torch.cat([p.scale for p in parts], dim=2),
        zero=zero,
        breakpoint=bp,
    )


def storage_bytes(tensors: list[torch.Tensor | None]) -> int:
    """Bytes allocated for ``tensors`` (their storages, each counted once: a view of a larger
    tensor counts the whole allocation it keeps alive)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


# ---- decode attention straight from the codes ----------------------------------------------------


def key_rotation(head_dim: int):
    """R3: the randomized Hadamard rotation of one head's keys (seed 0)."""
    return get_rotation(head_dim, 0, "R3")


def fake_quantize_keys_values(keys: torch.Tensor, values: torch.Tensor, args: KVArgs,
                              fake_quantize=fake_quantize_kv) -> tuple[torch.Tensor, torch.Tensor]:
    """New post-RoPE ``keys`` and ``values`` as the cache ``args`` stores and reads them back,
    each through ``fake_quantize(states, args, axis)``: keys along ``args.key_axis`` (rotated by
    R3 first, and back after, when ``args.key_rotation``), values along ``args.value_axis``."""
    if args.key_rotation:
        rot = key_rotation(keys.shape[-1])
        k = rot(fake_quantize(rot(keys), args, args.key_axis), inverse=True)
    else:
        k = fake_quantize(keys, args, args.key_axis)
    return k, fake_quantize(values, args, args.value_axis)


@dataclass(frozen=True)
class KVParts:
    """What a cache layer stores for its keys or values, in token order: full-precision ``sink``
    tokens, the packed ``history`` (or ``None``) and the full-precision ``window`` of recent tokens,
    each ``(B, H, n, D)``. ``rotated``: the history holds R3-rotated keys. The parts are never
    modified (a cache replaces them), so a :class:`KVParts` is a snapshot."""

    sink: torch.Tensor
    history: KVQTensor | None
    window: torch.Tensor
    rotated: bool = False

    @property
    def tokens(self) -> int:
        return self.sink.shape[2] + (self.history.tokens if self.history is not None else 0) + self.window.shape[2]

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``(B, H, T, D)`` tensor attention sees, in ``dtype`` (default: the window's)."""
        dtype = dtype or self.window.dtype
        history = None
        if self.history is not None:
            history = dequantize_kv(self.history, dtype)
            if self.rotated:
                history = key_rotation(history.shape[-1])(history, inverse=True)
        parts = [t.to(dtype) for t in (self.sink, history, self.window) if t is not None and t.shape[-2]]
        if not parts:
            return self.window.to(dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def fusable(self) -> bool:
        """Whether :func:`decode_attention`'s kernel reads this history (int codes of 2, 4 or 8
        bits, uniform or piecewise, on the CPU; fp8 and 3-bit codes are not)."""
        h = self.history
        return (
            kv_attention.available()
            and self.window.device.type == "cpu"
            and (h is None or (h.format == "int" and h.bits in kv_attention.FUSED_BITS and h.codes.device.type == "cpu"))
        )


def _segment(h: KVQTensor | None):
    if h is None:
        return None
    g = h.codes.shape[3] if h.axis == "channel" else h.head_dim // h.scale.shape[3]
    levels = None if h.breakpoint is None else level_table(h.bits)
    return kv_attention.PackedSegment(h.codes, h.scale, h.zero, h.tokens, g, h.bits, h.axis, h.breakpoint, levels)


def decode_attention(
    query: torch.Tensor, keys: KVParts, values: KVParts, scaling: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``softmax(query keys^T * scaling + mask) values`` for one query token per head, computed from
    the packed codes without dequantizing the history (C kernel, float32 arithmetic).

    ``query``: ``(B, Hq, D)``, ``Hq`` a multiple of the cache's heads; ``mask``: additive ``(B, T)``
    or ``None``. Returns ``(B, Hq, D)`` in ``query``'s dtype. Both parts must be
    :meth:`KVParts.fusable`; values must be quantized per token.
    """
    if not (keys.fusable() and values.fusable()):
        raise ValueError("decode_attention needs int 2/4/8-bit histories (uniform or piecewise) on the CPU with the "
                         "compiled kernels")
    if values.history is not None and values.history.axis != "token":
        raise ValueError("decode_attention: values must be quantized per token")
    q_history = key_rotation(query.shape[-1])(query.float()) if keys.rotated and keys.history is not None else None
    out = kv_attention.kv_attend(query, (keys.sink, _segment(keys.history), keys.window),
                    (values.sink, _segment(values.history), values.window), scaling, mask, q_history)
    return out.to(query.dtype)


def decode_attention_reference(
    query: torch.Tensor, keys: KVParts, values: KVParts, scaling: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`decode_attention` in float64 from the dequantized parts (the tests' reference)."""
    k = keys.dense(torch.float64)
    v = values.dense(torch.float64)
    rep = query.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", query.double(), k) * scaling
    if mask is not None:
        scores = scores + mask.double()[:, None, :]
    return torch.einsum("bht,bhtd->bhd", scores.softmax(dim=-1), v).to(query.dtype)
