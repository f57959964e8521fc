"""The leaderboard's scoring of one embedding at 10k-200k cells: exact vs approximate graph.

    python bench/scoring.py [--sizes 10000 50000 100000 200000] [--exact-max 100000]

The embedding is what a model hands the leaderboard: 16 dimensions, here the principal
components (fitted on the real 10x PBMC 4k cells, ``10x_pbmc``) of those cells resampled to N
with binomial thinning (`bench.scaling.resample`), log-normalized. Scoring is the Louvain graph
clustering (kNN, then Louvain on the pattern of its UMAP connectivities), k-means with k = the
number of cell types, and their ARI and NMI, as `cellembed.evaluation.metrics.clustering_scores`
computes them; ``exact`` is the assignment's path (exact kNN), ``approx`` pynndescent's kNN
(`cellembed.evaluation.graph.approximate_knn`). The numba compilation both paths pay once per
process is timed apart, on (up to) 3,000 cells, before the table.

Columns: seconds per stage and in all; ``peak MB``: the largest rise of the process's resident
memory over its level before that scoring (sampled every 5 ms); ``recall``: the share of the
exact kNN's edges (the cell itself left out) that the approximate kNN holds (where both ran);
``ARI``: the Louvain ARI. The closing lines fit the growth exponent of each path's kNN and
total times over the sizes (time ~ N^b; N log N is about b = 1.1 over this range). On a shared
machine k-means' OpenMP threads wait for each other: its time there is well above its
single-thread time.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score  # noqa: E402

from bench.scaling import resample  # noqa: E402
from cellembed.cli import quiet_known_warnings  # noqa: E402
from cellembed.data import LABEL_KEY, load_dataset  # noqa: E402
from cellembed.evaluation import N_NEIGHBORS, RESOLUTION  # noqa: E402
from cellembed.evaluation.clustering import knn_pattern, louvain_partition  # noqa: E402
from cellembed.evaluation.graph import APPROX_ABOVE, neighbours  # noqa: E402
from cellembed.evaluation.metrics import kmeans_labels  # noqa: E402

N_COMPONENTS = 16
PATHS = {"exact": np.inf, "approx": 0}  # approx_above for each path


def log_normalized(counts):
    """log1p of counts per 10,000, (N, M) CSR float64."""
    counts = sp.csr_matrix(counts, dtype=np.float64)
    scaled = sp.diags(1e4 / np.asarray(counts.sum(axis=1)).ravel()) @ counts
    scaled.data = np.log1p(scaled.data)
    return scaled


def embeddings(data_root, sizes, seed=0):
    """``{N: (embed (N, 16), labels (N,))}``: resampled real cells on the real cells' 16 PCs."""
    base = load_dataset("10x_pbmc", data_root=data_root)
    pca = PCA(N_COMPONENTS, svd_solver="randomized", random_state=seed).fit(log_normalized(base.X).toarray())
    mean, loadings = pca.mean_, pca.components_.T  # (M,), (M, 16)
    out = {}
    for n in sizes:
        cells = resample(base, n, seed=seed)
        out[n] = (np.asarray(log_normalized(cells.X) @ loadings) - mean @ loadings,
                  cells.obs[LABEL_KEY].to_numpy())
    return out


def rss_mb():
    """The process's resident memory now, MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status: this benchmark reads memory the Linux way")


class PeakRSS:
    """Largest rise of resident memory while the ``with`` block runs (a thread samples every 5 ms)."""

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        self.rise = self.peak - self.start


def score(embed, labels, approx_above, seed=0):
    """One embedding's scoring, stage by stage: (seconds per stage, kNN indices, Louvain ARI)."""
    seconds = {}
    t0 = time.perf_counter()
    indices, distances = neighbours(embed, N_NEIGHBORS, seed, approx_above)
    t1 = time.perf_counter()
    graph = louvain_partition(knn_pattern(indices, distances), RESOLUTION, seed)
    t2 = time.perf_counter()
    kmeans = kmeans_labels(embed, np.unique(labels).size, seed=seed)
    t3 = time.perf_counter()
    ari = adjusted_rand_score(labels, graph)
    normalized_mutual_info_score(labels, graph)
    adjusted_rand_score(labels, kmeans)
    normalized_mutual_info_score(labels, kmeans)
    t4 = time.perf_counter()
    seconds.update(knn=t1 - t0, louvain=t2 - t1, kmeans=t3 - t2, ari_nmi=t4 - t3, total=t4 - t0)
    return seconds, indices, ari


def recall(approx, exact):
    """Share of the exact kNN's edges (the cell itself left out) that the approximate kNN holds.

    Parameters
    ----------
    approx, exact : ndarray of int, shape (N, k)
        Neighbour ids per cell, the cell itself among them.

    Returns
    -------
    float
    """
    cells = np.arange(len(exact))[:, None]
    found = (approx[:, :, None] == exact[:, None, :]).any(axis=1) & (exact != cells)  # (N, k)
    return found.sum() / (exact != cells).sum()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("A4_DATA_ROOT", str(ROOT.parent / "shared/data")))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 100000, 200000])
    parser.add_argument("--exact-max", type=int, default=100000, help="largest size the exact path runs at")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    args = parser.parse_args(argv)
    quiet_known_warnings("scoring.py")
    data = embeddings(args.data_root, sorted(set(args.sizes)))
    warm, warm_labels = (part[:3000] for part in data[min(data)])
    print(f"\nScoring one {N_COMPONENTS}-d embedding (APPROX_ABOVE = {APPROX_ABOVE:,} cells; "
          f"{os.cpu_count()} CPUs)")
    for path in args.paths:  # numba compiles on the first call in a process
        t0 = time.perf_counter()
        score(warm, warm_labels, PATHS[path])
        print(f"{path}: first call on {len(warm):,} cells (numba compilation) {time.perf_counter() - t0:.1f} s")
    cols = ("cells", "path", "kNN s", "Louvain s", "k-means s", "ARI/NMI s", "total s", "peak MB", "recall", "ARI")
    print("\n| " + " | ".join(cols) + " |\n|" + "---:|" * len(cols))
    totals = {path: {} for path in args.paths}
    for n in sorted(args.sizes):
        embed, labels = data[n]
        exact_indices = None
        for path in sorted(args.paths, key=lambda p: p != "exact"):
            if path == "exact" and n > args.exact_max:
                continue
            with PeakRSS() as memory:
                seconds, indices, ari = score(embed, labels, PATHS[path])
            totals[path][n] = seconds
            if path == "exact":
                exact_indices = indices
            shown = f"{recall(indices, exact_indices):.4f}" if path == "approx" and exact_indices is not None else "-"
            print(f"| {n} | {path} | " + " | ".join(f"{seconds[s]:.1f}" for s in
                                                      ("knn", "louvain", "kmeans", "ari_nmi", "total"))
                  + f" | {memory.rise:.0f} | {shown} | {ari:.3f} |", flush=True)
    for path, by_size in totals.items():
        if len(by_size) > 1:
            sizes = np.array(sorted(by_size))
            slopes = {stage: np.polyfit(np.log(sizes), np.log([by_size[n][stage] for n in sizes]), 1)[0]
                      for stage in ("knn", "total")}
            print(f"{path}: kNN time ~ N^{slopes['knn']:.2f}, total ~ N^{slopes['total']:.2f} over "
                  f"{sizes.min():,}-{sizes.max():,} cells")
    return totals


if __name__ == "__main__":
    main()
