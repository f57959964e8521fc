"""A straightforward reference solution, as a typical submission writes it: the speed baseline.

Dense numpy NMF (the squared error through the trace of cells x cells products, the Poisson
denominators as ``ones(M, N)`` products), the assignment's scanpy ``evaluate_ari``, and the
course's ETM step (dense likelihood, ``nn.Dropout``, plain Adam). Used only by the benchmark;
the results match the project's functions (tests/test_nmf.py checks the same updates).
"""

from __future__ import annotations

import warnings

import anndata
import numpy as np
import scanpy as sc
import torch
from sklearn.metrics import adjusted_rand_score
from torch import nn

import comp565_A4


def evaluate_ari(cell_embed, adata):
    """The assignment's metric, verbatim: scanpy neighbors + louvain on the AnnData."""
    adata.obsm["cell_embed"] = cell_embed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(adata, use_rep="cell_embed", n_neighbors=30)
        sc.tl.louvain(adata, resolution=0.15)
    return adjusted_rand_score(adata.obs["Celltype"], adata.obs["louvain"])


def nmf_sse_step(X, W, H):
    """One MU iteration and the MSE via the trace of N x N products. X: (M, N) dense."""
    N, M = X.shape[1], X.shape[0]
    H = H * (W.T @ X) / (W.T @ W @ H)
    W = W * (X @ H.T) / (W @ H @ H.T)
    WH = W @ H
    mse = np.trace(X.T @ X - X.T @ WH - WH.T @ X + WH.T @ WH) / (N * M)
    return W, H, mse


def nmf_sse_step_residual(X, W, H):
    """One MU iteration and the MSE from the dense M x N residual."""
    H = H * (W.T @ X) / (W.T @ W @ H)
    W = W * (X @ H.T) / (W @ H @ H.T)
    return W, H, np.mean((X - W @ H) ** 2)


def nmf_psn_step(X, W, H):
    """One Poisson MU iteration with ones(M, N) denominators and the dense objective."""
    ones = np.ones(X.shape)
    H = H * (W.T @ (X / (W @ H))) / (W.T @ ones)
    W = W * ((X / (W @ H)) @ H.T) / (ones @ H.T)
    WH = W @ H
    return W, H, np.mean(X * np.log(WH) - WH)


def course_etm(n_genes, seed=0):
    """The course's ETM: our module with nn.Dropout, and the assignment's plain (unfused) Adam.

    Returns
    -------
    model : etm.ETM
    optimizer : torch.optim.Adam
    """
    torch.manual_seed(seed)
    model = comp565_A4.build_etm(n_genes)
    model.t_drop = nn.Dropout(0.5)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1.2e-6)


def etm_step(model, optimizer, X_dense, X_normalized):
    """One full-batch step and theta, with the dense likelihood log(theta @ beta + 1e-6)."""
    nelbo = comp565_A4.train_scETM_helper(model, X_dense, X_normalized, optimizer)
    return nelbo, comp565_A4.get_theta(model, X_normalized)


def anndata_for(adata):
    """A fresh AnnData with only the labels (what the reference's evaluate_ari writes into)."""
    ref = anndata.AnnData(X=np.zeros((adata.n_obs, 1), dtype=np.float32))
    ref.obs["Celltype"] = adata.obs["Celltype"].to_numpy()
    return ref
