"""The leaderboard's graph at scale: pynndescent above the threshold, today's exact path below it.

The approximate path runs here on a few thousand cells by passing ``approx_above=0``.
pynndescent compiles on its first call in a process (tens of seconds, once per session).
"""

import anndata
import numba
import numpy as np
import pytest
import scanpy as sc
from sklearn.metrics import adjusted_rand_score

from cellembed.data import LABEL_KEY, load_dataset
from cellembed.evaluation import metrics
from cellembed.evaluation.clustering import knn, knn_graph_pattern, louvain_labels
from cellembed.evaluation.graph import (APPROX_ABOVE, _cache_compilations, _self_first, approximate_knn, connectivities,
                                        neighbours)

# recall measured on the 4,271 real 10x PBMC cells' 16 PCs: 0.99990-0.99995 (seeds 0-2), i.e. about one
# edge in 10,000 missed; the bound allows 50 times that
RECALL_BOUND = 0.995


def planted(n_per=500, n_types=6, dim=16, seed=0):
    """Well separated Gaussian clusters: (embed (n_per * n_types, dim), labels)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_types), n_per)
    return rng.normal(size=(n_types, dim))[labels] * 4 + rng.normal(size=(labels.size, dim)), labels


@pytest.fixture(scope="module")
def pbmc_pcs(data_root):
    """16 principal components of the real 10x PBMC 4k cells (log-normalized), and their labels."""
    adata = load_dataset("10x_pbmc", data_root=data_root)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return sc.pp.pca(adata.X.toarray(), n_comps=16, random_state=0), adata.obs[LABEL_KEY].to_numpy()


def recall(approx, exact):
    """Share of the exact kNN's edges (self left out) present in the approximate kNN."""
    cells = np.arange(len(exact))[:, None]
    found = np.array([np.isin(e, a) for a, e in zip(approx, exact)]) & (exact != cells)
    return found.sum() / (exact != cells).sum()


def test_approximate_knn_finds_most_exact_neighbours_of_real_cells(pbmc_pcs):
    embed, _ = pbmc_pcs
    exact, exact_d = knn(embed, 30)
    approx, approx_d = approximate_knn(embed, 30, seed=0)
    assert approx.shape == exact.shape == (len(embed), 30)
    assert (approx[:, 0] == np.arange(len(embed))).all() and (approx_d[:, 0] == 0).all()
    assert (np.diff(approx_d[:, 1:], axis=1) >= 0).all()
    got = recall(approx, exact)
    assert RECALL_BOUND < got <= 1.0, got
    # where a neighbour is found, its distance is the exact one (float32)
    rows, cols = np.nonzero(approx[:, 1:, None] == exact[:, None, :])[:2]
    found = approx[rows, cols + 1]
    true = np.sqrt(((embed[rows] - embed[found]) ** 2).sum(axis=1))
    np.testing.assert_allclose(approx_d[rows, cols + 1], true, rtol=1e-4, atol=1e-4)


def test_approximate_knn_depends_on_the_seed_only_not_on_the_threads(pbmc_pcs):
    embed = pbmc_pcs[0][:2000]
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = approximate_knn(embed, 30, seed=3)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = approximate_knn(embed, 30, seed=3)
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS  # pynndescent gives them back
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[1], many[1])
    other = approximate_knn(embed, 30, seed=4)[0]
    assert 0 < (other != one[0]).sum() < 0.03 * other.size  # another seed: another search (0.3% of entries moved)


def test_every_jitted_function_of_the_search_is_cached_on_disk():
    from numba.core.caching import NullCache
    from pynndescent import kernels, pynndescent_, utils

    _cache_compilations()
    _cache_compilations()  # idempotent
    jitted = [f for m in (pynndescent_, utils, kernels) for f in vars(m).values()
              if isinstance(f, numba.core.registry.CPUDispatcher)]
    assert len(jitted) > 20 and pynndescent_.nn_descent in jitted
    assert not [f.__name__ for f in jitted if isinstance(f._cache, NullCache)]


def test_approximate_louvain_and_leiden_recover_planted_clusters():
    embed, labels = planted()
    for cluster in metrics.GRAPH_CLUSTERINGS:
        got = metrics.graph_labels(embed, seed=0, cluster=cluster, resolution=0.15 if cluster == "louvain" else 0.3,
                                   approx_above=0)
        assert adjusted_rand_score(labels, got) > 0.95, cluster


def test_real_cells_score_about_the_same_on_either_graph(pbmc_pcs):
    embed, labels = pbmc_pcs
    exact = metrics.clustering_scores(embed, labels, seed=0)
    approx = metrics.clustering_scores(embed, labels, seed=0, approx_above=0)
    assert approx["ari_kmeans"] == exact["ari_kmeans"]  # k-means does not use the graph
    # measured: ARI 0.6298 exact vs 0.6303 approximate; the two partitions agree at ARI 0.992
    assert abs(approx["ari_louvain"] - exact["ari_louvain"]) < 0.02, (exact, approx)
    assert adjusted_rand_score(metrics.graph_labels(embed, approx_above=0), metrics.graph_labels(embed)) > 0.97


def test_below_the_threshold_scores_are_todays_exact_ones():
    embed, labels = planted(n_per=60, n_types=3, dim=6, seed=1)
    embed = embed + np.random.default_rng(2).normal(size=embed.shape) * 3  # overlapping, so seeds matter
    n = len(embed)
    assert n <= APPROX_ABOVE
    for seed in (0, 3):
        expected = louvain_labels(embed, seed=seed)
        np.testing.assert_array_equal(metrics.graph_labels(embed, seed=seed), expected)
        # n cells are not above n
        np.testing.assert_array_equal(metrics.graph_labels(embed, seed=seed, approx_above=n), expected)
    batch = np.arange(n) % 2
    indices, _ = knn(embed, 11)
    others = indices != np.arange(n)[:, None]
    expected = (((batch[indices] != batch[:, None]) & others).sum(1) / others.sum(1)).mean()
    assert metrics.knn_mixing(embed, batch, n_neighbors=10) == expected
    np.testing.assert_array_equal(neighbours(embed, 30, approx_above=n)[0], knn(embed, 30)[0])


def test_given_the_exact_knn_the_approximate_path_is_scanpys(monkeypatch):
    """The steps after the kNN are scanpy's: fed the exact kNN, they give scanpy's partitions."""
    embed, _ = planted(n_per=100, n_types=4, dim=8, seed=3)
    embed = embed + np.random.default_rng(4).normal(size=embed.shape) * 3
    indices, distances = knn(embed, 15)
    conn = connectivities(indices, distances)
    one = anndata.AnnData(obsm={"X": embed.astype(np.float32)})
    sc.pp.neighbors(one, n_neighbors=15, use_rep="X")
    np.testing.assert_allclose(conn.toarray(), one.obsp["connectivities"].toarray(), rtol=1e-5, atol=1e-6)
    pattern = knn_graph_pattern(embed, 15)
    conn.sort_indices()
    np.testing.assert_array_equal(conn.indptr, pattern.indptr)
    np.testing.assert_array_equal(conn.indices, pattern.indices)

    monkeypatch.setattr(metrics, "approximate_knn", lambda e, k, seed: knn(np.asarray(e, dtype=np.float64), k))
    for cluster in metrics.GRAPH_CLUSTERINGS:
        for seed in (0, 1):
            forced = metrics.graph_labels(embed, seed, cluster, n_neighbors=15, resolution=0.5, approx_above=0)
            today = metrics.graph_labels(embed, seed, cluster, n_neighbors=15, resolution=0.5)
            np.testing.assert_array_equal(forced, today)


def test_approximate_knn_mixing_sees_separate_and_mixed_batches():
    rng = np.random.default_rng(0)
    embed = rng.normal(size=(600, 4))
    batch = np.repeat([0, 1], 300)
    assert 0.4 < metrics.knn_mixing(embed, batch, n_neighbors=10, approx_above=0) < 0.6
    embed[batch == 1] += 100.0
    assert metrics.knn_mixing(embed, batch, n_neighbors=10, approx_above=0) == 0.0


def test_self_first_moves_or_adds_the_cell_itself():
    indices = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 3, 4]])  # cell 1 behind a duplicate; cell 2 missed
    distances = np.array([[0, 1, 2, 3], [0, 0, 2, 3], [1, 2, 3, 4]], dtype=np.float32)
    got_i, got_d = _self_first(indices, distances, 3)
    np.testing.assert_array_equal(got_i, [[0, 1, 2], [1, 0, 2], [2, 0, 1]])
    np.testing.assert_array_equal(got_d, [[0, 1, 2], [0, 0, 2], [0, 1, 2]])


def test_the_approximate_knn_refuses_what_it_cannot_search():
    with pytest.raises(ValueError, match="n_neighbors < cells"):
        approximate_knn(np.zeros((10, 2)), 30)
    bad = np.random.default_rng(0).normal(size=(100, 3))
    bad[5, 1] = np.nan
    with pytest.raises(FloatingPointError, match="NaN"):
        approximate_knn(bad, 10)
