"""Randomized Hadamard rotations: construction, the pure-torch transform, and its fast CPU call.

A rotation of size ``n = K * 2**m`` is ``R = diag(s) @ H / sqrt(n)`` with ``s`` random signs (from a
seed) and ``H = kron(H_K, H_2^m)``: ``H_2^m`` is Sylvester's matrix, ``H_K`` a Paley Hadamard matrix
for the small factor ``K`` (12, 20, 28, 36, 44, 60, ... : ``K - 1`` a prime ``= 3 mod 4``, or
``K / 2 - 1`` a prime ``= 1 mod 4``). ``R`` is orthogonal, so ``x @ R @ R.T @ W.T == x @ W.T``:
rotating a layer's input and its weight the same way leaves the product unchanged, while spreading
an outlier channel over all ``n`` channels (QuaRot, QuIP#). Sizes are never zero-padded (a padded
transform is not a rotation of the original space); an unsupported size is refused.

* :func:`hadamard_matrix` / :func:`rotation_matrix`: dense matrices in float64, for fusing a
  rotation into weights offline.
* :func:`rotate`: ``x @ R`` without building ``R``: the sign flip, Sylvester's butterfly as one
  ``2^m x 2^m`` matmul per factor of at most 64, and ``H_K`` as a ``K x K`` matmul; any device,
  any float dtype (computed in float32 for 16-bit inputs), differentiable. This is the reference.
* :class:`Rotation`: one (size, seed, salt) rotation with cached signs and factors; its ``__call__``
  takes the compiled CPU transform (``_pq_cpu.hadamard``) for CPU float tensors without autograd,
  else :func:`rotate`.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["supported_size", "hadamard_matrix", "rotation_matrix", "random_signs", "rotate", "Rotation",
           "ScaledRotation", "SALTS"]

# every random sign vector is drawn from (seed, size, salt): the salt keeps R1, R2, R4, the input and
# the output rotations of one size independent
SALTS = {"R1": 1, "R2": 2, "R3": 3, "R4": 4, "input": 5, "output": 6}
_MAX_SYLVESTER_BLOCK = 64
# the dense factor costs K multiply-adds per element: larger Paley orders exist but are too slow online
_MAX_K = 256


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    return all(p % d for d in range(2, int(math.isqrt(p)) + 1))


def _small_factor(n: int) -> tuple[int, int] | None:
    """``(K, 2^m)`` with ``n = K * 2^m`` and a Hadamard matrix of order ``K`` known here, or ``None``."""
    if n < 1:
        return None
    pow2 = n & -n
    k = n // pow2
    if k == 1:
        return 1, pow2
    # K must be a multiple of 4 (or 2 for K=2, which is Sylvester's): move factors of 2 into K
    for shift in range(0, pow2.bit_length()):
        kk = k << shift
        if kk > _MAX_K:
            return None
        if kk % 4 == 0 and _paley_order_ok(kk):
            return kk, pow2 >> shift
    return None


def _paley_order_ok(k: int) -> bool:
    return (_is_prime(k - 1) and (k - 1) % 4 == 3) or (k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1)


def supported_size(n: int) -> bool:
    """Whether a Hadamard rotation of size ``n`` can be built (``n = K * 2^m``, see the module doc)."""
    return _small_factor(n) is not None


def _jacobsthal(q: int) -> torch.Tensor:
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in residues else -1 for i in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).view(1, -1) - torch.arange(q).view(-1, 1)) % q
    return chi[idx]


@functools.lru_cache(maxsize=None)
def _paley(k: int) -> torch.Tensor:
    """A Hadamard matrix of order ``k`` by Paley's first (``k - 1`` prime, 3 mod 4) or second
    (``k / 2 - 1`` prime, 1 mod 4) construction."""
    q = k - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(k, k, dtype=torch.float64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return s + torch.eye(k, dtype=torch.float64)
    q = k // 2 - 1
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _check_size(n: int) -> tuple[int, int]:
    f = _small_factor(int(n))
    if f is None:
        raise ValueError(
            f"no Hadamard rotation of size {n}: the size must be K * 2^m with K = 1 or a Paley order "
            "(12, 20, 28, 36, 44, 60, 68, 76, 84, 108, ... up to 256: K-1 a prime = 3 mod 4, or K/2-1 a prime = 1 mod "
            "4; LLaMA-2's 11008 = 172 * 64 needs a Williamson matrix, not built in yet); "
            "zero-padding is not a rotation, so leave this layer out of the rotation"
        )
    return f


def hadamard_matrix(n: int) -> torch.Tensor:
    """The ``n x n`` Hadamard matrix ``kron(H_K, H_2^m)`` (entries +-1, float64, ``H @ H.T = n I``)."""
    k, p = _check_size(n)
    hk = _paley(k) if k > 1 else torch.ones(1, 1, dtype=torch.float64)
    return torch.kron(hk, _sylvester(p))


def random_signs(n: int, seed: int, salt: str) -> torch.Tensor:
    """The rotation's +-1 signs (float64), reproducible on every platform from ``(seed, n, salt)``."""
    if salt not in SALTS:
        raise ValueError(f"unknown rotation salt {salt!r}; allowed: {sorted(SALTS)}")
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(n) * 101 + SALTS[salt]) % (2**63 - 1))
    bits = torch.randint(0, 2, (int(n),), generator=g, dtype=torch.int64)
    return (1 - 2 * bits).to(torch.float64)


def rotation_matrix(n: int, seed: int, salt: str) -> torch.Tensor:
    """``R = diag(signs) @ H / sqrt(n)`` in float64: orthogonal, for fusing into weights."""
    return random_signs(n, seed, salt).unsqueeze(1) * hadamard_matrix(n) / math.sqrt(n)


def _blocks(p: int) -> list[int]:
    """Sylvester ``H_p`` as a Kronecker product of blocks of at most 64."""
    out = []
    while p > 1:
        b = min(p, _MAX_SYLVESTER_BLOCK)
        out.append(b)
        p //= b
    return out


def rotate(x: torch.Tensor, signs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``x @ R`` (``inverse``: ``x @ R.T``) over the last dimension, ``R = diag(signs) H / sqrt(n)``.

    Pure torch (the reference and the path for every device and for autograd): the Kronecker
    factors of ``H`` are applied one axis at a time, so the cost per row is ``n * (K + sum of the
    Sylvester blocks)`` multiply-adds instead of ``n^2``."""
    n = x.shape[-1]
    k, p = _check_size(n)
    if signs.shape != (n,):
        raise ValueError(f"signs has shape {tuple(signs.shape)}, expected ({n},)")
    out_dtype = x.dtype
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    s = signs.to(device=x.device, dtype=work)
    y = x.to(work)
    if not inverse:
        y = y * s
    lead = y.shape[:-1]
    dims = ([k] if k > 1 else []) + _blocks(p)
    y = y.reshape(-1, *dims) if dims else y.reshape(-1, 1)
    for axis, size in enumerate(dims):
        h = (_paley(size) if (axis == 0 and k > 1) else _sylvester(size)).to(device=x.device, dtype=work)
        if inverse:
            h = h.T
        y = torch.movedim(torch.movedim(y, axis + 1, -1) @ h, -1, axis + 1)
    y = y.reshape(*lead, n) / math.sqrt(n)
    if inverse:
        y = y * s
    return y.to(out_dtype)


_CPU_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=1)
def _ext():
    try:
        from . import _pq_cpu
    except ImportError:
        return None
    return _pq_cpu if hasattr(_pq_cpu, "hadamard") else None


class Rotation:
    """One randomized Hadamard rotation ``R`` of size ``n`` from ``(seed, salt)``.

    ``rot(x)`` is ``x @ R`` and ``rot(x, inverse=True)`` is ``x @ R.T``, over the last dimension.
    CPU float tensors without autograd go to the compiled transform (float32 arithmetic, the same
    factorisation as :func:`rotate`); everything else runs :func:`rotate`."""

    def __init__(self, n: int, seed: int, salt: str) -> None:
        self.n, self.seed, self.salt = int(n), int(seed), salt
        self.k, self.p = _check_size(self.n)
        self.signs = random_signs(self.n, self.seed, salt)
        self._signs32 = self.signs.to(torch.float32).contiguous()
        hk = _paley(self.k) if self.k > 1 else torch.ones(1, 1, dtype=torch.float64)
        self._hk32 = hk.to(torch.float32).contiguous()
        self._hk32_t = hk.T.to(torch.float32).contiguous()

    def __repr__(self) -> str:
        return f"Rotation(n={self.n}, seed={self.seed}, salt={self.salt!r}, K={self.k})"

    def kernel_args(self) -> tuple[int, int, int, int]:
        """``(signs, H_K, K, P)`` for the CPU kernels' fused rotate-and-multiply call (the tensors
        are owned by this object, which the caller keeps alive)."""
        return self._signs32.data_ptr(), self._hk32.data_ptr(), self.k, self.p

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return rotation_matrix(self.n, self.seed, self.salt).to(dtype)

    def __call__(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        return self._apply(x, self._signs32, self.signs, inverse)

    def _apply(self, x: torch.Tensor, vec32: torch.Tensor, vec: torch.Tensor, inverse: bool) -> torch.Tensor:
        """The transform with ``vec`` (``vec32``: its float32 copy for the compiled path) as the sign vector."""
        n = self.n
        if x.shape[-1] != n:
            raise ValueError(f"rotation of size {n} applied to a tensor whose last dimension is {x.shape[-1]}")
        ext = _ext()
        dt = _CPU_DTYPES.get(x.dtype)
        if (ext is not None and dt is not None and x.is_cpu and not (x.requires_grad and torch.is_grad_enabled())
                and not torch.compiler.is_compiling()):
            if not x.is_contiguous():
                x = x.contiguous()
            y = torch.empty_like(x)
            rows = x.numel() // n
            if rows:
                ext.hadamard(x.data_ptr(), dt, rows, n, y.data_ptr(), vec32.data_ptr(),
                             (self._hk32_t if inverse else self._hk32).data_ptr(), self.k, self.p, int(inverse))
            return y
        return rotate(x, vec, inverse)


class ScaledRotation:
    """A per-channel smoothing scale ``s`` followed by a :class:`Rotation` ``R`` (ViDiT-Q's channel
    balance): ``rot(x)`` is ``(x / s) @ R`` and ``rot(y, inverse=True)`` is ``(y @ R.T) / s``.

    Both are the rotation transform with ``signs / s`` in place of the signs (the transform
    multiplies by that vector before ``H`` going forward and after ``H.T`` going back), so the
    compiled CPU transform and the fused rotate-and-multiply kernel run it unchanged. The weight
    side is ``W diag(s) R``: ``rot(x) @ (W diag(s) R).T == x @ W.T``.

    ``scale`` is a tensor or a zero-argument callable returning the current one (a layer's
    ``balance_scale`` buffer, which a checkpoint load may replace); the combined vector is
    rebuilt whenever that tensor changes."""

    def __init__(self, n: int, seed: int, salt: str, scale) -> None:
        self.base = get_rotation(n, seed, salt)
        self.n, self.k, self.p = self.base.n, self.base.k, self.base.p
        self._scale = scale
        self._key = None
        self._vector = None

    def __repr__(self) -> str:
        return f"ScaledRotation(n={self.n}, seed={self.base.seed}, salt={self.base.salt!r})"

    def scale(self) -> torch.Tensor:
        return self._scale() if callable(self._scale) else self._scale

    def vector(self, device: torch.device | None = None) -> torch.Tensor:
        """``signs / s`` in float32 (cached per scale tensor, version and device)."""
        s = self.scale()
        if s.shape != (self.n,):
            raise ValueError(f"balance scale has shape {tuple(s.shape)}, expected ({self.n},)")
        device = device or s.device
        key = (s.data_ptr(), s._version, str(device))
        if key != self._key:
            if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                raise ValueError("balance scale must be finite and positive (a corrupt balance_scale tensor?)")
            v = self.base.signs.to(device=s.device, dtype=torch.float64) / s.double()
            self._vector = v.to(device=device, dtype=torch.float32).contiguous()
            self._key = key
        return self._vector

    def kernel_args(self) -> tuple[int, int, int, int]:
        """As :meth:`Rotation.kernel_args`, with ``signs / s`` as the sign vector."""
        return self.vector(torch.device("cpu")).data_ptr(), self.base._hk32.data_ptr(), self.k, self.p

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``diag(1 / s) R`` (what ``rot(x)`` multiplies ``x`` by)."""
        return (self.base.matrix(torch.float64) / self.scale().double().cpu().unsqueeze(1)).to(dtype)

    def __call__(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        v = self.vector(x.device)
        return self.base._apply(x, v, v, inverse)


@functools.lru_cache(maxsize=256)
def get_rotation(n: int, seed: int, salt: str) -> Rotation:
    """A shared :class:`Rotation` (its signs and factors are built once per process)."""
    return Rotation(n, seed, salt)
