"""The sparse half of a dense-and-sparse layer: ``y += x S^T`` for an outlier matrix ``S``.

``S`` (``out x in``) holds a fixed number of entries per row, stored ELL-like as the checkpoint
keeps them (:mod:`piecewise_quant.outliers`): ``K`` entries in every group of ``width`` inputs,
each a position inside its group and a float16 value. Two implementations:

* on CPU, the C kernel ``_pq_cpu.outlier_add`` reads those stored tensors directly (no second copy)
  and adds into the dense result in place, accumulating in float32 and rounding once: at one token
  it adds 9-17 % to a 4096 x 4096 W3/W4 layer, where ``torch.sparse`` (MKL) added 27-54 %
  (docs/outliers.md, ``benchmarks/outlier_overhead.py``). A position outside its group (a corrupt
  checkpoint) raises :class:`ValueError` instead of being read through;
* elsewhere, and where gradients are needed, under ``torch.compile``, with the reference backend
  forced, or for values that are not float16: a float32 ``torch.sparse`` CSR matrix built once
  (MKL on CPU, cuSPARSE on CUDA).

:func:`sparse_add_reference` is the dense float64 oracle.
"""

from __future__ import annotations

import warnings

import torch

from .cpu_backend import _DTYPES, side_call_ok, side_extension

__all__ = ["OutlierMatrix", "check_positions", "sparse_add_reference"]

# below this many tokens ``x @ S^T`` (CSC on the right) is faster than ``(S @ x^T)^T`` on CPU
_SMALL_M = 8
_INDEX_BYTES = {torch.uint8: 1, torch.int16: 2, torch.int32: 4}


def check_positions(idx: torch.Tensor, width: int, name: str) -> None:
    """Refuse stored positions outside their group of ``width`` (a corrupt checkpoint, or one
    written for another group size) before anything reads through them."""
    if not idx.numel():
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= width:
        raise ValueError(
            f"outliers of layer {name!r}: a stored position lies outside its group of {width} "
            f"(outlier_idx holds {lo}..{hi}); the checkpoint is corrupt or was written for another "
            "group size: quantize the layer again"
        )


class OutlierMatrix:
    """``S`` from its stored ELL form, with the key of the tensors it came from.

    Args:
        idx: ``(out, n_groups * per_group)`` position of every entry inside its group (with the
            defaults, its column).
        vals: ``(out, n_groups * per_group)`` values (any float dtype; the CPU kernel takes float16,
            the stored dtype).
        in_features: the number of columns of ``S``.
        per_group: entries in each group (default: the whole row is one group).
        width: inputs per group (default: ``in_features``).
        name: the layer's name, for errors.
    """

    def __init__(self, idx: torch.Tensor, vals: torch.Tensor, in_features: int, per_group: int | None = None,
                 width: int | None = None, key: tuple = (), name: str = "") -> None:
        if idx.dim() != 2 or idx.shape != vals.shape:
            raise ValueError(f"outliers of layer {name!r}: idx {tuple(idx.shape)} and vals {tuple(vals.shape)} "
                             "must be two (out, entries) tensors of one shape")
        self.per_group = per_group or max(idx.shape[1], 1)
        self.width = width or in_features
        if idx.shape[1] % self.per_group or (idx.shape[1] // self.per_group) * self.width > in_features:
            raise ValueError(f"outliers of layer {name!r}: {idx.shape[1]} entries per row are not whole groups of "
                             f"{self.per_group} in groups of {self.width} of {in_features} inputs")
        self.idx, self.vals = idx, vals
        self.key = key
        self.in_features = in_features
        self.name = name
        self._csr: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kernel_ok = (
            idx.device.type == "cpu" and vals.dtype == torch.float16 and idx.dtype in _INDEX_BYTES
            and idx.is_contiguous() and vals.is_contiguous()
        )

    def __reduce__(self):
        # a cache: copies and pickles of a layer rebuild it (sparse CSR storage cannot be copied)
        return (type(None), ())

    def columns(self) -> torch.Tensor:
        """``(out, entries)`` int64 column of every entry."""
        n = self.idx.shape[1] // self.per_group
        base = torch.arange(n, device=self.idx.device, dtype=torch.int64).repeat_interleave(self.per_group)
        return self.idx.to(torch.int64) + base * self.width

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._csr is None:
            check_positions(self.idx, self.width, self.name)
            cols = self.columns()
            out, per_row = cols.shape
            crow = torch.arange(out + 1, device=cols.device, dtype=torch.int64) * per_row
            with warnings.catch_warnings():  # torch marks sparse CSR as beta on every construction
                warnings.simplefilter("ignore", UserWarning)
                csr = torch.sparse_csr_tensor(
                    crow, cols.reshape(-1), self.vals.reshape(-1).to(torch.float32),
                    size=(out, self.in_features), check_invariants=False,
                )
                self._csr = (csr, csr.t())
        return self._csr

    def _kernel(self, y: torch.Tensor, x: torch.Tensor):
        """The CPU extension when this call can run in it, else ``None``."""
        if not self._kernel_ok or not side_call_ok(x, y):
            return None
        return side_extension()

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + x S^T`` for ``x`` ``(..., in)`` and ``y`` ``(..., out)``, in ``y``'s dtype. On the
        CPU kernel's path ``y`` itself is updated (and returned) when it is contiguous."""
        ext = self._kernel(y, x)
        if ext is not None:
            x2 = x.reshape(-1, self.in_features)
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            y2 = y if y.is_contiguous() else y.contiguous()
            n = self.idx.shape[0]
            if y2.numel() != x2.shape[0] * n:
                raise ValueError(f"outliers of layer {self.name!r}: y {tuple(y.shape)} does not hold {n} outputs "
                                 f"for each of the {x2.shape[0]} rows of x")
            ok = ext.outlier_add(
                x2.data_ptr(), _DTYPES[x2.dtype], x2.shape[0], x2.stride(0), y2.data_ptr(), _DTYPES[y2.dtype], n,
                self.idx.data_ptr(), _INDEX_BYTES[self.idx.dtype], self.vals.data_ptr(), n, self.idx.shape[1],
                self.per_group, self.width, self.in_features, torch.get_num_threads(),
            )
            if not ok:
                check_positions(self.idx, self.width, self.name)
                raise ValueError(f"outliers of layer {self.name!r}: a stored position lies outside its group")
            return y2
        csr, csr_t = self._matrices()
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if x2.shape[0] <= _SMALL_M:
                s = torch.mm(x2, csr_t)
            else:
                s = torch.mm(csr, x2.t()).t()
        return (y.to(torch.float32) + s.reshape(y.shape)).to(y.dtype)


def sparse_add_reference(y: torch.Tensor, x: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """The dense oracle of :meth:`OutlierMatrix.add_to`, in float64 (``cols``: global columns)."""
    out = cols.shape[0]
    s = torch.zeros(out, x.shape[-1], dtype=torch.float64, device=x.device)
    s.scatter_add_(1, cols.to(torch.int64), vals.to(torch.float64))
    return y.to(torch.float64) + x.to(torch.float64) @ s.t()
