"""The assignment's NMFs as registry models (``nmf_sse``, ``nmf_psn``): adapters around Q1 and Q3.

Two solvers (``NMFConfig.solver``):

- ``"mu"``: the assignment's full-batch multiplicative updates, written once in
  `comp565_A4.nmf_sse` and `comp565_A4.nmf_psn` (where a student reads them); these classes only
  turn an AnnData into the genes x cells matrix those functions take and return ``H.T`` as the
  embedding. The start is the assignment's (`comp565_A4.init_factors`, uniform from
  ``default_rng(seed)``), so a seed gives the same factors here as in ``python comp565_A4.py --seed``.
- ``"minibatch"``: scikit-learn's `sklearn.decomposition.MiniBatchNMF` (Lefevre, Bach & Fevotte 2011:
  multiplicative updates of the loadings from one batch of cells at a time, past batches
  down-weighted by ``forget_factor``) with the same objective (``beta_loss`` "frobenius", or
  "kullback-leibler", whose minimizer is the Poisson likelihood's), fit on the cells x genes CSR
  counts as they are (float32, no copy), from scikit-learn's NNDSVDa start. Its work per step and its
  temporaries grow with a batch of ``batch_size`` cells, and its passes over the data follow the data
  size (`cellembed.data.minibatch.scaled_epochs` of ``niter``), so the number of steps stays bounded.
  Nothing N x M is formed; what grows with the data is the start (a randomized SVD, N x (k + 10)),
  the factors (N, k) and scikit-learn's reconstruction error at the end, evaluated at every stored
  entry (at its peak about 4.6 times the memory of the CSR counts).
  Zeros of the counts never enter a division: scikit-learn evaluates WH (and X / WH) only at the
  stored entries, floored at its EPSILON, so sparse counts give no NaN.
- ``"auto"`` (the default): ``"mu"`` up to `cellembed.data.minibatch.EPOCHS_DECAY_CELLS` (20,000)
  cells, ``"minibatch"`` above.

Either way the fitted attributes are ``W_`` (M genes, k) loadings and ``H_`` (k, N) factors of the
fit cells. New cells are embedded with ``W_`` fixed: their factors solve the same objective by
scikit-learn's multiplicative updates (`sklearn.decomposition.non_negative_factorization` with
``update_H=False``). The cells the model was fit on keep their fitted factors ``H_``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from cellembed.evaluation.scoring import NoScorer
from cellembed.data.minibatch import check_solver
from cellembed.models.base import Model

SOLVERS = ("auto", "mu", "minibatch")


@dataclass
class NMFConfig:
    k: int = 16  # the assignment's rank
    niter: int = 100  # the assignment's Q1 / Q3 iterations (Q5 runs NMF-Poisson for 1000: niter=1000)
    # "mu": the assignment's full-batch updates; "minibatch": scikit-learn's MiniBatchNMF (passes over
    # the data: scaled_epochs(niter, N)); "auto": "mu" up to EPOCHS_DECAY_CELLS (20,000) cells, then "minibatch"
    solver: str = "auto"
    # Cells per MiniBatchNMF step. scikit-learn's default is 1024; 4096 measured on 30,000 PBMC cells
    # x 2,000 genes (KL, k = 16, 20 passes): 2.0 s per pass against 2.2 s, and with 1024 scikit-learn's
    # no-improvement stop (10 steps without a lower smoothed batch cost) ended the fit after 13 passes.
    batch_size: int = 4096

    def __post_init__(self):
        check_solver(self, SOLVERS, "nmf: ")


def resolve_solver(solver, n_cells):
    """``solver`` with ``"auto"`` resolved: ``"mu"`` up to ``EPOCHS_DECAY_CELLS`` cells, ``"minibatch"`` above."""
    from cellembed.data import minibatch  # (imports torch: only when asked)

    if solver != "auto":
        return solver
    return "mu" if n_cells <= minibatch.EPOCHS_DECAY_CELLS else "minibatch"


def stored_nonzeros(X):
    """CSR ``X`` without explicit zeros or duplicate entries (a copy only where it has them).

    scikit-learn's sparse beta-divergence updates pair ``X.data`` with WH at ``X.nonzero()``, which
    leaves out stored zeros: a stored zero is a shape error there.
    """
    if X.has_canonical_format and X.data.all():
        return X
    X = X.copy()
    X.sum_duplicates()
    X.eliminate_zeros()
    return X


class _NMF(Model):
    """Fitted attributes: ``W_`` (M genes, k) loadings, ``H_`` (k, N) factors of the fit cells."""

    Config = NMFConfig
    uses_torch = False
    quick = {"niter": 5}
    objective = ""  # the perf table's objective column, set by the subclasses
    beta_loss = ""  # scikit-learn's name of the objective (new cells, the minibatch solver)

    def _update(self, X, W, H, data, niter):
        raise NotImplementedError

    def _fit(self, data, seed):
        if resolve_solver(self.config.solver, data.n_obs) == "minibatch":
            self._fit_minibatch(data, seed)
            return
        import comp565_A4 as course

        X = data.X.T.tocsr().astype(np.float64)  # genes x cells, as the assignment writes X
        W, H = course.init_factors(data.n_vars, data.n_obs, seed, k=self.config.k)
        self.W_, self.H_, perf = self._update(X, W, H, data, self.config.niter)
        self.history = [{"iteration": int(i), self.objective: float(v)} for i, v, _ in perf]

    def _fit_minibatch(self, data, seed):
        """scikit-learn's MiniBatchNMF on the (N, M) float32 CSR counts; nothing N x M is formed."""
        from sklearn.decomposition import MiniBatchNMF
        from sklearn.exceptions import ConvergenceWarning

        from cellembed.data import minibatch

        epochs = minibatch.scaled_epochs(self.config.niter, data.n_obs)
        nmf = MiniBatchNMF(n_components=self.config.k, init="nndsvda", beta_loss=self.beta_loss,
                           batch_size=self.config.batch_size, max_iter=epochs, random_state=seed)
        with warnings.catch_warnings():  # the pass budget is ours (scaled_epochs), not a failure to converge
            warnings.simplefilter("ignore", ConvergenceWarning)
            factors = nmf.fit_transform(stored_nonzeros(data.X))  # (N, k)
        self.W_ = nmf.components_.T.astype(np.float64)  # (M, k)
        self.H_ = factors.T.astype(np.float64)  # (k, N)
        # scikit-learn's numbers: passes and steps run (its tol / no-improvement rules may stop it
        # early), and its reconstruction error (Frobenius norm, or sqrt(2 * KL divergence)) at the end
        self.history = [{"epochs": int(nmf.n_iter_), "steps": int(nmf.n_steps_),
                         "reconstruction_err": float(nmf.reconstruction_err_)}]

    def _get_latent(self, data):
        """The cells' factors, (N, k): ``H_.T`` for the fit cells, else solved with ``W_`` fixed."""
        if self._is_fit_data(data):
            return self.H_.T
        from sklearn.decomposition import non_negative_factorization

        factors, _, _ = non_negative_factorization(
            stored_nonzeros(data.X).astype(np.float64), H=np.ascontiguousarray(self.W_.T),
            n_components=self.config.k, update_H=False, solver="mu", beta_loss=self.beta_loss,
            max_iter=max(self.config.niter, 200),
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
