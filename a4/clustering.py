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
(`_umap_zero_edges`). This module computes that pattern directly, hands it to the same
Louvain implementation, and caches partitions by pattern: the same pattern and seed give the
same partition, so a repeat costs nothing (NMF embeddings stop changing their neighbours
long before the last iteration).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import OrderedDict

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

N_NEIGHBORS = 30  # the assignment's kNN size
RESOLUTION = 0.15  # the assignment's Louvain resolution

# umap-learn's constants (umap/umap_.py), needed to reproduce which weights are exactly zero.
_SMOOTH_K_TOLERANCE = 1e-5
_MIN_K_DIST_SCALE = 1e-3
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# exp(-x) in float32 is 0 only for x above ~103.97; a row whose largest scaled distance is
# provably below this margin cannot have a zero weight, so it skips the exact search.
_SAFE_SCALED_DISTANCE = 80.0


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


def knn(embed, n_neighbors=N_NEIGHBORS):
    """Exact nearest neighbours, as scanpy's brute-force path finds them.

    A KD-tree finds the same neighbour *sets* as scikit-learn's brute force wherever they
    are unambiguous: a cell is safe when its nearest other cell, and its boundary (neighbour
    ``n_neighbors`` vs ``n_neighbors + 1``), are farther apart than scikit-learn's rounding
    error. If any cell is not (ties, duplicates), scanpy's own call decides, tie order
    included.

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
    embed64 = np.asarray(embed, dtype=np.float64)
    distances, indices = cKDTree(embed64, leafsize=32).query(embed64, k=n_query)
    distances = distances.reshape(n_obs, n_query)
    indices = indices.reshape(n_obs, n_query)
    tol = _rounding_tolerance(embed64)
    d_sq = distances**2
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
    indices, distances = knn(embed, n_neighbors)
    n_obs, k = indices.shape
    keep = indices != np.arange(n_obs)[:, None]  # umap drops the self edge wherever it sits
    keep &= ~_umap_zero_edges(distances)
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    directed = sp.csr_matrix(
        (np.ones(indptr[-1], dtype=np.int8), indices[keep], indptr), shape=(n_obs, n_obs)
    )
    # the fuzzy union w + w' - w w' is non-zero exactly where either direction is
    pattern = directed.maximum(directed.T).tocsr()
    pattern.sort_indices()  # row-major order, as scanpy's adjacency.nonzero() lists edges
    return pattern


def _igraph_from_pattern(pattern):
    """A directed igraph Graph with one edge per stored entry, in row-major order.

    scanpy builds the same graph with ``g.add_edges(list(zip(sources, targets)))``, a Python
    loop over ~70k edges. For fewer than 65536 cells this writes the adjacency lists in
    igraph's binary "graph database" format (16-bit words: vertex count, then per vertex its
    out-degree and neighbours) and lets igraph's C reader parse it: the same edges in the
    same order, about 3x faster.
    """
    import igraph as ig

    n_obs = pattern.shape[0]
    if n_obs >= 2**16:
        sources, targets = pattern.nonzero()
        return ig.Graph(n=n_obs, edges=list(zip(sources.tolist(), targets.tolist())), directed=True)
    degree = np.diff(pattern.indptr)
    words = np.empty(1 + n_obs + pattern.nnz, dtype="<u2")
    words[0] = n_obs
    words[1 + np.arange(n_obs) + pattern.indptr[:-1]] = degree
    entry = np.arange(pattern.nnz)
    words[2 + np.repeat(np.arange(n_obs), degree) + entry] = pattern.indices
    with tempfile.TemporaryFile() as fh:
        fh.write(words.tobytes())
        fh.seek(0)
        graph = ig.Graph.Read_GraphDB(fh, directed=True)
    return graph


def _import_louvain():
    with warnings.catch_warnings():  # the package warns about pkg_resources and leidenalg
        warnings.simplefilter("ignore")
        import louvain
    return louvain


def louvain_partition(pattern, resolution=RESOLUTION, seed=0):
    """scanpy's default Louvain (``flavor='vtraag'``, unweighted, directed) on a pattern.

    Parameters
    ----------
    pattern : scipy.sparse.csr_matrix, shape (N, N)
        Graph pattern from `knn_graph_pattern`.
    resolution : float
        RBConfiguration resolution parameter.
    seed : int
        Louvain's random seed (scanpy's ``random_state``).

    Returns
    -------
    ndarray of int, shape (N,)
        Community of every cell, numbered as the louvain package numbers them.
    """
    louvain = _import_louvain()
    graph = _igraph_from_pattern(pattern)
    part = louvain.find_partition(
        graph, louvain.RBConfigurationVertexPartition, seed=seed, resolution_parameter=resolution
    )
    return np.asarray(part.membership)


class PartitionCache:
    """Louvain partitions keyed by (graph pattern, resolution, seed); least recently used out.

    The key is a 128-bit BLAKE2 digest of the pattern's CSR arrays: equal patterns give equal
    partitions, and a collision is beyond any practical chance.
    """

    def __init__(self, maxsize=64):
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._store = OrderedDict()

    def stats(self):
        """Counts: scorings and Louvain runs (the rest were repeats of a cached pattern)."""
        return {"scored": self.hits + self.misses, "louvain_runs": self.misses}

    @staticmethod
    def key(pattern, resolution, seed):
        h = hashlib.blake2b(digest_size=16)
        h.update(np.asarray(pattern.indptr, dtype=np.int64).tobytes())
        h.update(np.asarray(pattern.indices, dtype=np.int64).tobytes())
        h.update(repr((float(resolution), int(seed))).encode())
        return h.digest()

    def partition(self, pattern, resolution, seed):
        key = self.key(pattern, resolution, seed)
        if key in self._store:
            self.hits += 1
            self._store.move_to_end(key)
            return self._store[key]
        self.misses += 1
        labels = louvain_partition(pattern, resolution, seed)
        self._store[key] = labels
        if len(self._store) > self.maxsize:
            self._store.popitem(last=False)
        return labels


_CACHE = PartitionCache()


def louvain_labels(embed, seed=0, n_neighbors=N_NEIGHBORS, resolution=RESOLUTION, cache=_CACHE):
    """Louvain clusters of ``embed``, the same as scanpy's ``neighbors`` + ``louvain``.

    Parameters
    ----------
    embed : array-like, shape (N, K)
        Cell embedding (numpy array or CPU torch tensor).
    seed : int
        Louvain's random seed.
    n_neighbors, resolution :
        kNN size and Louvain resolution (the assignment's 30 and 0.15).
    cache : PartitionCache or None
        Reuse partitions of identical graph patterns; None recomputes every time.

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
    if cache is None:
        return louvain_partition(knn_graph_pattern(embed, n_neighbors), resolution, seed)
    return cache.partition(knn_graph_pattern(embed, n_neighbors), resolution, seed)


def louvain_ari(embed, true_labels, seed=0, cache=_CACHE):
    """Adjusted Rand index between the Louvain clusters of ``embed`` and ``true_labels``.

    The one clustering metric of the project: `comp565_A4.evaluate_ari` and the worker
    processes of `ARIScorer` both call it.

    Parameters
    ----------
    embed : array-like, shape (N, K)
    true_labels : array-like, shape (N,)
    seed : int
    cache : PartitionCache or None

    Returns
    -------
    float
    """
    return float(adjusted_rand_score(true_labels, louvain_labels(embed, seed=seed, cache=cache)))


# ---------------------------------------------------------------------------------------------
# Scoring in worker processes, overlapping with training
# ---------------------------------------------------------------------------------------------


_STATS = "__stats__"  # a worker's last message: its cache counts


def _worker(tasks, results, true_labels, seed):
    """Score embeddings from ``tasks`` until a None arrives; one cache per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # one core per worker: the workers and training share the machine
    cache = PartitionCache()
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent was killed without closing us
                return
            continue
        if task is None:
            results.put((_STATS, cache.stats(), None))
            return
        tag, embed = task
        try:
            results.put((tag, louvain_ari(embed, true_labels, seed=seed, cache=cache), None))
        except Exception as exc:  # sent back and raised in the parent with its context
            results.put((tag, float("nan"), f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class ARIScorer:
    """Scores embeddings with `louvain_ari`, synchronously or in worker processes.

    ``submit(tag, embed)`` queues one scoring; ``collect(tags)`` waits for them and returns
    their ARIs in order; ``latest`` is the newest finished one (for a progress bar). With
    ``n_workers=0`` every submit scores at once in this process.

    Parameters
    ----------
    true_labels : array-like, shape (N,)
        Reference cell types.
    seed : int
        Louvain's random seed.
    n_workers : int
        Worker processes; 0 scores in the calling process.
    """

    def __init__(self, true_labels, seed=0, n_workers=0):
        self.true_labels = np.asarray(true_labels)
        self.seed = int(seed)
        self.n_workers = int(n_workers)
        self.latest = float("nan")
        self._done = {}
        self._pending = set()
        self._procs = []
        self._cache = PartitionCache()  # scoring in this process (n_workers=0)
        self._stats = []
        if self.n_workers > 0:
            # fork (Linux) starts a worker in milliseconds; spawn, elsewhere, re-imports the
            # main script. Create the scorer before training starts any torch thread pool.
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self._tasks = ctx.Queue()
            self._results = ctx.Queue()
            for _ in range(self.n_workers):
                proc = ctx.Process(
                    target=_worker,
                    args=(self._tasks, self._results, self.true_labels, self.seed),
                    daemon=True,
                )
                proc.start()
                self._procs.append(proc)

    def submit(self, tag, embed):
        """Queue the ARI of ``embed`` (N x K) under the hashable ``tag``."""
        embed = np.array(embed, copy=True)  # the caller keeps updating its array in place
        if self.n_workers == 0:
            self._store(tag, louvain_ari(embed, self.true_labels, seed=self.seed, cache=self._cache), None)
            return
        self._pending.add(tag)
        self._tasks.put((tag, embed))
        self.poll()

    def poll(self):
        """Take in whatever the workers have finished, without waiting."""
        while self._pending:
            try:
                self._store(*self._results.get_nowait())
            except queue.Empty:
                return

    def collect(self, tags):
        """Wait for the scorings of ``tags`` and return their ARIs, in order.

        Raises
        ------
        RuntimeError
            A worker failed on one of them, or died.
        """
        tags = list(tags)
        while any(t in self._pending for t in tags):
            try:
                self._store(*self._results.get(timeout=1.0))
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(
                        f"an ARI worker process died (exit code {dead[0].exitcode}); "
                        "rerun with --jobs 0 to score in the main process"
                    ) from None
        return np.array([self._done.pop(t) for t in tags])

    def _store(self, tag, ari, error):
        if tag == _STATS:
            self._stats.append(ari)
            return
        self._pending.discard(tag)
        if error is not None:
            raise RuntimeError(f"scoring {tag} failed in a worker: {error}")
        self._done[tag] = ari
        self.latest = ari

    def stats(self):
        """Counts summed over workers (after `close`): scored, Louvain runs."""
        parts = self._stats if self.n_workers else [self._cache.stats()]
        return {key: sum(p[key] for p in parts) for key in ("scored", "louvain_runs")}

    def close(self, wait=True):
        """Stop the workers; with ``wait``, let them report their counts first (5 s at most)."""
        if wait and self._procs:
            for _ in self._procs:
                self._tasks.put(None)
            deadline = time.monotonic() + 5.0
            while len(self._stats) < len(self._procs) and time.monotonic() < deadline:
                try:
                    self._store(*self._results.get(timeout=0.5))
                except queue.Empty:
                    pass
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=5)
        if self._procs:
            # Embeddings still buffered for the stopped workers must not hold up the exit: the
            # queue's feeder thread would block on the full pipe and the interpreter wait on it.
            self._tasks.cancel_join_thread()
        self._procs = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(wait=exc_type is None)  # on an error or Ctrl-C: stop at once


class NoScorer:
    """A scorer that scores nothing: for timing or testing the training alone.

    ``collect`` returns zeros; the perf tables it yields have no ARI.
    """

    latest = float("nan")

    def submit(self, tag, embed):
        pass

    def collect(self, tags):
        return np.zeros(len(list(tags)))


def available_cores():
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def split_cores(cores=None):
    """Default (scoring workers, training threads) for a machine with ``cores`` cores.

    Scoring (kNN + Louvain for every iteration) is about two thirds of the CPU work and
    single-threaded per embedding, so every core gets a worker, and training keeps a quarter
    of the cores (at least one thread). Idle workers block on their queue and cost nothing.
    """
    cores = available_cores() if cores is None else cores
    return cores, max(1, cores // 4)
