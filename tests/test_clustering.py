"""evaluate_ari: the fast path against scanpy's neighbors + louvain (the assignment's code)."""

import warnings

import anndata
import numpy as np
import pytest
import scanpy as sc

import comp565_A4
from cellembed.evaluation import clustering
from cellembed.evaluation.scoring import NoScorer


def scanpy_labels(embed, seed=0):
    """The assignment's evaluate_ari, verbatim, returning the Louvain labels."""
    adata = anndata.AnnData(X=np.zeros((embed.shape[0], 1), dtype=np.float32))
    adata.obsm["cell_embed"] = embed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(adata, use_rep="cell_embed", n_neighbors=30)
        sc.tl.louvain(adata, resolution=0.15, random_state=seed)
    return adata.obs["louvain"].to_numpy().astype(int), adata.obsp["connectivities"]


def blobs(n_per=50, n_types=4, dim=8, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_types), n_per)
    return rng.normal(size=(n_types, dim))[labels] * 3 + spread * rng.normal(size=(labels.size, dim)), labels


def test_one_hot_embedding_of_the_truth_scores_one(small_adata):
    codes = small_adata.obs["Celltype"].cat.codes.to_numpy()
    assert comp565_A4.evaluate_ari(np.eye(codes.max() + 1)[codes], small_adata) == pytest.approx(1.0)


def test_noise_scores_about_zero(small_adata):
    noise = np.random.default_rng(0).random((small_adata.n_obs, 16))
    assert abs(comp565_A4.evaluate_ari(noise, small_adata)) < 0.05


def test_evaluate_ari_stores_the_embedding(small_adata):
    embed = np.random.default_rng(1).random((small_adata.n_obs, 5))
    comp565_A4.evaluate_ari(embed, small_adata)
    np.testing.assert_array_equal(small_adata.obsm["cell_embed"], embed)


@pytest.mark.parametrize("seed", [0, 7])
def test_synthetic_partitions_equal_scanpy(seed):
    embed, _ = blobs(seed=seed)
    ref, _ = scanpy_labels(embed, seed=seed)
    ours = clustering.louvain_labels(embed, seed=seed)
    np.testing.assert_array_equal(ours, ref)


def test_zero_weight_edges_match_umap():
    """Small tight groups (one-hot + tiny jitter, fewer than 30 cells) whose neighbour lists
    reach into other groups: umap's weights for those far neighbours underflow to exactly 0."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), [60, 60, 10, 8, 6])
    embed = np.eye(5)[labels] + 1e-3 * rng.random((labels.size, 5))
    zero = clustering._umap_zero_edges(clustering.knn(embed)[1])
    assert zero.sum() > 0, "the case should exercise umap's underflow"
    ref_labels, connectivities = scanpy_labels(embed)
    pattern = clustering.knn_graph_pattern(embed)
    assert (pattern != (connectivities > 0)).nnz == 0
    np.testing.assert_array_equal(clustering.louvain_labels(embed), ref_labels)


def test_duplicates_take_scanpys_exact_path():
    """Identical cells tie; the KD-tree fast path must hand over to scanpy's own search."""
    embed, _ = blobs(n_per=40)
    embed = np.repeat(embed[::4], 4, axis=0)  # every cell four times
    ref, connectivities = scanpy_labels(embed)
    assert (clustering.knn_graph_pattern(embed) != (connectivities > 0)).nnz == 0
    np.testing.assert_array_equal(clustering.louvain_labels(embed), ref)


@pytest.mark.parametrize("brute_max", [10_000, 0])  # all-pairs kernel, then the KD-tree
def test_knn_sets_equal_scikit_learns_brute_force(brute_max, monkeypatch):
    from sklearn.neighbors import NearestNeighbors

    monkeypatch.setattr(clustering, "_BRUTE_MAX_CELLS", brute_max)
    rng = np.random.default_rng(2)
    for n, dim, k in [(40, 3, 30), (300, 16, 30), (1000, 16, 15), (25, 2, 5), (3, 4, 30), (1, 5, 30)]:
        X = rng.normal(size=(n, dim))
        idx, dist = clustering.knn(X, k)
        q = idx.shape[1]
        ref_d, ref_i = NearestNeighbors(n_neighbors=q, algorithm="brute").fit(X).kneighbors(X)
        np.testing.assert_array_equal(np.sort(idx, 1), np.sort(ref_i, 1))
        np.testing.assert_allclose(dist, ref_d, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(dist, np.sort(dist, 1))


def test_non_finite_embedding_is_refused():
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        clustering.louvain_labels(np.array([[0.0, np.nan]] * 40))


def test_real_data_partitions_equal_scanpy(real_adata):
    """Five real-data embeddings: NMF H, ETM theta, noise and two PCA variants."""
    import torch
    from sklearn.decomposition import PCA

    from etm import ETM

    X = real_adata.X.toarray().astype(float)
    logn = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    rng = np.random.default_rng(0)
    M, N = real_adata.n_vars, real_adata.n_obs
    _, H, _ = comp565_A4.nmf_psn(real_adata.X.T, rng.random((M, 16)), rng.random((16, N)), real_adata, niter=15,
                         scorer=NoScorer())
    torch.manual_seed(0)
    model = ETM(16, M, 256, 256, "relu")
    counts, normalized = comp565_A4.normalized_counts(real_adata)
    for _ in range(30):
        comp565_A4.train_scETM_helper(model, counts, normalized)
    theta = comp565_A4.get_theta(model, normalized).numpy()
    embeds = {
        "nmf_H": H.T,
        "etm_theta": theta,
        "noise": rng.random((N, 16)),
        "pca16_lognorm": PCA(16, random_state=0).fit_transform(logn),
        "pca8_raw": PCA(8, random_state=0).fit_transform(X),
    }
    truth = real_adata.obs["Celltype"].to_numpy()
    for name, embed in embeds.items():
        ref, _ = scanpy_labels(embed, seed=0)
        ours = clustering.louvain_labels(embed, seed=0)
        np.testing.assert_array_equal(ours, ref, err_msg=name)
        assert comp565_A4.evaluate_ari(embed, real_adata) == pytest.approx(
            clustering.adjusted_rand_score(truth, ref)), name
