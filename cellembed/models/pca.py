"""PCA of log-normalized counts (scanpy's standard pipeline), registry name ``pca``: the baseline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellembed.models.base import Model
from cellembed.preprocessing import log_normalize


@dataclass
class PCAConfig:
    n_comps: int = 16  # the assignment's K, so PCA sits beside the K = 16 topic models
    target_sum: float = 1e4  # scanpy's normalize_total convention


class PCA(Model):
    """``n_comps`` principal components of ``log1p(target_sum * x / total)``.

    Fit as ``sc.pp.normalize_total(target_sum=1e4); sc.pp.log1p; sc.pp.pca(n_comps,
    random_state=seed)`` (scanpy's ARPACK solver, so the seed fixes the signs). Any cells, the
    fit ones included, are embedded by the loadings: ``(log-normalized x - mean_) @ loadings_``,
    scanpy's ``X_pca`` to float rounding.

    Fitted attributes: ``mean_`` (M,), ``loadings_`` (M, n_comps), float32.
    """

    Config = PCAConfig
    uses_torch = False

    def _fit(self, data, seed):
        import anndata
        import scanpy as sc

        cfg = self.config
        lognorm = anndata.AnnData(X=log_normalize(data.X, cfg.target_sum))  # (N, M) float32
        sc.pp.pca(lognorm, n_comps=cfg.n_comps, random_state=seed)
        self.mean_ = lognorm.X.mean(axis=0, dtype=np.float64).astype(np.float32)  # (M,)
        self.loadings_ = np.ascontiguousarray(lognorm.varm["PCs"], dtype=np.float32)  # (M, n_comps)
        self.history = [{"explained_variance_ratio": float(np.sum(lognorm.uns["pca"]["variance_ratio"]))}]

    def _get_latent(self, data):
        """The cells' principal components, (N, n_comps)."""
        return (log_normalize(data.X, self.config.target_sum) - self.mean_) @ self.loadings_
