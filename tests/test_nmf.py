"""NMF: the sparse multiplicative updates against a naive dense reference."""

import numpy as np
import pytest

import comp565_A4
from cellembed.evaluation.scoring import NoScorer  # skips the ARI: these tests are about the factorizations


def dense_sse_reference(X, W, H, niter):
    """The updates as a typical submission writes them: dense, full residual."""
    W, H = W.copy(), H.copy()
    mse = []
    for _ in range(niter):
        H = H * (W.T @ X) / (W.T @ W @ H + comp565_A4.EPS)
        W = W * (X @ H.T) / (W @ H @ H.T + comp565_A4.EPS)
        mse.append(((X - W @ H) ** 2).sum() / X.size)
    return W, H, np.array(mse)


def dense_psn_reference(X, W, H, niter):
    """Dense Poisson updates with ones(M, N) denominators and the full WH."""
    W, H = W.copy(), H.copy()
    ones = np.ones_like(X)
    loglik = []
    for _ in range(niter):
        H = H * (W.T @ (X / np.maximum(W @ H, comp565_A4.EPS))) / (W.T @ ones + comp565_A4.EPS)
        W = W * ((X / np.maximum(W @ H, comp565_A4.EPS)) @ H.T) / (ones @ H.T + comp565_A4.EPS)
        WH = np.maximum(W @ H, comp565_A4.EPS)
        loglik.append((X * np.log(WH) - W @ H).sum() / X.size)
    return W, H, np.array(loglik)


@pytest.fixture
def problem(small_adata):
    X = small_adata.X.T.toarray().astype(float)  # genes x cells
    rng = np.random.default_rng(1)
    M, N = X.shape
    return small_adata, X, rng.random((M, 4)), rng.random((4, N))


def test_sse_matches_dense_reference(problem):
    adata, X, W0, H0 = problem
    W, H, perf = comp565_A4.nmf_sse(X, W0, H0, adata, niter=20, scorer=NoScorer())
    W_ref, H_ref, mse_ref = dense_sse_reference(X, W0, H0, 20)
    np.testing.assert_allclose(W, W_ref, rtol=1e-8)
    np.testing.assert_allclose(H, H_ref, rtol=1e-8)
    np.testing.assert_allclose(perf[:, 1], mse_ref, rtol=1e-8)
    np.testing.assert_array_equal(perf[:, 0], np.arange(20))


def test_psn_matches_dense_reference(problem):
    adata, X, W0, H0 = problem
    W, H, perf = comp565_A4.nmf_psn(X, W0, H0, adata, niter=20, scorer=NoScorer())
    W_ref, H_ref, ll_ref = dense_psn_reference(X, W0, H0, 20)
    np.testing.assert_allclose(W, W_ref, rtol=1e-8)
    np.testing.assert_allclose(H, H_ref, rtol=1e-8)
    np.testing.assert_allclose(perf[:, 1], ll_ref, rtol=1e-8)


def test_objectives_are_monotone(problem):
    adata, X, W0, H0 = problem
    _, _, perf = comp565_A4.nmf_sse(X, W0, H0, adata, niter=40, scorer=NoScorer())
    assert np.all(np.diff(perf[:, 1]) <= 1e-12 * np.abs(perf[1:, 1])), "SSE increased"
    assert perf[-1, 1] < 0.5 * perf[0, 1]
    _, _, perf = comp565_A4.nmf_psn(X, W0, H0, adata, niter=40, scorer=NoScorer())
    assert np.all(np.diff(perf[:, 1]) >= -1e-12 * np.abs(perf[1:, 1])), "Poisson likelihood decreased"
    assert perf[-1, 1] > perf[0, 1]


def test_inputs_are_not_modified(problem):
    adata, X, W0, H0 = problem
    W_copy, H_copy = W0.copy(), H0.copy()
    comp565_A4.nmf_psn(X, W0, H0, adata, niter=3, scorer=NoScorer())
    comp565_A4.nmf_sse(X, W0, H0, adata, niter=3, scorer=NoScorer())
    np.testing.assert_array_equal(W0, W_copy)
    np.testing.assert_array_equal(H0, H_copy)


def test_continuing_a_run_is_exact(problem):
    """Q5 continues Q3's run: 10 + 20 iterations must equal 30 from scratch."""
    adata, X, W0, H0 = problem
    W30, H30, perf30 = comp565_A4.nmf_psn(X, W0, H0, adata, niter=30, scorer=NoScorer())
    W10, H10, perf10 = comp565_A4.nmf_psn(X, W0, H0, adata, niter=10, scorer=NoScorer())
    W, H, perf20 = comp565_A4.nmf_psn(X, W10, H10, adata, niter=20, scorer=NoScorer(), start_iter=10)
    np.testing.assert_array_equal(W, W30)
    np.testing.assert_array_equal(H, H30)
    np.testing.assert_array_equal(np.vstack([perf10, perf20]), perf30)


def test_perf_records_the_ari_of_every_iteration(problem):
    adata, X, W0, H0 = problem
    _, H, perf = comp565_A4.nmf_psn(X, W0, H0, adata, niter=8)
    assert perf.shape == (8, 3)
    assert np.isfinite(perf).all()
    assert perf[-1, 2] == pytest.approx(comp565_A4.evaluate_ari(H.T, adata))
    assert perf[-1, 2] > 0.5  # three well separated synthetic types


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN is the point
def test_non_finite_objective_stops_with_the_stage_and_iteration(problem):
    adata, X, W0, H0 = problem
    X = X.copy()
    X[0, 0] = np.inf
    with pytest.raises(FloatingPointError, match=r"NMF-SSE: the objective became .* at iteration 0"):
        comp565_A4.nmf_sse(X, W0, H0, adata, niter=2, scorer=NoScorer())


def test_eval_every_scores_every_kth_and_the_last_iteration(problem):
    adata, X, W0, H0 = problem
    _, H, perf = comp565_A4.nmf_sse(X, W0, H0, adata, niter=10, eval_every=4)
    np.testing.assert_array_equal(perf[:, 0], [3, 7, 9])
    _, _, full = comp565_A4.nmf_sse(X, W0, H0, adata, niter=10, scorer=NoScorer())
    np.testing.assert_allclose(perf[:, 1], full[[3, 7, 9], 1])
    assert perf[-1, 2] == pytest.approx(comp565_A4.evaluate_ari(H.T, adata))
