"""The leaderboard's metrics, one implementation each (compare.py, the benches and tests use these).

- ``ari_louvain``: the assignment's metric (`cellembed.evaluation.clustering.louvain_ari`: 30 neighbours, Louvain
  at resolution 0.15, the seed as Louvain's seed), and ``nmi_louvain`` of the same partition; other
  sizes, resolutions and Leiden (``ari_leiden``) on request (`graph_labels`). Above
  `cellembed.evaluation.graph.APPROX_ABOVE` cells the graph is pynndescent's approximate kNN
  (`cellembed.evaluation.graph`); at or below it, the exact one.
- ``ari_kmeans`` / ``nmi_kmeans``: k-means on the embedding with k = the number of labelled
  classes (``n_init=20``, ``random_state=seed``), the graph-clustering literature's protocol; the
  same at every size (linear in the cells: 2.8 s for 100k cells x 16 dimensions on one core).
- ``ari_own``: the ARI of a model's own clusters.
- With a batch: ``knn_mixing`` (share of each cell's 30 neighbours from another batch; exact or
  approximate neighbours as the graph's) and ``asw_batch`` (scib's batch silhouette).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_samples

from cellembed.evaluation.clustering import N_NEIGHBORS, RESOLUTION, knn_pattern, louvain_labels, louvain_partition
from cellembed.evaluation.graph import APPROX_ABOVE, approximate_knn, connectivities, neighbours

KMEANS_N_INIT = 20  # scDeepCluster's and scGPCL's evaluation


def kmeans_labels(embed, n_clusters, seed=0):
    """k-means clusters of ``embed`` (N, d), ``n_init=20``, ``random_state=seed``; int (N,)."""
    return KMeans(n_clusters=n_clusters, n_init=KMEANS_N_INIT, random_state=seed).fit_predict(
        np.asarray(embed, dtype=np.float64))


GRAPH_CLUSTERINGS = ("louvain", "leiden")


def graph_labels(embed, seed=0, cluster="louvain", n_neighbors=N_NEIGHBORS, resolution=RESOLUTION,
                 approx_above=APPROX_ABOVE):
    """Graph clusters of ``embed`` (N, d), as scanpy's ``neighbors`` + ``louvain`` / ``leiden``.

    Up to ``approx_above`` cells:

    - ``louvain``: `cellembed.evaluation.clustering.louvain_labels` (scanpy's partition, exactly);
    - ``leiden``: ``sc.pp.neighbors(n_neighbors)`` and ``sc.tl.leiden(resolution, flavor="igraph",
      n_iterations=2)``, scanpy's own call (the flavour it is moving to).

    Above it the kNN is `cellembed.evaluation.graph.approximate_knn` (pynndescent, ``random_state=seed``),
    then the same steps on that graph: Louvain on the pattern of its UMAP connectivities
    (`cellembed.evaluation.clustering.knn_pattern`), or scanpy's igraph Leiden on the connectivities.

    Parameters
    ----------
    embed : array-like, shape (N, d)
    seed : int
        The clustering's seed (and the approximate kNN's).
    cluster : {"louvain", "leiden"}
    n_neighbors, resolution :
        kNN size (the cell itself included) and resolution.
    approx_above : int
        Cell count above which the kNN is approximate (default `APPROX_ABOVE`).

    Returns
    -------
    ndarray of int, shape (N,)
    """
    if cluster not in GRAPH_CLUSTERINGS:
        raise ValueError(f"unknown graph clustering {cluster!r}; use {' or '.join(GRAPH_CLUSTERINGS)}")
    approximate = len(embed) > approx_above
    if cluster == "louvain":
        if not approximate:
            return louvain_labels(embed, seed=seed, n_neighbors=n_neighbors, resolution=resolution)
        return louvain_partition(knn_pattern(*approximate_knn(embed, n_neighbors, seed)), resolution, seed)
    import anndata
    import scanpy as sc

    one = anndata.AnnData(obsm={"X_embed": np.asarray(embed, dtype=np.float32)})
    if approximate:
        adjacency = connectivities(*approximate_knn(one.obsm["X_embed"], n_neighbors, seed))
    else:
        sc.pp.neighbors(one, n_neighbors=n_neighbors, use_rep="X_embed")
        adjacency = None  # the neighbours' connectivities
    sc.tl.leiden(one, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False,
                 adjacency=adjacency)
    return one.obs["leiden"].cat.codes.to_numpy().astype(np.int64)


def clustering_scores(embed, labels, seed=0, cluster="louvain", n_neighbors=N_NEIGHBORS, resolution=RESOLUTION,
                      approx_above=APPROX_ABOVE):
    """ARI and NMI of the graph (Louvain or Leiden) and the k-means clusters of ``embed`` against ``labels``.

    Parameters
    ----------
    embed : ndarray, shape (N, d)
    labels : array-like, shape (N,)
    seed : int
        The graph clustering's seed and k-means' random state.
    cluster, n_neighbors, resolution, approx_above :
        The graph clustering (`graph_labels`); the defaults are the assignment's metric (exact
        up to `APPROX_ABOVE` cells).

    Returns
    -------
    dict
        ``ari_<cluster>``, ``nmi_<cluster>``, ``n_<cluster>`` (clusters found), ``ari_kmeans``,
        ``nmi_kmeans``.
    """
    labels = np.asarray(labels)
    graph = graph_labels(embed, seed, cluster, n_neighbors, resolution, approx_above)
    kmeans = kmeans_labels(embed, np.unique(labels).size, seed=seed)
    return {
        f"ari_{cluster}": float(adjusted_rand_score(labels, graph)),
        f"nmi_{cluster}": float(normalized_mutual_info_score(labels, graph)),
        f"n_{cluster}": int(np.unique(graph).size),
        "ari_kmeans": float(adjusted_rand_score(labels, kmeans)),
        "nmi_kmeans": float(normalized_mutual_info_score(labels, kmeans)),
    }


def own_scores(predicted, labels):
    """``ari_own`` and ``nmi_own``: a model's own clusters against ``labels``."""
    return {"ari_own": float(adjusted_rand_score(labels, predicted)),
            "nmi_own": float(normalized_mutual_info_score(labels, predicted))}


def knn_mixing(embed, batch, n_neighbors=N_NEIGHBORS, seed=0, approx_above=APPROX_ABOVE):
    """Mean over cells of the fraction of their nearest neighbours from another batch.

    Parameters
    ----------
    embed : ndarray, shape (N, d)
    batch : array-like, shape (N,)
    n_neighbors : int
        Neighbours per cell, the cell itself excluded.
    seed, approx_above :
        Above ``approx_above`` cells the neighbours are pynndescent's (``random_state=seed``),
        else exact (`cellembed.evaluation.graph.neighbours`).

    Returns
    -------
    float
        Higher is better mixed.
    """
    batch = np.asarray(batch)
    indices, _ = neighbours(embed, n_neighbors + 1, seed, approx_above)  # (N, n + 1), the cell itself among them
    others = indices != np.arange(len(batch))[:, None]
    other_batch = (batch[indices] != batch[:, None]) & others
    return float((other_batch.sum(1) / others.sum(1)).mean())


def ideal_knn_mixing(labels, batch):
    """`knn_mixing` of perfect mixing within cell types: each cell's other-batch share of its type."""
    frame = pd.DataFrame({"label": np.asarray(labels), "batch": np.asarray(batch)})
    size = frame.groupby("label")["batch"].transform("size").to_numpy()
    same = frame.groupby(["label", "batch"])["batch"].transform("size").to_numpy()
    # max(size - 1, 1): a type of one cell has no other cell to mix with (share 0, not 0/0)
    return float(((size - same) / np.maximum(size - 1, 1)).mean())


def asw_batch(embed, batch, labels):
    """scib's batch silhouette: mean over cell types of mean(1 - |silhouette by batch|).

    Cell types found in one batch only, or with no more cells than batches (the silhouette
    needs a cell to share its batch), are skipped, as in scib.

    Parameters
    ----------
    embed : ndarray, shape (N, d)
    batch, labels : array-like, shape (N,)

    Returns
    -------
    float
        1: the batches are indistinguishable inside every cell type; NaN when no type qualifies.
    """
    batch, labels = np.asarray(batch), np.asarray(labels)
    scores = []
    for label in np.unique(labels):
        cells = labels == label
        n_batches = np.unique(batch[cells]).size
        if n_batches < 2 or n_batches >= cells.sum():
            continue
        scores.append(np.mean(1 - np.abs(silhouette_samples(embed[cells], batch[cells]))))
    return float(np.mean(scores)) if scores else float("nan")


def batch_scores(embed, batch, labels, seed=0):
    """``knn_mixing`` (its approximate graph above `APPROX_ABOVE` cells drawn with ``seed``) and
    ``asw_batch`` of ``embed`` (N, d)."""
    return {"knn_mixing": knn_mixing(embed, batch, seed=seed), "asw_batch": asw_batch(embed, batch, labels)}
