"""Count preprocessing shared by the models: library sizes, log-normalization, scaling.

Each function takes raw counts (scipy sparse or dense, cells x genes) and returns a new array;
nothing is modified in place. scanpy's ``normalize_total`` + ``log1p`` + ``scale`` give the
same numbers (tests/test_memory.py checks it).

Memory that grows with the batch, not with the data (the minibatch models): `log_normalize_sparse`
keeps the zeros implicit (``log1p(0) = 0``), `gene_scaling` takes that CSR matrix as well and
gives the statistics of its dense form bit for bit, and `standardize` z-scores one dense row
batch with them; `log_normalize` and `scale` build the dense (N, M) arrays of the full-batch
models from the same operations, so the two paths give the same numbers.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

# Guards the division by a gene's standard deviation: a gene constant across cells has sd 0
# (scanpy's scale sets such genes to 0 too).
SD_EPS = 1e-12

# Values per float64 temporary of the sparse and batched transforms (8 MiB): memory that does not
# grow with the cells.
CHUNK = 2**20


def dense(X, dtype=np.float32):
    """``X`` (sparse or dense, N x M) as a dense C-contiguous array of ``dtype``."""
    return np.ascontiguousarray(X.toarray() if sp.issparse(X) else np.asarray(X), dtype=dtype)


def column_sd(X):
    """Population standard deviation (ddof 0) of every column of ``X`` (N, M), float64 (M,).

    Sparse or dense, one formula and no dense copy of a sparse ``X``: the column means, then the
    squared deviations of the stored entries plus ``mean^2`` for each implicit zero.
    """
    X = sp.csr_matrix(X)  # a dense X is read once into CSR; a sparse one is not copied
    n = X.shape[0]
    mean = np.asarray(X.sum(axis=0, dtype=np.float64)).ravel() / n  # n >= 1: checked data have cells
    stored = np.bincount(X.indices, minlength=X.shape[1])
    squares = np.zeros(X.shape[1])
    for lo in range(0, X.nnz, CHUNK):  # (x - mean)^2 of the stored entries, CHUNK at a time
        cols = X.indices[lo:lo + CHUNK]
        squares += np.bincount(cols, weights=(X.data[lo:lo + CHUNK] - mean[cols]) ** 2, minlength=X.shape[1])
    return np.sqrt((squares + (n - stored) * mean ** 2) / n)


def library_sizes(X):
    """Total count of every cell, shape (N,), float64."""
    return np.asarray(X.sum(axis=1), dtype=np.float64).ravel()


def size_factors(X):
    """scDeepCluster's size factors: cell total / median cell total, shape (N,)."""
    totals = library_sizes(X)
    return totals / np.median(totals)


def log_normalize(X, target_sum=1e4):
    """``log1p(target_sum * x / total)`` per cell, dense (N, M) float32 (scanpy's normalize_total + log1p).

    Empty cells are refused by the loaders, so every total is positive. Sparse ``X``: the dense
    form of `log_normalize_sparse` (the same numbers).
    """
    if sp.issparse(X):
        return dense(log_normalize_sparse(X, target_sum))
    totals = library_sizes(X)
    assert (totals > 0).all(), "a cell has no counts; the loaders drop such cells"
    return np.log1p(dense(X * (target_sum / totals)[:, None]))


def log_normalize_sparse(X, target_sum=1e4):
    """`log_normalize` without the dense array: CSR float32 (N, M) of the stored entries' values.

    Each stored count becomes ``log1p(float32(target_sum * x / total))`` (the product in float64,
    as `log_normalize`); the zeros stay implicit. The result shares ``X``'s index arrays (CSR
    ``X`` in canonical form: sorted, no duplicates; anything else is first converted to that).
    Memory: one float32 value per stored entry, and float64 temporaries of ``CHUNK`` entries.

    Parameters
    ----------
    X : scipy.sparse matrix, shape (N, M)
        Raw counts.
    target_sum : float

    Returns
    -------
    scipy.sparse.csr_matrix, shape (N, M), float32
    """
    X = canonical_csr(X)
    totals = library_sizes(X)
    assert (totals > 0).all(), "a cell has no counts; the loaders drop such cells"
    factors = target_sum / totals  # (N,) float64
    values = np.empty(X.nnz, dtype=np.float32)
    for lo in range(0, X.nnz, CHUNK):
        hi = min(lo + CHUNK, X.nnz)
        rows = np.searchsorted(X.indptr, np.arange(lo, hi), side="right") - 1  # each stored entry's row
        values[lo:hi] = factors[rows] * X.data[lo:hi]  # float64 product, rounded to float32 on assignment
    np.log1p(values, out=values)
    return sp.csr_matrix((values, X.indices, X.indptr), shape=X.shape, copy=False)


def canonical_csr(X):
    """``X`` as CSR with sorted indices and no duplicate entries (no copy when it is already)."""
    X = sp.csr_matrix(X)
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()  # sorts too
    return X


def gene_scaling(X):
    """Per-gene mean and divisor of `scale`: ``(X - mean) / sd`` is ``scale(X)`` bit for bit.

    A sparse ``X`` gives the numbers of its dense form bit for bit without building it: the
    means sum the stored entries in row order (a zero adds nothing), and the squared deviations
    are summed over every row in row order (numpy's order along axis 0), ``CHUNK`` values at a time.

    Parameters
    ----------
    X : ndarray or scipy.sparse matrix, shape (N, M)

    Returns
    -------
    mean, sd : ndarray, shape (M,), float64
        ``sd``: the standard deviation (ddof 1, as scanpy's ``scale``), 1 for a constant gene.
    """
    if sp.issparse(X):
        X = canonical_csr(X)
        rows = max(1, CHUNK // X.shape[1])
        return gene_scaling_blocks(lambda: (X[i:i + rows] for i in range(0, X.shape[0], rows)), *X.shape)
    X = np.asarray(X, dtype=np.float64)
    mean, sd = X.mean(axis=0), X.std(axis=0, ddof=1)
    return mean, np.where(sd > SD_EPS, sd, 1.0)


def gene_scaling_blocks(blocks, n, m):
    """`gene_scaling` of a sparse (N, M) matrix read as consecutive row blocks (e.g. from disk).

    The mean and the sd (ddof 1) are numpy's ``mean`` and ``std(ddof=1)`` along axis 0 of the
    dense form, bit for bit, whatever the blocks' sizes: the sums add each column's stored
    entries in row order (a zero adds nothing), the squared deviations are summed row after row
    (numpy's order along axis 0), ``CHUNK`` values at a time. Two passes over the data (a
    file's, for a backed AnnData).

    Parameters
    ----------
    blocks : callable
        ``() -> iterator`` of CSR row blocks (canonical), the N rows in order; called twice.
    n, m : int
        N rows and M columns.

    Returns
    -------
    mean, sd : ndarray, shape (M,), float64
        ``sd``: 1 for a constant column, as `gene_scaling`'s.
    """
    sums = np.zeros(m)
    for block in blocks():  # unbuffered: each column's entries added in row order
        for lo in range(0, block.nnz, CHUNK):
            np.add.at(sums, block.indices[lo:lo + CHUNK], block.data[lo:lo + CHUNK].astype(np.float64))
    mean = sums / n
    squares = np.zeros((1, m))  # the running sum, the first row of each block
    rows_per_block = max(1, CHUNK // m)
    for block in blocks():
        for start in range(0, block.shape[0], rows_per_block):
            part = block[start:start + rows_per_block].toarray()  # (b, M)
            stacked = np.empty((part.shape[0] + 1, m))
            stacked[0] = squares[0]
            np.subtract(part, mean, out=stacked[1:])
            np.multiply(stacked[1:], stacked[1:], out=stacked[1:])
            squares = stacked.sum(axis=0, keepdims=True)  # squares + row 1 + row 2 ..., in order
    sd = np.sqrt(squares[0] / max(n - 1, 1))  # n = 1: sd 0, replaced by 1 below
    return mean, np.where(sd > SD_EPS, sd, 1.0)


def standardize(block, mean, sd, max_value=None):
    """``(block - mean) / sd`` in float64, rounded to float32, in place: one batch of `scale`.

    Parameters
    ----------
    block : ndarray, shape (B, M), float32
        Log-normalized rows (e.g. a row batch of `log_normalize_sparse`), overwritten.
    mean, sd : ndarray, shape (M,), float64
        `gene_scaling`'s.
    max_value : float, optional
        Clip the scaled values to +- this, as `scale` (Seurat's ``ScaleData(scale.max = 10)``).

    Returns
    -------
    ndarray, shape (B, M), float32
        ``block`` itself; the float64 temporaries hold ``CHUNK`` values at a time.
    """
    rows = max(1, CHUNK // block.shape[1])
    for start in range(0, block.shape[0], rows):
        part = block[start:start + rows]
        part[...] = (part.astype(np.float64) - mean) / sd
    if max_value is not None:
        np.clip(block, -max_value, max_value, out=block)
    return block


def scale(X, max_value=None):
    """Each gene to mean 0 and unit variance (sd with ddof 1, as scanpy's ``scale``), (N, M) float32.

    Parameters
    ----------
    X : ndarray, shape (N, M)
    max_value : float, optional
        Clip the scaled values to +- this (scanpy's ``max_value``).
    """
    X = np.asarray(X, dtype=np.float64)
    mean, sd = gene_scaling(X)
    Z = (X - mean) / sd
    if max_value is not None:
        Z = np.clip(Z, -max_value, max_value)
    return Z.astype(np.float32)
