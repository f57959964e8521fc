"""The assignment's NMFs as registry models (``nmf_sse``, ``nmf_psn``): adapters around Q1 and Q3.

The multiplicative updates are written once, in `comp565_A4.nmf_sse` and `comp565_A4.nmf_psn`
(where a student reads them); these classes only turn an AnnData into the genes x cells matrix
those functions take and return ``H.T`` as the embedding. The start is the assignment's
(`comp565_A4.init_factors`, uniform from ``default_rng(seed)``), so a seed gives the same
factors here as in ``python comp565_A4.py --seed``.

New cells are embedded with the gene loadings ``W_`` fixed: their factors solve the same
objective by scikit-learn's multiplicative updates (`sklearn.decomposition.non_negative_factorization`
with ``update_H=False``; the squared error, or the Kullback-Leibler divergence, whose minimizer is
the Poisson likelihood's). The cells the model was fit on keep their fitted factors ``H_``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellembed.evaluation.scoring import NoScorer
from cellembed.models.base import Model


@dataclass
class NMFConfig:
    k: int = 16  # the assignment's rank
    niter: int = 100  # the assignment's Q1 / Q3 iterations (Q5 runs NMF-Poisson for 1000: niter=1000)


class _NMF(Model):
    """Fitted attributes: ``W_`` (M genes, k) loadings, ``H_`` (k, N) factors of the fit cells."""

    Config = NMFConfig
    uses_torch = False
    quick = {"niter": 5}
    objective = ""  # the perf table's objective column, set by the subclasses
    beta_loss = ""  # scikit-learn's name of the objective, for new cells

    def _update(self, X, W, H, data, niter):
        raise NotImplementedError

    def _fit(self, data, seed):
        import comp565_A4 as course

        X = data.X.T.tocsr().astype(np.float64)  # genes x cells, as the assignment writes X
        W, H = course.init_factors(data.n_vars, data.n_obs, seed, k=self.config.k)
        self.W_, self.H_, perf = self._update(X, W, H, data, self.config.niter)
        self.history = [{"iteration": int(i), self.objective: float(v)} for i, v, _ in perf]

    def _get_latent(self, data):
        """The cells' factors, (N, k): ``H_.T`` for the fit cells, else solved with ``W_`` fixed."""
        if self._is_fit_data(data):
            return self.H_.T
        from sklearn.decomposition import non_negative_factorization

        factors, _, _ = non_negative_factorization(
            data.X.astype(np.float64), H=np.ascontiguousarray(self.W_.T), n_components=self.config.k,
            update_H=False, solver="mu", beta_loss=self.beta_loss, max_iter=max(self.config.niter, 200),
            tol=0)  # a fixed number of steps: each cell's solve is then independent of the others
        return factors  # (N, k)


class NMFSSE(_NMF):
    """NMF minimizing the squared error (the assignment's Q1)."""

    objective = "mse"
    beta_loss = "frobenius"

    def _update(self, X, W, H, data, niter):
        import comp565_A4 as course

        return course.nmf_sse(X, W, H, data, niter, scorer=NoScorer())


class NMFPoisson(_NMF):
    """NMF maximizing the Poisson log-likelihood (the assignment's Q3)."""

    objective = "poisson_loglik"
    beta_loss = "kullback-leibler"

    def _update(self, X, W, H, data, niter):
        import comp565_A4 as course

        return course.nmf_psn(X, W, H, data, niter, scorer=NoScorer())
