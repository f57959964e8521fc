"""The NeurIPS 2021 multimodal competition's joint-embedding metrics (scib's definitions).

The competition (openproblems-bio/neurips2021_multimodal_viash, ``src/joint_embedding/metrics``)
scored an embedding by the mean of six scib metrics, each in [0, 1], higher better:

- ``nmi``: NMI (arithmetic) of the cell types and the Louvain clusters of the embedding's
  15-neighbour graph (`scanpy.pp.neighbors`) at the best of the resolutions 0.1, 0.2, ..., 2.0
  (``scib.cl.opt_louvain``);
- ``asw_label``: ``(silhouette(embedding, cell type) + 1) / 2`` (``scib.me.silhouette``);
- ``asw_batch``: per cell type, the mean of ``1 - |silhouette by batch|``, then the mean over the
  types (``scib.me.silhouette_batch``, here `cellembed.evaluation.metrics.asw_batch`);
- ``graph_conn``: per cell type, the share of its cells in the largest connected component of its
  cells' neighbour graph, mean over types (``scib.me.graph_connectivity``);
- ``cc_cons``: cell-cycle conservation (``scib.me.cell_cycle``): per batch, S and G2M scores of
  the log-normalized RNA, the variance they explain in the top 50 principal components (principal
  component regression) of the RNA and of the embedding, ``1 - |after - before| / before``
  (0 when negative), mean over batches;
- ``ti_cons_batch_mean``: trajectory conservation (``scib.me.trajectory_conservation`` with the
  batch): diffusion pseudotime on the embedding's graph from a root cell of the earliest cell type,
  per batch Spearman correlation with the given pseudotime, ``(mean + 1) / 2``; the mean of the
  RNA pseudotime's (``pseudotime_order_GEX``) and the second modality's (``..._ADT`` / ``..._ATAC``).

``mean_score`` is the mean of those of the six that were computed. The functions follow scib 1.1.7
step by step (tests/test_joint_metrics.py compares them with scib's own values on constructed
data); scib itself is not a dependency (it would pin igraph 1.0, which the ``louvain`` package
refuses). `JOINT_METRICS` says which metric needs what; `joint_scores` leaves out the ones the data
do not allow and `left_out` says why.
"""

from __future__ import annotations

import warnings

import anndata
import numpy as np
import pandas as pd
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import normalized_mutual_info_score, silhouette_score

from cellembed.data.checks import BATCH_KEY, LABEL_KEY
from cellembed.data.markers import markers_present
from cellembed.evaluation.metrics import asw_batch
from cellembed.preprocessing import dense, log_normalize

RESOLUTIONS = [2 * x / 20 for x in range(1, 21)]  # scib.cl.opt_louvain: 0.1, 0.2, ..., 2.0
PCR_COMPONENTS = 50  # scib.me.cell_cycle: n_comps=50
DPT_DIM = 3  # scib's get_root: dpt_dim=3
PSEUDOTIME_RNA = "pseudotime_order_GEX"
PSEUDOTIME_MOD2 = ("pseudotime_order_ADT", "pseudotime_order_ATAC")
# A variance explained of 0 before integration would divide by zero in cc_cons: no cell-cycle
# signal to conserve, so the metric is left out (scib would return inf or NaN).
VAR_EPS = 1e-12

JOINT_METRICS = {
    "nmi": "always (cell types)",
    "asw_label": "always (cell types)",
    "asw_batch": "needs obs['batch'] with 2+ batches and a cell type seen in 2 batches",
    "graph_conn": "always (cell types)",
    "cc_cons": "needs RNA counts with gene symbols or Ensembl ids that include S and G2M markers "
               "(cellembed/data/cell_cycle_genes.csv); without a batch, all cells are one batch",
    "ti_cons_batch_mean": "needs obs['pseudotime_order_GEX'] and/or the second modality's "
                          "obs['pseudotime_order_ADT' or 'pseudotime_order_ATAC'] (the competition's "
                          "solution files); the mean of those present",
}
SIX = tuple(JOINT_METRICS)


def _neighbors(embed, seed=0):
    """An AnnData of ``embed`` (N, d) in ``obsm['X_emb']`` with scanpy's default 15-neighbour graph."""
    import scanpy as sc

    post = anndata.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(embed.shape[0])]))
    post.obsm["X_emb"] = np.asarray(embed, dtype=np.float32)
    sc.pp.neighbors(post, use_rep="X_emb", random_state=seed)
    return post


def nmi_optimal_louvain(post, labels, seed=0):
    """scib's ``opt_louvain`` + ``nmi``: the best NMI over `RESOLUTIONS` (``post`` has its graph)."""
    import scanpy as sc

    best = 0.0
    for res in RESOLUTIONS:
        sc.tl.louvain(post, resolution=res, key_added="cluster", random_state=seed)
        best = max(best, float(normalized_mutual_info_score(post.obs["cluster"], labels,
                                                            average_method="arithmetic")))
    return best


def asw_label(embed, labels):
    """scib's ``silhouette`` (scaled): ``(silhouette_score + 1) / 2``."""
    return float((silhouette_score(embed, labels) + 1) / 2)


def graph_connectivity(connectivities, labels):
    """scib's ``graph_connectivity``: mean over types of their largest component's share of their cells."""
    labels = pd.Categorical(labels)
    shares = []
    for label in labels.categories:
        cells = np.flatnonzero(labels == label)
        _, comp = connected_components(connectivities[cells][:, cells], connection="strong")
        counts = np.bincount(comp)
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


def pc_regression(data, covariates, n_comps=PCR_COMPONENTS):
    """scib's ``pc_regression`` (numpy linear regression): sum over PCs of R^2(PC | covariates) x variance share.

    Parameters
    ----------
    data : ndarray, shape (N, M)
    covariates : ndarray, shape (N, C)

    Returns
    -------
    float
    """
    import scanpy as sc

    n_comps = min(n_comps, min(data.shape))
    solver = "full" if n_comps == min(data.shape) else "arpack"
    X_pca, _, _, pca_var = sc.tl.pca(np.asarray(data), n_comps=n_comps, return_info=True, svd_solver=solver,
                                     copy=True)
    X = np.hstack([np.ones((covariates.shape[0], 1)), covariates])  # with intercept
    beta = np.linalg.pinv(X.T @ X) @ X.T @ X_pca
    ss_res = ((X_pca - X @ beta) ** 2).sum(0)
    ss_tot = ((X_pca - X_pca.mean(0)) ** 2).sum(0)
    r2 = np.maximum(0, 1 - ss_res / ss_tot)
    return float((r2 * (pca_var / pca_var.sum())).sum())


def cell_cycle_conservation(expression, var_names, embed, batch):
    """scib's ``cell_cycle`` (``recompute_cc=True``): mean over batches of ``max(0, 1 - |after - before| / before)``.

    Parameters
    ----------
    expression : ndarray, shape (N, M)
        Log-normalized RNA (scib's ``adata_pre.X``).
    var_names : sequence of str, length M
    embed : ndarray, shape (N, d)
    batch : array-like, shape (N,)

    Returns
    -------
    float or None
        None: no S or no G2M marker among ``var_names``, or no batch with cell-cycle variance.
    """
    import scanpy as sc

    s_genes, g2m_genes = markers_present(var_names, "S"), markers_present(var_names, "G2M")
    if not s_genes or not g2m_genes:
        return None
    batch = np.asarray(batch)
    scores = []
    for b in pd.unique(batch):
        cells = batch == b
        raw = anndata.AnnData(expression[cells], var=pd.DataFrame(index=pd.Index(var_names).astype(str)))
        sc.tl.score_genes_cell_cycle(raw, s_genes=s_genes, g2m_genes=g2m_genes)
        cov = raw.obs[["S_score", "G2M_score"]].to_numpy(np.float64)
        before = pc_regression(raw.X, cov)
        after = pc_regression(embed[cells], cov)
        if before > VAR_EPS:
            scores.append(max(0.0, 1 - abs(after - before) / before))
    return float(np.mean(scores)) if scores else None


def _root(pre_obs, post_ti, pseudotime):
    """scib's ``get_root``: (root index in the largest component, that component's AnnData), or None."""
    import scanpy as sc

    _, comp = connected_components(post_ti.obsp["connectivities"], directed=False, return_labels=True)
    largest = comp == np.bincount(comp).argmax()
    means = pre_obs.groupby(LABEL_KEY, observed=False)[pseudotime].mean()
    start = means.idxmin()
    candidates = np.flatnonzero((pre_obs[LABEL_KEY].to_numpy() == start) & largest)
    if candidates.size == 0:  # scib's RootCellError
        return None
    sub = post_ti[largest].copy()
    local = np.searchsorted(np.flatnonzero(largest), candidates)  # positions inside the component
    sc.tl.diffmap(sub)
    votes = np.zeros(local.size)
    for dim in range(DPT_DIM):
        values = sub.obsm["X_diffmap"][local, dim]
        pick = np.argmin if values.mean() < sub.obsm["X_diffmap"][:, dim].mean() else np.argmax
        votes[pick(values)] += 1
    return int(local[np.argmax(votes)]), sub, largest


def trajectory_conservation(post, obs, pseudotime, batch_key=None):
    """scib's ``trajectory_conservation``: ``(Spearman(pseudotime, DPT on the embedding) + 1) / 2``.

    Parameters
    ----------
    post : AnnData
        The embedding with its neighbour graph (`_neighbors`), cells in ``obs``'s order.
    obs : DataFrame
        ``LABEL_KEY``, ``pseudotime`` (NaN where not computed) and ``batch_key`` columns.
    pseudotime : str
    batch_key : str, optional
        Correlate per batch and average (the competition's ``ti_cons_batch``).

    Returns
    -------
    float or None
        0 when no root cell lies in the largest component (scib's convention); None when every
        correlation is undefined (constant pseudotime).
    """
    import scanpy as sc

    keep = obs[pseudotime].notna().to_numpy()
    pre_obs = obs[keep]
    post_ti = post[keep].copy()
    found = _root(pre_obs, post_ti, pseudotime)
    if found is None:
        return 0.0
    iroot, sub, largest = found
    sub.uns["iroot"] = iroot
    sc.tl.dpt(sub)
    dpt = sub.obs["dpt_pseudotime"].to_numpy().copy()
    dpt[dpt > 1] = 0  # unreachable cells (inf) count as 0, as in scib
    after = np.zeros(keep.sum())
    after[largest] = dpt
    before = pre_obs[pseudotime].to_numpy(np.float64)
    groups = [np.ones(keep.sum(), bool)] if batch_key is None else \
        [pre_obs[batch_key].to_numpy() == b for b in pd.unique(pre_obs[batch_key])]
    corr = [pd.Series(before[g]).corr(pd.Series(after[g]), method="spearman") for g in groups]
    corr = [c for c in corr if np.isfinite(c)]
    return float((np.mean(corr) + 1) / 2) if corr else None


def left_out(adata):
    """The metrics `joint_scores` cannot compute on ``adata``: name -> why."""
    why = {}
    batch = adata.obs[BATCH_KEY] if BATCH_KEY in adata.obs else None
    if batch is None or batch.nunique() < 2:
        why["asw_batch"] = "no batch column with 2+ batches"
    if not _markers(adata):
        why["cc_cons"] = "no S or no G2M cell-cycle marker among the RNA's var_names"
    if not _pseudotimes(adata):
        why["ti_cons_batch_mean"] = f"no pseudotime column ({PSEUDOTIME_RNA}, {', '.join(PSEUDOTIME_MOD2)}) in obs"
    return why


def _markers(adata):
    return bool(markers_present(adata.var_names, "S")) and bool(markers_present(adata.var_names, "G2M"))


def _pseudotimes(adata):
    return [k for k in (PSEUDOTIME_RNA, *PSEUDOTIME_MOD2)
            if k in adata.obs and adata.obs[k].notna().sum() >= 3]


def joint_scores(embed, adata, seed=0):
    """The competition's joint-embedding metrics of ``embed`` that ``adata`` allows, and their mean.

    Parameters
    ----------
    embed : ndarray, shape (N, d)
    adata : AnnData
        What `cellembed.data.load_dataset` returns: raw RNA counts in ``X`` (gene names in ``var_names``),
        ``obs['Celltype']``, optional ``obs['batch']`` and pseudotime columns.
    seed : int
        The neighbour graph's and Louvain's random state (scib: 0).

    Returns
    -------
    dict
        Metric name -> float, for the metrics of `JOINT_METRICS` that could be computed (see
        `left_out`), ``ti_cons_batch_RNA`` / ``ti_cons_batch_ADT_ATAC`` (the two halves of
        ``ti_cons_batch_mean``), ``mean_score`` (mean of the six present) and ``n_metrics``.
        Never NaN.
    """
    embed = np.asarray(embed, dtype=np.float64)
    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    skip = left_out(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy's and anndata's notices on small graphs and views
        post = _neighbors(embed, seed)
        scores = {"nmi": nmi_optimal_louvain(post, labels, seed), "asw_label": asw_label(embed, labels)}
        if "asw_batch" not in skip:
            value = asw_batch(embed, adata.obs[BATCH_KEY].astype(str).to_numpy(), labels)
            if np.isfinite(value):
                scores["asw_batch"] = value
        scores["graph_conn"] = graph_connectivity(post.obsp["connectivities"].tocsr(), labels)
        batch = adata.obs[BATCH_KEY].astype(str).to_numpy() if BATCH_KEY in adata.obs else np.zeros(adata.n_obs)
        if "cc_cons" not in skip:
            value = cell_cycle_conservation(dense(log_normalize(adata.X)), adata.var_names, embed, batch)
            if value is not None:
                scores["cc_cons"] = value
        obs = pd.DataFrame({LABEL_KEY: pd.Categorical(labels), BATCH_KEY: batch}, index=post.obs_names)
        halves = {}
        for key in _pseudotimes(adata):
            obs[key] = adata.obs[key].to_numpy(np.float64)
            value = trajectory_conservation(post, obs, key, BATCH_KEY if BATCH_KEY in adata.obs else None)
            if value is not None:
                halves["ti_cons_batch_RNA" if key == PSEUDOTIME_RNA else "ti_cons_batch_ADT_ATAC"] = value
        if halves:
            scores.update(halves)
            scores["ti_cons_batch_mean"] = float(np.mean(list(halves.values())))
    present = [scores[k] for k in SIX if k in scores]
    scores["mean_score"] = float(np.mean(present))
    scores["n_metrics"] = len(present)
    assert all(np.isfinite(v) for v in scores.values()), f"a joint metric is not finite: {scores}"
    return scores
