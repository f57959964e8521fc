"""The leaderboard's kNN graph at any size: exact up to `APPROX_ABOVE` cells, pynndescent above.

Up to `APPROX_ABOVE` cells the leaderboard's graph scores take the assignment's exact path
(`cellembed.evaluation.clustering`: exact kNN, scanpy's partition bit for bit). Above it the kNN
comes from pynndescent's NN-descent with the settings scanpy and umap give it for large data
(``n_trees = min(64, 5 + round(sqrt(N) / 20))``, ``n_iters = max(5, round(log2 N))``), and the
same UMAP connectivities, Louvain and Leiden run on that graph. Measured by bench/scoring.py
(16-d embeddings of resampled real PBMC cells; 2 cores shared, load about 3): exact kNN 0.7 /
12.7 / 35.2 s at 10k / 50k / 100k cells (50x for 10x the cells), pynndescent 0.8 / 3.5 / 9.1 s
(11x, N log N's pace), finding 99.97-99.99% of the exact neighbours; tests/test_graph_at_scale.py
asserts the recall on real cells.

pynndescent compiles its search with numba on the first call in a process: 57 s on that machine,
once per process (bench/scoring.py times it apart). pynndescent caches only some of its compiled
functions on disk; `approximate_knn` asks numba to cache the others too (`_cache_compilations`),
so that a later process loads them. Two of them cannot be cached (they take the distance as a
function argument): what a later process still compiles. First call on 30,000 random 16-d points
in a fresh process (idle 2-core AMD EPYC, 2026-12-05): 23.8-25.6 s without, 11.8-12.9 s with the
cache filled by an earlier process (24.6 s for the process that fills it).
"""

from __future__ import annotations

import warnings

import numpy as np

from cellembed.evaluation import N_NEIGHBORS
from cellembed.evaluation.clustering import knn

# Above this many cells the leaderboard's graph scores use `approximate_knn`. At 50k cells the
# exact kNN takes 12.7 s against pynndescent's 3.5 s, so the compilation (57 s) is repaid after
# five scorings (a leaderboard of a few models x 3 seeds), and the exact search's growth takes
# over above it (35 s at 100k); every data set scored so far (<= 5,700 cells) stays exact.
APPROX_ABOVE = 50_000


def approximate_knn(embed, n_neighbors=N_NEIGHBORS, seed=0):
    """Approximate nearest neighbours by NN-descent, in `clustering.knn`'s layout.

    pynndescent is asked for ``n_neighbors + 1`` neighbours (as scanpy's transformer does) with
    umap's settings for large data; each cell is put first in its row (ahead of an exact
    duplicate at distance 0, or added if the search missed it) and the first ``n_neighbors`` kept.
    The search runs on one thread (``n_jobs=1``): pynndescent's parallel search returns slightly
    different neighbours on different thread counts (0.1% of them), and a leaderboard's scores
    must not depend on the machine; the exact kNN and Louvain are single-threaded too.

    Parameters
    ----------
    embed : array-like, shape (N, d)
        Cell embedding (searched in float32, as scanpy stores it).
    n_neighbors : int
        Neighbours per cell, the cell itself included (scanpy's convention).
    seed : int
        pynndescent's ``random_state``.

    Returns
    -------
    indices : ndarray of int64, shape (N, n_neighbors)
        Neighbour ids per cell, the cell itself first, then nearest first.
    distances : ndarray of float32, shape (N, n_neighbors)
        Euclidean distances, same layout (0 first).
    """
    from pynndescent import NNDescent

    _cache_compilations()
    data = np.ascontiguousarray(embed, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"the embedding must be a cells x dimensions matrix, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise FloatingPointError("the embedding contains NaN or infinite values (or values beyond float32); "
                                 "it cannot be clustered")
    n_obs = data.shape[0]
    if not 1 <= n_neighbors < n_obs:
        raise ValueError(f"the approximate kNN needs 1 <= n_neighbors < cells, got {n_neighbors} neighbours "
                         f"of {n_obs} cells; score data this small with the exact graph (a larger approx_above)")
    index = NNDescent(data, n_neighbors=n_neighbors + 1, random_state=seed, n_jobs=1,
                      n_trees=min(64, 5 + round(n_obs**0.5 / 20.0)), n_iters=max(5, round(np.log2(n_obs))))
    indices, distances = index.neighbor_graph
    return _self_first(indices.astype(np.int64), distances, n_neighbors)


def _cache_compilations():
    """Have numba cache on disk every jitted function of pynndescent's NN-descent that it does not.

    numba's ``Dispatcher.enable_caching`` (the ``cache=True`` of ``numba.njit``) on each function of
    pynndescent's search modules compiled without it; the compiled code then goes to
    ``__pycache__`` beside pynndescent (or numba's user cache folder where that is not writable)
    and a later process loads it instead of compiling. The functions numba cannot cache (a
    function argument makes their code process-specific) are compiled as before: numba's
    warning about each is silenced here, since nothing is wrong with the search. Idempotent.
    """
    import numba
    from numba.core.caching import NullCache
    from pynndescent import kernels, pynndescent_, utils

    warnings.filterwarnings("ignore", message="Cannot cache compiled function", category=numba.NumbaWarning,
                            module=r".*pynndescent")  # numba's warn_explicit names the module by its path
    for module in (pynndescent_, utils, kernels):
        for function in vars(module).values():
            if isinstance(function, numba.core.registry.CPUDispatcher) and isinstance(function._cache, NullCache):
                function.enable_caching()


def _self_first(indices, distances, k):
    """Move every cell to the front of its own row (adding it where absent); keep ``k`` columns.

    Parameters
    ----------
    indices : ndarray of int, shape (N, m)
        Neighbour ids sorted by distance; m > k.
    distances : ndarray, shape (N, m)
    k : int

    Returns
    -------
    indices : ndarray of int, shape (N, k)
    distances : ndarray, shape (N, k)
    """
    n_obs = indices.shape[0]
    cells = np.arange(n_obs)
    is_self = indices == cells[:, None]
    order = np.argsort(~is_self, axis=1, kind="stable")  # the cell first, the others in order
    indices = np.take_along_axis(indices, order, axis=1)
    distances = np.take_along_axis(distances, order, axis=1)
    missed = ~is_self.any(axis=1)  # NN-descent did not return the cell itself: prepend it
    indices[missed, 1:] = indices[missed, :-1]
    distances[missed, 1:] = distances[missed, :-1]
    indices[missed, 0] = cells[missed]
    distances[missed, 0] = 0
    return indices[:, :k], distances[:, :k]


def neighbours(embed, n_neighbors=N_NEIGHBORS, seed=0, approx_above=APPROX_ABOVE):
    """The leaderboard's kNN: exact (`clustering.knn`) up to ``approx_above`` cells, else approximate.

    Parameters
    ----------
    embed : array-like, shape (N, d)
    n_neighbors : int
        Neighbours per cell, the cell itself included.
    seed : int
        The approximate search's random state (the exact one has none).
    approx_above : int
        Cell count above which `approximate_knn` is used.

    Returns
    -------
    indices : ndarray of int, shape (N, k)
    distances : ndarray, shape (N, k)
        The cell itself among each row's neighbours (first, for the approximate search).
    """
    if len(embed) > approx_above:
        return approximate_knn(embed, n_neighbors, seed)
    return knn(np.asarray(embed), n_neighbors)


def connectivities(indices, distances):
    """scanpy's UMAP connectivities of a kNN (``sc.pp.neighbors``' ``method="umap"``).

    Parameters
    ----------
    indices : ndarray of int, shape (N, k)
        Neighbour ids, the cell itself first.
    distances : ndarray, shape (N, k)

    Returns
    -------
    scipy.sparse.csr_matrix, shape (N, N)
        Symmetric fuzzy-union weights in (0, 1], no diagonal; its pattern is
        `clustering.knn_pattern` of the same kNN.
    """
    import scipy.sparse as sp
    from umap.umap_ import fuzzy_simplicial_set

    n_obs, k = indices.shape
    graph, _, _ = fuzzy_simplicial_set(sp.coo_matrix((n_obs, 1)), k, None, None, knn_indices=indices,
                                       knn_dists=distances, set_op_mix_ratio=1.0, local_connectivity=1.0)
    return graph.tocsr()
