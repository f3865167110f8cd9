"""The sparse half of a dense-and-sparse layer: ``y += x S^T`` for an outlier matrix ``S``.

``S`` (``out x in``) holds a fixed number of entries per row (the kept outliers' corrections), so
its CSR row pointers are ``arange(out + 1) * nnz_per_row`` and it is built once per layer from the
stored column indices and values (:class:`OutlierMatrix`). The product runs in float32 through
``torch.sparse`` (MKL on CPU, cuSPARSE on CUDA); :func:`sparse_add_reference` is the dense oracle.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["OutlierMatrix", "sparse_add_reference"]

# below this many tokens ``x @ S^T`` (CSC on the right) is faster than ``(S @ x^T)^T`` on CPU
_SMALL_M = 8


class OutlierMatrix:
    """``S`` as a float32 sparse CSR matrix on one device, with the key of the tensors it came from.

    Args:
        cols: ``(out, nnz_per_row)`` int64 column index of every entry.
        vals: ``(out, nnz_per_row)`` values (any float dtype).
        in_features: the number of columns of ``S``.
    """

    def __init__(self, cols: torch.Tensor, vals: torch.Tensor, in_features: int, key: tuple = ()) -> None:
        out, per_row = cols.shape
        crow = torch.arange(out + 1, device=cols.device, dtype=torch.int64) * per_row
        with warnings.catch_warnings():  # torch marks sparse CSR as beta on every construction
            warnings.simplefilter("ignore", UserWarning)
            self.csr = torch.sparse_csr_tensor(
                crow, cols.reshape(-1).to(torch.int64), vals.reshape(-1).to(torch.float32),
                size=(out, in_features), check_invariants=False,
            )
            self.csr_t = self.csr.t()
        self.key = key
        self.in_features = in_features

    def __reduce__(self):
        # a cache: copies and pickles of a layer rebuild it (sparse CSR storage cannot be copied)
        return (type(None), ())

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + x S^T`` for ``x`` ``(..., in)`` and ``y`` ``(..., out)``, in ``y``'s dtype."""
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if x2.shape[0] <= _SMALL_M:
                s = torch.mm(x2, self.csr_t)
            else:
                s = torch.mm(self.csr, x2.t()).t()
        return (y.to(torch.float32) + s.reshape(y.shape)).to(y.dtype)


def sparse_add_reference(y: torch.Tensor, x: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """The dense oracle of :meth:`OutlierMatrix.add_to`, in float64."""
    out = cols.shape[0]
    s = torch.zeros(out, x.shape[-1], dtype=torch.float64, device=x.device)
    s.scatter_add_(1, cols.to(torch.int64), vals.to(torch.float64))
    return y.to(torch.float64) + x.to(torch.float64) @ s.t()
