"""cellembed.evaluation.louvain against its oracle, the louvain package: identical partitions, numbering included."""

import warnings

import igraph as ig
import numpy as np
import pytest
import scipy.sparse as sp

import comp565_A4
from cellembed.evaluation import clustering
from cellembed.evaluation import louvain as ours
from cellembed.evaluation.scoring import NoScorer

with warnings.catch_warnings():  # the package warns about pkg_resources and leidenalg
    warnings.simplefilter("ignore")
    import louvain


def package_partition(pattern, seed, resolution=clustering.RESOLUTION):
    """What scanpy's sc.tl.louvain runs: one directed igraph edge per stored entry."""
    sources, targets = pattern.nonzero()
    graph = ig.Graph(n=pattern.shape[0], edges=list(zip(sources.tolist(), targets.tolist())), directed=True)
    part = louvain.find_partition(graph, louvain.RBConfigurationVertexPartition, seed=seed,
                                  resolution_parameter=resolution)
    return np.asarray(part.membership)


def assert_same(pattern, seeds, resolution=clustering.RESOLUTION, msg=""):
    pattern = sp.csr_matrix(pattern)
    pattern.sort_indices()
    for seed in seeds:
        ref = package_partition(pattern, seed, resolution)
        got = clustering.louvain_partition(pattern, resolution, seed)
        np.testing.assert_array_equal(got, ref, err_msg=f"{msg} seed={seed}")


def test_mt19937_matches_numpy():
    """igraph's MT19937 (seed 0 means 4357) is the reference generator, as numpy's is."""
    for seed, igraph_seed in [(0, 4357), (1, 1), (123456789, 123456789)]:
        bitgen = np.random.MT19937()
        bitgen._legacy_seeding(igraph_seed)
        expected = bitgen.random_raw(1500)  # crosses a block regeneration (624 words)
        mt = ours._mt_seed(np.uint64(seed))
        got = np.array([ours._mt_next(mt) for _ in range(1500)], dtype=np.uint64)
        np.testing.assert_array_equal(got, expected)


def test_bounded_draws_follow_lemire():
    """igraph_rng_get_integer: l + (x * range) >> 32, redrawn while the low word < 2^32 mod range."""
    mt, ref = ours._mt_seed(np.uint64(7)), ours._mt_seed(np.uint64(7))
    for high in [1, 2, 3, 10, 1000, 2**31 + 5]:
        r = high + 1
        t = (2**32 - r) % r
        while True:
            m = int(ours._mt_next(ref)) * r
            if m % 2**32 >= t:
                break
        assert ours._random_int(mt, 0, high) == m >> 32
    assert ours._random_int(mt, 5, 5) == 5  # no draw


def real_embeddings(real_adata):
    """Eleven real-data embeddings: NMF H along training, ETM theta, PCA, noise, truth-like."""
    import torch
    from sklearn.decomposition import PCA

    from etm import ETM

    X = real_adata.X.toarray().astype(float)
    logn = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    rng = np.random.default_rng(0)
    M, N = real_adata.n_vars, real_adata.n_obs
    embeds = {}
    W, H = rng.random((M, 16)), rng.random((16, N))
    for it in (3, 7, 15):
        W, H, _ = comp565_A4.nmf_psn(real_adata.X.T, W, H, real_adata, niter=it, scorer=NoScorer())
        embeds[f"nmf_H_{it}"] = H.T.copy()
    torch.manual_seed(0)
    model = ETM(16, M, 256, 256, "relu")
    counts, normalized = comp565_A4.normalized_counts(real_adata)
    for it in (5, 30):
        for _ in range(it):
            comp565_A4.train_scETM_helper(model, counts, normalized)
        embeds[f"etm_theta_{it}"] = comp565_A4.get_theta(model, normalized).numpy()
    embeds["pca16_lognorm"] = PCA(16, random_state=0).fit_transform(logn)
    embeds["pca8_raw"] = PCA(8, random_state=0).fit_transform(X)
    embeds["noise_uniform"] = rng.random((N, 16))
    embeds["noise_gauss_f32"] = rng.normal(size=(N, 16)).astype(np.float32)
    codes = real_adata.obs["Celltype"].cat.codes.to_numpy()
    embeds["truth_jitter"] = np.eye(codes.max() + 1)[codes] + 0.05 * rng.random((N, codes.max() + 1))
    embeds["truth_rounded"] = np.round(embeds["truth_jitter"], 1)  # many exact ties
    return embeds


def test_real_data_partitions_equal_the_package(real_adata):
    for name, embed in real_embeddings(real_adata).items():
        assert_same(clustering.knn_graph_pattern(embed), seeds=range(5), msg=name)


def _random_points(rng):
    n = int(rng.choice([rng.integers(10, 120), rng.integers(120, 400), rng.integers(400, 3001)],
                       p=[0.8, 0.17, 0.03]))
    kind = rng.integers(4)
    dim = int(rng.integers(2, 17))
    if kind == 0:  # blobs
        centres = rng.normal(size=(int(rng.integers(2, 8)), dim)) * 3
        X = centres[rng.integers(len(centres), size=n)] + rng.normal(size=(n, dim)) * rng.uniform(0.2, 1.5)
    elif kind == 1:  # uniform
        X = rng.random((n, dim))
    elif kind == 2:  # duplicate points
        base = rng.normal(size=(max(2, n // 3), dim))
        X = base[rng.integers(len(base), size=n)]
    else:  # a coarse grid: exact distance ties
        X = rng.integers(0, 4, size=(n, dim)).astype(float)
    return X


def test_random_knn_graphs_equal_the_package():
    """220 kNN graphs (k 5-40, n 10-3000; blobs, uniform, duplicates, ties), 3 seeds each."""
    rng = np.random.default_rng(565)
    for trial in range(220):
        X = _random_points(rng)
        k = int(rng.integers(5, 41))
        resolution = clustering.RESOLUTION if trial % 4 else float(rng.choice([0.05, 0.5, 1.0, 2.0]))
        seeds = rng.integers(0, 2**31 - 1, size=3)
        assert_same(clustering.knn_graph_pattern(X, k), seeds, resolution,
                    msg=f"trial {trial} n={len(X)} k={k}")


def test_random_directed_graphs_with_self_loops_equal_the_package():
    """Not symmetric, self loops, isolated nodes: the general (in- != out-list) path."""
    rng = np.random.default_rng(13)
    for trial in range(40):
        n = int(rng.integers(2, 200))
        A = sp.random(n, n, density=float(rng.uniform(0.005, 0.2)), random_state=rng, format="csr")
        A.data[:] = 1
        if trial % 2:
            A = A + sp.identity(n, format="csr")
        A.sum_duplicates()
        assert_same(A, seeds=rng.integers(0, 1000, size=3), msg=f"trial {trial} n={n}")


@pytest.mark.parametrize("name, pattern", [
    ("one node", sp.csr_matrix((1, 1))),
    ("two nodes, no edge", sp.csr_matrix((2, 2))),
    ("seven nodes, no edge", sp.csr_matrix((7, 7))),
    ("one self loop", sp.csr_matrix(np.array([[1.0]]))),
    ("one edge", sp.csr_matrix(np.array([[0, 1], [0, 0]]))),
    ("one undirected edge", sp.csr_matrix(np.array([[0, 1], [1, 0]]))),
    ("two components", sp.block_diag([np.ones((5, 5)) - np.eye(5), np.ones((4, 4)) - np.eye(4)]).tocsr()),
    ("star", sp.csr_matrix(np.r_[[np.r_[0, np.ones(9)]], np.c_[np.ones(9), np.zeros((9, 9))]])),
    ("path", sp.diags([np.ones(29), np.ones(29)], [-1, 1]).tocsr()),
    ("clique plus isolated", sp.block_diag([np.ones((6, 6)) - np.eye(6), np.zeros((3, 3))]).tocsr()),
])
def test_tiny_and_degenerate_graphs_equal_the_package(name, pattern):
    pattern = sp.csr_matrix(pattern)
    pattern.eliminate_zeros()
    assert_same(pattern, seeds=[0, 1, 42, 2**31 - 1], msg=name)


def test_louvain_labels_equal_the_package_path():
    X, _ = np.random.default_rng(3).normal(size=(300, 8)), None
    pattern = clustering.knn_graph_pattern(X)
    np.testing.assert_array_equal(clustering.louvain_labels(X, seed=4), package_partition(pattern, 4))


def test_unsorted_pattern_is_refused():
    pattern = sp.csr_matrix((np.ones(2), np.array([1, 0]), np.array([0, 2, 2])), shape=(2, 2))
    with pytest.raises(ValueError, match="sorted column indices"):
        clustering.louvain_partition(pattern)


def test_seed_outside_a_c_int_is_refused():
    with pytest.raises(OverflowError, match="C int"):
        ours.find_partition(np.zeros(2, int), np.zeros(0, int), 1, 0.15, 2**31)
