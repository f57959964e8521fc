"""cellembed.evaluation.metrics: batch mixing, k-means and Louvain scores, against direct computations and
scikit-learn."""

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from cellembed.evaluation import metrics as rt
from cellembed.evaluation.clustering import louvain_labels


def two_blobs(n=40, separated=True, seed=0):
    """Two batches of n cells in 2-d, either far apart or drawn from one cloud."""
    rng = np.random.default_rng(seed)
    embed = rng.normal(size=(2 * n, 2))
    batch = np.repeat([0, 1], n)
    if separated:
        embed[batch == 1] += 100.0
    return embed, batch


def test_knn_mixing_is_zero_for_separate_batches_and_near_half_when_mixed():
    embed, batch = two_blobs()
    assert rt.knn_mixing(embed, batch, n_neighbors=10) == 0.0
    mixed, batch = two_blobs(n=200, separated=False)
    assert 0.4 < rt.knn_mixing(mixed, batch, n_neighbors=10) < 0.6


def test_ideal_mixing_is_each_cells_share_of_other_batch_cells_within_its_type():
    labels = np.array(["a", "a", "a", "b", "b"])
    batch = np.array([0, 0, 1, 0, 0])
    # a: cells of batch 0 have 1 of 2 others from batch 1, the batch-1 cell 2 of 2; b: none
    expected = (0.5 + 0.5 + 1.0 + 0 + 0) / 5
    assert rt.ideal_knn_mixing(labels, batch) == expected


def test_asw_batch_is_one_when_mixed_and_near_zero_when_separated():
    embed, batch = two_blobs()
    labels = np.zeros(len(batch))
    assert rt.asw_batch(embed, batch, labels) < 0.05
    mixed, batch = two_blobs(n=200, separated=False)
    assert rt.asw_batch(mixed, batch, np.zeros(len(batch))) > 0.9
    # a cell type found in one batch only is skipped, as in scib
    labels = np.array(["t"] * 400, dtype=object)
    labels[:50] = "solo"  # all in batch 0
    assert rt.asw_batch(mixed, batch, labels) > 0.9
    # a type with one cell per batch has no silhouette by batch: skipped, not an error
    three = np.array([0, 1, 2] * 100)
    labels = np.array(["t"] * 297 + ["tiny"] * 3, dtype=object)
    assert np.isfinite(rt.asw_batch(np.random.default_rng(1).normal(size=(300, 2)), three, labels))


def test_clustering_scores_equal_scikit_learn_and_the_louvain_partition():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 60)
    embed = rng.normal(size=(3, 6))[labels] * 4 + rng.normal(size=(180, 6))
    noisy = labels.copy()
    noisy[:20] = 2  # some disagreement, so the scores are not all 1
    got = rt.clustering_scores(embed, noisy, seed=3)
    km = KMeans(n_clusters=3, n_init=20, random_state=3).fit_predict(embed)
    lv = louvain_labels(embed, seed=3)
    assert got["ari_kmeans"] == pytest.approx(adjusted_rand_score(noisy, km))
    assert got["nmi_kmeans"] == pytest.approx(normalized_mutual_info_score(noisy, km))
    assert got["ari_louvain"] == pytest.approx(adjusted_rand_score(noisy, lv))
    assert got["n_louvain"] == np.unique(lv).size
    assert 0.5 < got["ari_kmeans"] < 1.0
    assert rt.own_scores(labels, labels) == {"ari_own": 1.0, "nmi_own": 1.0}
    # NaN: no type has 2 batches
    assert rt.asw_batch(embed, np.zeros(180), labels) != rt.asw_batch(embed, np.zeros(180), labels)
