"""PCA of log-normalized counts (scanpy's standard pipeline), registry name ``pca``: the baseline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from a4.preprocessing import log_normalize
from models.base import Model


@dataclass
class PCAConfig:
    n_comps: int = 16  # the assignment's K, so PCA sits beside the K = 16 topic models
    target_sum: float = 1e4  # scanpy's normalize_total convention


class PCA(Model):
    """``n_comps`` principal components of ``log1p(target_sum * x / total)``.

    As ``sc.pp.normalize_total(target_sum=1e4); sc.pp.log1p; sc.pp.pca(n_comps, random_state=seed)``
    (scanpy's ARPACK solver, so the seed fixes the signs).
    """

    Config = PCAConfig

    def fit(self, adata, seed=0):
        import anndata
        import scanpy as sc

        cfg = self.config
        lognorm = anndata.AnnData(X=log_normalize(adata.X, cfg.target_sum))
        sc.pp.pca(lognorm, n_comps=cfg.n_comps, random_state=seed)
        self._embedding = (adata.obs_names.copy(), lognorm.obsm["X_pca"])
        self.history = [{"explained_variance_ratio": float(np.sum(lognorm.uns["pca"]["variance_ratio"]))}]
        return self

    def get_latent(self, adata):
        """The principal components of the cells ``fit`` saw, (N, n_comps)."""
        names, embedding = self._embedding
        assert names.equals(adata.obs_names), "PCA embeds the cells it was fit on; fit it on these cells"
        return embedding
