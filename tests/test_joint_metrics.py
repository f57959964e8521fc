"""The competition's joint-embedding metrics (cellembed/evaluation/joint_metrics.py) against scib's own values."""


import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellembed.data.markers import cell_cycle_genes
from cellembed.evaluation.joint_metrics import JOINT_METRICS, SIX, graph_connectivity, joint_scores, left_out

# scib 1.1.7's values on `constructed_case()` (throwaway venv with scib==1.1.7 beside this
# project's packages): neighbors(use_rep='X_emb'); opt_louvain + nmi; silhouette; silhouette_batch;
# graph_connectivity; cell_cycle(pre, post, 'batch', 'X_emb', organism='human'), pre.X =
# cellembed.preprocessing.log_normalize(X); trajectory_conservation(pre, post, 'cell_type', key, 'batch').
SCIB_1_1_7 = {
    "nmi": 0.6921885082946957,
    "asw_label": 0.6123947128653526,
    "asw_batch": 0.8388919830322266,
    "graph_conn": 1.0,
    "cc_cons": 0.578545454497255,
    "ti_cons_batch_RNA": 0.8645160627676017,
    "ti_cons_batch_ADT_ATAC": 0.7691707677541718,
}


def constructed_case(seed=0):
    """120 cells of 3 overlapping types in 2 batches, a cell cycle in markers, two pseudotimes."""
    rng = np.random.default_rng(seed)
    n_types, per = 3, 40
    labels = np.repeat(np.arange(n_types), per)
    batch = np.tile([0, 1], n_types * per // 2)
    centers = rng.normal(0, 1.2, (n_types, 6))
    cycle = rng.uniform(0, 1, labels.size)
    embed = centers[labels] + rng.normal(0, 1, (labels.size, 6)) + 0.8 * batch[:, None]
    embed[:, 0] += 3 * cycle
    table = cell_cycle_genes()
    markers = list(table[table.phase == "S"].gene_name[:8]) + list(table[table.phase == "G2M"].gene_name[:8])
    genes = markers + [f"g{j}" for j in range(64)]
    rates = rng.gamma(1.0, 1.0, (n_types, len(genes)))
    X = rng.poisson(rates[labels] * (1 + 4 * np.outer(cycle, np.r_[np.ones(8), np.zeros(72)]))
                    + 3 * np.outer(1 - cycle, np.r_[np.zeros(8), np.ones(8), np.zeros(64)]))
    X[X.sum(1) == 0, 20] = 1
    adata = anndata.AnnData(sp.csr_matrix(X.astype(np.float32)), var=pd.DataFrame(index=genes))
    adata.obs_names = [f"c{i}" for i in range(labels.size)]
    adata.obs["Celltype"] = pd.Categorical([f"t{t}" for t in labels])
    adata.obs["batch"] = pd.Categorical([f"b{b}" for b in batch])
    pt = labels + cycle  # a trajectory through the types
    adata.obs["pseudotime_order_GEX"] = np.where(rng.uniform(size=labels.size) < 0.6, pt, np.nan)
    adata.obs["pseudotime_order_ADT"] = np.where(rng.uniform(size=labels.size) < 0.6,
                                                 pt + rng.normal(0, 0.3, labels.size), np.nan)
    return adata, embed


@pytest.fixture(scope="module")
def case():
    return constructed_case()


@pytest.fixture(scope="module")
def scores(case):
    adata, embed = case
    return joint_scores(embed, adata, seed=0)


def test_every_metric_equals_scibs_own_value(scores):
    for name, value in SCIB_1_1_7.items():
        assert scores[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert scores["ti_cons_batch_mean"] == pytest.approx(
        (SCIB_1_1_7["ti_cons_batch_RNA"] + SCIB_1_1_7["ti_cons_batch_ADT_ATAC"]) / 2, rel=1e-5)
    assert scores["n_metrics"] == 6 and set(SIX) == set(JOINT_METRICS)
    assert scores["mean_score"] == pytest.approx(np.mean([scores[k] for k in SIX]))


def test_graph_connectivity_by_hand():
    # type a: cells 0-1-2 connected, 3 alone -> 3/4; type b: 4-5 connected -> 1; mean 7/8
    edges = [(0, 1), (1, 2), (4, 5), (2, 4)]  # 2-4 crosses types: ignored inside each type
    C = sp.lil_matrix((6, 6))
    for i, j in edges:
        C[i, j] = C[j, i] = 1.0
    labels = np.array(list("aaaabb"))
    assert graph_connectivity(C.tocsr(), labels) == pytest.approx(0.875)


def test_what_the_data_do_not_allow_is_left_out_never_nan(case):
    adata, embed = case
    bare = anndata.AnnData(adata.X.copy(), var=pd.DataFrame(index=[f"x{j}" for j in range(adata.n_vars)]))
    bare.obs["Celltype"] = adata.obs["Celltype"].to_numpy()
    assert set(left_out(bare)) == {"asw_batch", "cc_cons", "ti_cons_batch_mean"}
    scores = joint_scores(embed, bare, seed=0)
    assert set(scores) == {"nmi", "asw_label", "graph_conn", "mean_score", "n_metrics"}
    assert scores["n_metrics"] == 3 and all(np.isfinite(v) for v in scores.values())
    no_batch = adata.copy()
    del no_batch.obs["batch"]
    scores = joint_scores(embed, no_batch, seed=0)
    assert "asw_batch" not in scores and {"cc_cons", "ti_cons_batch_mean"} <= set(scores)
    assert left_out(no_batch) == {"asw_batch": "no batch column with 2+ batches"}


def test_a_better_embedding_scores_higher(case):
    adata, embed = case
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 1, embed.shape)
    assert joint_scores(embed, adata)["asw_label"] > joint_scores(noise, adata)["asw_label"]
