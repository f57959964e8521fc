"""PCA of log-normalized counts (scanpy's standard pipeline), registry name ``pca``: the baseline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse.linalg
from scipy.linalg import blas

from cellembed.data.backed import BackedCounts, counts, row_chunks
from cellembed.data.checks import DataError
from cellembed.models.base import Model
from cellembed.preprocessing import CHUNK, log_normalize_sparse

# The most genes of a PCA streamed from disk: its M x M float64 covariance (512 MiB at 8,192 genes)
# and the eigendecomposition of it are the memory and time that do not shrink with the chunks.
MAX_STREAMED_GENES = 8192


@dataclass
class PCAConfig:
    n_comps: int = 16  # the assignment's K, so PCA sits beside the K = 16 topic models
    target_sum: float = 1e4  # scanpy's normalize_total convention


class PCA(Model):
    """``n_comps`` principal components of ``log1p(target_sum * x / total)``.

    In memory, fit as ``sc.pp.normalize_total(target_sum=1e4); sc.pp.log1p; sc.pp.pca(n_comps,
    random_state=seed)`` on the sparse matrix (scanpy's ARPACK solver with implicit centring:
    no dense N x M array; the seed fixes the signs). From a backed AnnData (``backed="r"``), the
    same components from the gene covariance, accumulated over row chunks read from disk in
    float64 and eigendecomposed (exact PCA: the in-memory components to float rounding, up to
    each component's sign; at most `MAX_STREAMED_GENES` genes). Any cells, the fit ones
    included, are embedded by the loadings, a row chunk at a time: ``(log-normalized x - mean_)
    @ loadings_``, scanpy's ``X_pca`` to float rounding.

    Fitted attributes: ``mean_`` (M,), ``loadings_`` (M, n_comps), float32.
    """

    Config = PCAConfig
    uses_torch = False
    streams_backed = True

    def _fit(self, data, seed):
        X = counts(data)
        if isinstance(X, BackedCounts):
            self._fit_streamed(X, seed)
            return
        import anndata
        import scanpy as sc

        cfg = self.config
        lognorm = anndata.AnnData(X=log_normalize_sparse(X, cfg.target_sum))  # (N, M) CSR float32
        sc.pp.pca(lognorm, n_comps=cfg.n_comps, random_state=seed)
        self.mean_ = np.asarray(lognorm.X.mean(axis=0, dtype=np.float64)).ravel().astype(np.float32)  # (M,)
        self.loadings_ = np.ascontiguousarray(lognorm.varm["PCs"], dtype=np.float32)  # (M, n_comps)
        self.history = [{"explained_variance_ratio": float(np.sum(lognorm.uns["pca"]["variance_ratio"]))}]

    def _fit_streamed(self, X, seed):
        """The components of the covariance of the log-normalized rows of ``X`` (`BackedCounts`, N x M)."""
        n, m = X.shape
        if m > MAX_STREAMED_GENES:
            raise DataError(f"adata: backed, with {m} genes; a PCA streamed from disk takes at most "
                            f"{MAX_STREAMED_GENES} (its M x M covariance): subset the file to the most variable "
                            "genes, or load it into memory (adata.to_memory())")
        if self.config.n_comps >= m:
            raise DataError(f"adata: {m} genes for n_comps={self.config.n_comps}; pass n_comps < the genes")
        # memory: the M x M float64 covariance (30.5 MiB at 2,000 genes), updated in place by BLAS, and
        # one chunk of CHUNK rows (8 MiB of float64)
        cov, sums = np.zeros((m, m), order="F"), np.zeros(m)
        for _, block in X.chunks(max(1, CHUNK // m)):
            rows = log_normalize_sparse(block, self.config.target_sum).toarray().astype(np.float64)  # (b, M)
            cov = blas.dsyrk(1.0, rows.T, beta=1.0, c=cov, overwrite_c=1)  # upper triangle of += rows.T @ rows
            sums += rows.sum(axis=0)
        mean = sums / n
        cov = blas.dsyr(-float(n), mean, a=cov, overwrite_a=1)  # upper triangle of -= n mean mean^T
        for j in range(m - 1):  # the lower triangle from the upper, a column at a time
            cov[j + 1:, j] = cov[j, j + 1:]
        cov /= max(n - 1, 1)  # n = 1 has no variance (the loaders need 2 cells)
        # the top n_comps eigenpairs by ARPACK (a full eigh of 2,000 genes is 10x slower), started, as
        # scanpy's, from a uniform vector of the seed; tol=0: to machine precision
        start = np.random.default_rng(seed).uniform(-1, 1, m)
        values, vectors = scipy.sparse.linalg.eigsh(cov, k=self.config.n_comps, which="LA", v0=start, tol=0)
        top = np.argsort(values)[::-1]
        values, loadings = values[top], vectors[:, top]  # (n_comps,), (M, n_comps)
        # scikit-learn's svd_flip(u_based_decision=False): each component's largest entry positive
        loadings *= np.sign(loadings[np.abs(loadings).argmax(axis=0), np.arange(loadings.shape[1])])
        self.mean_ = mean.astype(np.float32)
        self.loadings_ = np.ascontiguousarray(loadings, dtype=np.float32)
        total = max(float(np.trace(cov)), np.finfo(float).tiny)  # 0 only for identical cells
        self.history = [{"explained_variance_ratio": float(values.sum() / total)}]

    def _get_latent(self, data):
        """The cells' principal components, (N, n_comps), a row chunk at a time (memory or disk)."""
        X = counts(data)
        out = np.empty((X.shape[0], self.loadings_.shape[1]), dtype=np.float32)
        for start, block in row_chunks(X):
            rows = log_normalize_sparse(block, self.config.target_sum).toarray()  # (b, M) float32
            out[start:start + rows.shape[0]] = (rows - self.mean_) @ self.loadings_
        return out
