"""Count preprocessing shared by the models: library sizes, log-normalization, scaling.

Each function takes raw counts (scipy sparse or dense, cells x genes) and returns a new dense
float32 array; nothing is modified in place. scanpy's ``normalize_total`` + ``log1p`` +
``scale`` give the same numbers (tests/test_preprocessing.py checks it).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

# Guards the division by a gene's standard deviation: a gene constant across cells has sd 0
# (scanpy's scale sets such genes to 0 too).
SD_EPS = 1e-12


def dense(X, dtype=np.float32):
    """``X`` (sparse or dense, N x M) as a dense C-contiguous array of ``dtype``."""
    return np.ascontiguousarray(X.toarray() if sp.issparse(X) else np.asarray(X), dtype=dtype)


def library_sizes(X):
    """Total count of every cell, shape (N,), float64."""
    return np.asarray(X.sum(axis=1), dtype=np.float64).ravel()


def size_factors(X):
    """scDeepCluster's size factors: cell total / median cell total, shape (N,)."""
    totals = library_sizes(X)
    return totals / np.median(totals)


def log_normalize(X, target_sum=1e4):
    """``log1p(target_sum * x / total)`` per cell, dense (N, M) float32 (scanpy's normalize_total + log1p).

    Empty cells are refused by the loaders, so every total is positive.
    """
    totals = library_sizes(X)
    assert (totals > 0).all(), "a cell has no counts; the loaders drop such cells"
    scaled = sp.diags(target_sum / totals) @ X if sp.issparse(X) else X * (target_sum / totals)[:, None]
    return np.log1p(dense(scaled))


def gene_scaling(X):
    """Per-gene mean and divisor of `scale`: ``(X - mean) / sd`` is ``scale(X)`` bit for bit.

    Parameters
    ----------
    X : ndarray, shape (N, M)

    Returns
    -------
    mean, sd : ndarray, shape (M,), float64
        ``sd``: the standard deviation (ddof 1, as scanpy's ``scale``), 1 for a constant gene.
    """
    X = np.asarray(X, dtype=np.float64)
    sd = X.std(axis=0, ddof=1)
    return X.mean(axis=0), np.where(sd > SD_EPS, sd, 1.0)


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
