"""Sparse helpers for the NMF updates: products evaluated only where the counts are non-zero."""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp


# fastmath lets LLVM reorder the K-term dot product into SIMD lanes (rounding differs from a
# sequential sum by a few ulps, as any BLAS does)
@numba.njit(cache=True, nogil=True, fastmath=True)
def _sampled_dot(indptr, indices, W, Ht, out):  # pragma: no cover - compiled
    for i in range(W.shape[0]):
        w_i = W[i]
        for p in range(indptr[i], indptr[i + 1]):
            h_j = Ht[indices[p]]
            acc = 0.0
            for k in range(w_i.shape[0]):
                acc += w_i[k] * h_j[k]
            out[p] = acc


def sampled_product(X, W, H):
    """``(W @ H)[i, j]`` for every stored entry ``(i, j)`` of ``X``, in ``X.data`` order.

    The Poisson updates need WH only where X != 0: this costs nnz(X) * K multiply-adds
    instead of the M * N * K of the full product, and no M x N temporary.

    Parameters
    ----------
    X : scipy.sparse.csr_matrix, shape (M, N)
        Sparsity pattern (its values are not read).
    W : ndarray, shape (M, K)
    H : ndarray, shape (K, N)

    Returns
    -------
    ndarray, shape (nnz(X),)
    """
    if not sp.isspmatrix_csr(X):
        raise TypeError("X must be a scipy.sparse CSR matrix")
    out = np.empty(X.nnz, dtype=np.result_type(W, H))
    _sampled_dot(X.indptr, X.indices, np.ascontiguousarray(W), np.ascontiguousarray(H.T), out)
    return out


def with_values(X, values):
    """A CSR matrix with the pattern of ``X`` and new stored ``values`` (no copy of the pattern)."""
    return sp.csr_matrix((values, X.indices, X.indptr), shape=X.shape, copy=False)
