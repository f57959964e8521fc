"""Louvain clusters of a cell embedding, identical to scanpy's, without the AnnData churn.

The assignment scores every embedding with

    sc.pp.neighbors(adata, use_rep="cell_embed", n_neighbors=30)
    sc.tl.louvain(adata, resolution=0.15)
    adjusted_rand_score(adata.obs["Celltype"], adata.obs["louvain"])

Reading scanpy 1.11 shows what decides that partition:

1. ``sc.pp.neighbors`` on fewer than 4096 cells asks scikit-learn's brute-force
   ``KNeighborsTransformer`` for the 31 nearest neighbours of every cell (itself included),
   keeps the first 30, and turns them into UMAP connectivities
   ``w_ij = exp(-(d_ij - rho_i) / sigma_i)``, symmetrised as ``w + w' - w * w'``.
2. ``sc.tl.louvain`` defaults to ``use_weights=False`` and ``directed=True``: it gives every
   stored entry of that matrix to ``louvain.find_partition(RBConfigurationVertexPartition,
   resolution_parameter, seed)`` as an unweighted directed edge, in row-major order.

So the partition is a function of the *pattern* of the connectivity matrix alone: the kNN
edges (both directions, no self loops) whose UMAP weight is non-zero. A weight is zero only
where the float32 exponential underflows, which a cheap bound rules out for almost every cell
(`_umap_zero_edges`). This module computes that pattern directly and runs the louvain
package's algorithm on it, reimplemented step for step in `cellembed.evaluation.louvain` (same partition, about
10x faster than the package on these graphs; bench/bench.py times both).
"""

from __future__ import annotations

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from cellembed.evaluation import N_NEIGHBORS, RESOLUTION
from cellembed.evaluation.louvain import find_partition


# umap-learn's constants (umap/umap_.py), needed to reproduce which weights are exactly zero.
_SMOOTH_K_TOLERANCE = 1e-5
_MIN_K_DIST_SCALE = 1e-3
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# exp(-x) in float32 is 0 only for x above ~103.97; a row whose largest scaled distance is
# provably below this margin cannot have a zero weight, so it skips the exact search.
_SAFE_SCALED_DISTANCE = 80.0
# above this many cells the KD-tree's kNN beats the all-pairs one (bench/bench.py --scaling)
_BRUTE_MAX_CELLS = 10_000


def _effective_k(n_obs, n_neighbors):
    """scanpy's neighbour count for ``n_obs`` cells (it shrinks it for tiny data sets)."""
    return 1 + int(0.5 * n_obs) if n_neighbors > n_obs else n_neighbors


def _rounding_tolerance(embed64):
    """Bound on scikit-learn's error in squared distances, per cell, shape (N,).

    scikit-learn computes ||x||^2 + ||y||^2 - 2<x, y>: K products of magnitude at most
    ||x||^2 + ||y||^2, each off by one ulp; 4x margin.
    """
    sq_norm = np.einsum("ij,ij->i", embed64, embed64)
    return 4 * embed64.shape[1] * np.finfo(np.float64).eps * (sq_norm + sq_norm.max())


@numba.njit(cache=True, nogil=True)
def _brute_knn(X, n_query):  # pragma: no cover - compiled
    """The ``n_query`` nearest cells of every cell by exact squared distances, all pairs.

    Each cell's squared distances to all cells are summed coordinate by coordinate (plain
    float64, vectorised across cells). The selection keeps the ``n_query`` smallest in a
    sorted buffer (ties: lower index first). Cells are visited depth-first along the
    neighbour lists found so far, so a cell usually has a visited neighbour ``p`` whose
    ``n_query`` neighbours (distinct cells) bound its own ``n_query``-th distance from
    above: candidates beyond that bound are skipped without a buffer insertion.

    Parameters
    ----------
    X : ndarray, shape (N, K)
        Embedding, float64.
    n_query : int
        Neighbours per cell, itself included (1 <= n_query <= N).

    Returns
    -------
    indices : ndarray of int, shape (N, n_query)
    sq_dist : ndarray, shape (N, n_query)
        Ascending per row.
    """
    n, dim = X.shape
    XT = np.ascontiguousarray(X.T)  # (K, N): the inner loop runs over cells
    indices = np.empty((n, n_query), np.int64)
    sq_dist = np.empty((n, n_query), np.float64)
    d = np.empty(n, np.float64)
    parent = np.full(n, -1, np.int64)
    queued = np.zeros(n, np.bool_)
    stack = np.empty(n, np.int64)
    top = 0
    next_root = 0
    for _ in range(n):
        if top == 0:  # a new component of the neighbour graph
            while queued[next_root]:
                next_root += 1
            r = next_root
            queued[r] = True
        else:
            top -= 1
            r = stack[top]
        d[:] = 0.0
        for k in range(dim):
            x_rk = X[r, k]
            col = XT[k]
            for j in range(n):
                t = x_rk - col[j]
                d[j] += t * t
        bound = np.inf
        if parent[r] >= 0:  # the farthest of the parent's neighbours, seen from r
            bound = 0.0
            for a in range(n_query):
                bound = max(bound, d[indices[parent[r], a]])
        best_d = sq_dist[r]
        best_i = indices[r]
        m = 0
        for j in range(n):
            dj = d[j]
            if dj < bound or (m < n_query and dj == bound):
                if m == n_query:
                    pos = n_query - 1
                else:
                    pos = m
                    m += 1
                while pos > 0 and best_d[pos - 1] > dj:
                    best_d[pos] = best_d[pos - 1]
                    best_i[pos] = best_i[pos - 1]
                    pos -= 1
                best_d[pos] = dj
                best_i[pos] = j
                if m == n_query:
                    bound = best_d[n_query - 1]
        for a in range(n_query - 1, -1, -1):  # the nearest neighbour is visited next
            u = best_i[a]
            if not queued[u]:
                queued[u] = True
                parent[u] = r
                stack[top] = u
                top += 1
    return indices, sq_dist


def knn(embed, n_neighbors=N_NEIGHBORS):
    """Exact nearest neighbours, as scanpy's brute-force path finds them.

    Exact distances (`_brute_knn`; a KD-tree above `_BRUTE_MAX_CELLS` cells, where its
    sub-quadratic cost wins) give the same neighbour *sets* as scikit-learn's brute force
    wherever they are unambiguous: a cell is safe when its nearest other cell, and its
    boundary (neighbour ``n_neighbors`` vs ``n_neighbors + 1``), are farther apart than
    scikit-learn's rounding error. If any cell is not (ties, duplicates), scanpy's own call
    decides, tie order included.

    Parameters
    ----------
    embed : ndarray, shape (N, K)
        Cell embedding.
    n_neighbors : int
        Neighbours per cell, the cell itself included (scanpy's convention; scanpy uses
        ``1 + N // 2`` for fewer than ``n_neighbors`` cells).

    Returns
    -------
    indices : ndarray of int, shape (N, k)
        Neighbour ids per cell, nearest first; the cell itself is among them.
    distances : ndarray, shape (N, k)
        Euclidean distances, same layout.
    """
    n_obs = np.shape(embed)[0]
    k = _effective_k(n_obs, n_neighbors)
    n_query = min(k + 1, n_obs)  # scanpy asks for k + 1 and keeps the first k
    embed64 = np.ascontiguousarray(embed, dtype=np.float64)
    if n_obs <= _BRUTE_MAX_CELLS:
        indices, d_sq = _brute_knn(embed64, n_query)
        distances = np.sqrt(d_sq)
    else:
        distances, indices = cKDTree(embed64, leafsize=32).query(embed64, k=n_query)
        distances = distances.reshape(n_obs, n_query)
        indices = indices.reshape(n_obs, n_query)
        d_sq = distances**2
    tol = _rounding_tolerance(embed64)
    safe = indices[:, 0] == np.arange(n_obs)
    if n_query > 1:
        safe &= d_sq[:, 1] > 2 * tol  # no duplicate or near-duplicate cell
    if n_query > k:
        safe &= d_sq[:, k] - d_sq[:, k - 1] > 2 * tol + 1e-12 * d_sq[:, -1]
    if not safe.all():
        nn = NearestNeighbors(n_neighbors=n_query, algorithm="brute").fit(embed)
        distances, indices = nn.kneighbors(embed)
        distances[indices == np.arange(n_obs)[:, None]] = 0  # scanpy zeroes the diagonal
    return indices[:, :k], distances[:, :k]


def _umap_zero_edges(distances):
    """Mark the kNN edges whose UMAP membership strength is exactly 0 in float32.

    umap's ``smooth_knn_dist`` finds, per cell, sigma with
    ``sum_j exp(-(d_j - rho) / sigma) = log2(k)`` (rho: the smallest positive distance), and
    ``compute_membership_strengths`` sets ``w_j = exp(-(d_j - rho) / sigma)`` in float32. The
    sum grows with sigma, so if it is already below the target at
    ``s0 = (d_max - rho) / 80``, the solution exceeds ``s0`` and every scaled distance is
    below 80: no weight can underflow. Only rows failing that test (ties at rho, far
    outliers) run umap's bisection, replicated step by step.

    Parameters
    ----------
    distances : ndarray, shape (N, k)
        Sorted kNN distances, the cell itself (distance 0) included.

    Returns
    -------
    ndarray of bool, shape (N, k)
        True where umap would store a zero weight.
    """
    d = distances.astype(np.float32)  # umap casts knn_dists to float32
    n_obs, k = d.shape
    zero = np.zeros((n_obs, k), dtype=bool)
    if k < 2:
        return zero
    target = np.log2(k)
    positive = d > 0
    has_positive = positive.any(axis=1)
    first_positive = d[np.arange(n_obs), positive.argmax(axis=1)]
    rho = np.where(has_positive, first_positive, np.float32(0)).astype(np.float32)

    gap = d[:, 1:] - rho[:, None]  # float32, as in umap
    span = gap[:, -1].astype(np.float64)  # rows are sorted: the last gap is the largest
    s0 = span / _SAFE_SCALED_DISTANCE
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        psum = np.where(gap > 0, np.exp(-(gap / s0[:, None])), 1.0).sum(axis=1)
    at_risk = (span > 0) & ~(psum < target - _SMOOTH_K_TOLERANCE)
    rows = np.flatnonzero(at_risk)
    if rows.size == 0:
        return zero

    mean_all = np.float32(np.mean(d))
    for i in rows:  # rare: umap's bisection, verbatim (exp(-x) of a huge x is 0, as intended)
        with np.errstate(over="ignore", under="ignore"):
            zero[i, 1:] = _zero_weights_row(gap[i], rho[i], d[i], mean_all, target)
    return zero


def _zero_weights_row(gi, rho_i, d_i, mean_all, target):
    """umap's smooth_knn_dist and compute_membership_strengths for one cell: zero weights."""
    lo, hi, mid = 0.0, _FLOAT32_MAX, 1.0
    for _ in range(64):
        psum_i = float(np.where(gi > 0, np.exp(-(gi.astype(np.float64) / mid)), 1.0).sum())
        if abs(psum_i - target) < _SMOOTH_K_TOLERANCE:
            break
        if psum_i > target:
            hi = mid
            mid = (lo + hi) / 2.0
        else:
            lo = mid
            mid = mid * 2 if hi >= _FLOAT32_MAX else (lo + hi) / 2.0
    sigma = np.float32(mid)
    floor = np.float32(_MIN_K_DIST_SCALE * (np.mean(d_i) if rho_i > 0 else mean_all))
    sigma = max(sigma, floor)
    if sigma == 0:
        return np.zeros(gi.shape, dtype=bool)  # umap: sigma == 0 gives weight 1
    w = np.exp(-(gi / sigma))  # float32 / float32 -> float32, as in umap
    return (gi > 0) & (w == 0)


def knn_graph_pattern(embed, n_neighbors=N_NEIGHBORS):
    """The edge pattern of scanpy's UMAP connectivity matrix for ``embed``.

    Parameters
    ----------
    embed : ndarray, shape (N, K)
        Cell embedding.
    n_neighbors : int
        kNN size, the cell itself included.

    Returns
    -------
    scipy.sparse.csr_matrix of bool, shape (N, N)
        Symmetric, sorted indices, no diagonal: ``A_ij`` is set when j is among i's
        neighbours with a non-zero UMAP weight, or i among j's.
    """
    return knn_pattern(*knn(embed, n_neighbors))


def knn_pattern(indices, distances):
    """The edge pattern of the UMAP connectivity matrix of a given kNN (`knn`'s layout).

    Parameters
    ----------
    indices : ndarray of int, shape (N, k)
        Neighbour ids per cell, nearest first, the cell itself among them.
    distances : ndarray, shape (N, k)
        Their distances, ascending per row.

    Returns
    -------
    scipy.sparse.csr_matrix of bool, shape (N, N)
        As `knn_graph_pattern`.
    """
    n_obs, k = indices.shape
    keep = indices != np.arange(n_obs)[:, None]  # umap drops the self edge wherever it sits
    keep &= ~_umap_zero_edges(distances)
    indptr, cols = _symmetric_pattern(np.ascontiguousarray(indices, dtype=np.int64), keep)
    return sp.csr_matrix((np.ones(cols.size, dtype=np.int8), cols, indptr), shape=(n_obs, n_obs))


@numba.njit(cache=True, nogil=True)
def _symmetric_pattern(indices, keep):  # pragma: no cover - compiled
    """CSR arrays of the union of the kept edges ``i -> indices[i, a]`` and their reverses.

    The fuzzy union ``w + w' - w w'`` is non-zero exactly where either direction is; rows
    come out with sorted, distinct columns (row-major order, as scanpy's
    ``adjacency.nonzero()`` lists edges).

    Parameters
    ----------
    indices : ndarray of int, shape (N, k)
    keep : ndarray of bool, shape (N, k)

    Returns
    -------
    indptr : ndarray of int, shape (N + 1,)
    cols : ndarray of int, shape (nnz,)
    """
    n, k = indices.shape
    count = np.zeros(n + 1, np.int64)
    for i in range(n):
        for a in range(k):
            if keep[i, a]:
                count[i + 1] += 1
                count[indices[i, a] + 1] += 1
    for i in range(n):
        count[i + 1] += count[i]
    fill = count[:-1].copy()
    both = np.empty(count[n], np.int64)  # each row: its out-edges, then its in-edges
    for i in range(n):
        for a in range(k):
            if keep[i, a]:
                j = indices[i, a]
                both[fill[i]] = j
                fill[i] += 1
                both[fill[j]] = i
                fill[j] += 1
    indptr = np.zeros(n + 1, np.int64)
    cols = np.empty(count[n], np.int64)
    nnz = 0
    for i in range(n):
        row = np.sort(both[count[i]:count[i + 1]])
        for a in range(row.size):
            if a == 0 or row[a] != row[a - 1]:
                cols[nnz] = row[a]
                nnz += 1
        indptr[i + 1] = nnz
    return indptr, cols[:nnz].copy()


def louvain_partition(pattern, resolution=RESOLUTION, seed=0):
    """scanpy's default Louvain (``flavor='vtraag'``, unweighted, directed) on a pattern.

    `cellembed.evaluation.louvain.find_partition` runs the louvain package's algorithm, random stream and
    numbering included, so the result is the package's partition of the same graph
    (tests/test_louvain.py checks it against the package).

    Parameters
    ----------
    pattern : scipy.sparse.csr_matrix, shape (N, N)
        Graph pattern from `knn_graph_pattern`: one directed edge per stored entry, in
        canonical format (sorted columns, no repeated entry).
    resolution : float
        RBConfiguration resolution parameter.
    seed : int
        Louvain's random seed (scanpy's ``random_state``).

    Returns
    -------
    ndarray of int, shape (N,)
        Community of every cell, numbered as the louvain package numbers them.
    """
    pattern = sp.csr_matrix(pattern)
    if not pattern.has_canonical_format:
        raise ValueError("the graph pattern must have sorted column indices and no repeated entry "
                         "(call .sum_duplicates() on it first)")
    return find_partition(pattern.indptr, pattern.indices, pattern.shape[0], resolution, seed)


def louvain_labels(embed, seed=0, n_neighbors=N_NEIGHBORS, resolution=RESOLUTION):
    """Louvain clusters of ``embed``, the same as scanpy's ``neighbors`` + ``louvain``.

    Parameters
    ----------
    embed : array-like, shape (N, K)
        Cell embedding (numpy array or CPU torch tensor).
    seed : int
        Louvain's random seed.
    n_neighbors, resolution :
        kNN size and Louvain resolution (the assignment's 30 and 0.15).

    Returns
    -------
    ndarray of int, shape (N,)
        Community of every cell.
    """
    embed = np.asarray(embed)
    if embed.ndim != 2:
        raise ValueError(f"the embedding must be a cells x dimensions matrix, got shape {embed.shape}")
    if not np.isfinite(embed).all():
        raise FloatingPointError("the embedding contains NaN or infinite values; it cannot be clustered")
    return louvain_partition(knn_graph_pattern(embed, n_neighbors), resolution, seed)


def louvain_ari(embed, true_labels, seed=0):
    """Adjusted Rand index between the Louvain clusters of ``embed`` and ``true_labels``.

    The one clustering metric of the project: `comp565_A4.evaluate_ari` and the worker
    processes of `cellembed.evaluation.scoring.ARIScorer` both call it.

    Parameters
    ----------
    embed : array-like, shape (N, K)
    true_labels : array-like, shape (N,)
    seed : int

    Returns
    -------
    float
    """
    # integer codes: the same contingency table (so the same ARI), without scikit-learn's
    # np.unique over strings at every call
    codes = pd.factorize(np.asarray(true_labels), use_na_sentinel=False)[0]
    return float(adjusted_rand_score(codes, louvain_labels(embed, seed=seed)))
