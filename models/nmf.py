"""The assignment's NMFs as registry models (``nmf_sse``, ``nmf_psn``): adapters around Q1 and Q3.

The multiplicative updates are written once, in `comp565_A4.nmf_sse` and `comp565_A4.nmf_psn`
(where a student reads them); these classes only turn an AnnData into the genes x cells matrix
those functions take and return ``H.T`` as the embedding. The start is the assignment's
(`comp565_A4.init_factors`, uniform from ``default_rng(seed)``), so a seed gives the same
factors here as in ``python comp565_A4.py --seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from a4.scoring import NoScorer
from models.base import Model


@dataclass
class NMFConfig:
    k: int = 16  # the assignment's rank
    niter: int = 100  # the assignment's Q1 / Q3 iterations (Q5 runs NMF-Poisson for 1000: niter=1000)


class _NMF(Model):
    Config = NMFConfig
    quick = {"niter": 5}
    objective = ""  # the perf table's objective column, set by the subclasses

    def _update(self, X, W, H, adata, niter):
        raise NotImplementedError

    def fit(self, adata, seed=0):
        import comp565_A4 as course

        X = adata.X.T.tocsr().astype(np.float64)  # genes x cells, as the assignment writes X
        W, H = course.init_factors(adata.n_vars, adata.n_obs, seed, k=self.config.k)
        self.W, self.H, perf = self._update(X, W, H, adata, self.config.niter)
        self.history = [{"iteration": int(i), self.objective: float(v)} for i, v, _ in perf]
        self._cells = adata.obs_names.copy()
        return self

    def get_latent(self, adata):
        """``H.T``, (N, k): the cells' loadings on the k factors."""
        assert self._cells.equals(adata.obs_names), "NMF embeds the cells it was fit on; fit it on these cells"
        return self.H.T


class NMFSSE(_NMF):
    """NMF minimizing the squared error (the assignment's Q1)."""

    objective = "mse"

    def _update(self, X, W, H, adata, niter):
        import comp565_A4 as course

        return course.nmf_sse(X, W, H, adata, niter, scorer=NoScorer())


class NMFPoisson(_NMF):
    """NMF maximizing the Poisson log-likelihood (the assignment's Q3)."""

    objective = "poisson_loglik"

    def _update(self, X, W, H, adata, niter):
        import comp565_A4 as course

        return course.nmf_psn(X, W, H, adata, niter, scorer=NoScorer())
