"""The batch-corrected scETM (models.scetm): decoder, batch bias, KL warm-up passed in, and training
by the assignment's own loop with the optimizer passed in."""

import math

import numpy as np
import pytest
import torch
from torch import distributions as D

import comp565_A4
from cellembed.likelihoods import CSRCounts, categorical_logits_nll
from cellembed.training import linear_warmup
from cellembed.models.scetm import BatchETM, SCETMConfig, batch_codes


def adam(model, lr=SCETMConfig.lr):
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=SCETMConfig.weight_decay)


@pytest.fixture
def data(small_adata):
    counts, normalized = comp565_A4.normalized_counts(small_adata)
    return small_adata, counts, normalized, batch_codes(small_adata.obs["batch"])


def make_model(n_genes, batch, seed=0, **options):
    torch.manual_seed(seed)
    options = {"num_topics": 5, "t_hidden_size": 32, "rho_size": 16, **options}
    return BatchETM(n_genes, batch, **options)


def random_theta(n_cells, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_cells, k, generator=g).softmax(-1)  # (N, K)


def test_batch_codes_are_sorted_integers():
    np.testing.assert_array_equal(batch_codes(["m2", "m1", "m2", "m3"]), [1, 0, 1, 2])
    np.testing.assert_array_equal(batch_codes(np.array([1, 0, 0])), [1, 0, 0])
    with pytest.raises(AssertionError, match="missing values"):
        batch_codes(np.array([0.0, np.nan]))


def test_forward_is_finite_and_theta_is_a_distribution(data):
    adata, counts, normalized, batch = data
    model = make_model(adata.n_vars, batch)
    nll, kl = model(counts, normalized)
    assert nll.ndim == 0 and kl.ndim == 0
    assert torch.isfinite(nll) and torch.isfinite(kl) and nll > 0 and kl >= 0
    theta = comp565_A4.get_theta(model, normalized)  # the assignment's own helper
    assert theta.shape == (adata.n_obs, 5)
    torch.testing.assert_close(theta.sum(1), torch.ones(adata.n_obs))
    beta = model.get_beta()
    assert beta.shape == (5, adata.n_vars)
    torch.testing.assert_close(beta.sum(1), torch.ones(5))


def test_nll_is_the_multinomial_log_likelihood_of_normalized_gene_probabilities(data):
    adata, counts, normalized, batch = data
    model = make_model(adata.n_vars, batch)
    with torch.no_grad():
        model.batch_bias.normal_()  # a non-trivial lambda
        theta = random_theta(adata.n_obs)
        logits = model.logits(theta)  # (N, M)
        log_p = torch.log_softmax(logits, -1)
        torch.testing.assert_close(log_p.exp().sum(1), torch.ones(adata.n_obs))
        nll = categorical_logits_nll(logits, counts)
        x = counts.dense()  # (N, M)
        # sum_j x_ij log p_ij = Multinomial log-pmf minus its log multinomial coefficient
        total = x.sum(1)
        log_coef = torch.lgamma(total + 1) - torch.lgamma(x + 1).sum(1)
        per_cell = torch.stack([
            D.Multinomial(int(total[i]), logits=logits[i]).log_prob(x[i]) for i in range(adata.n_obs)
        ])
        expected = -(per_cell - log_coef).mean()
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-3)


def test_logits_are_theta_alpha_rho_plus_the_cells_batch_bias(data):
    adata, _, _, batch = data
    model = make_model(adata.n_vars, batch)
    with torch.no_grad():
        model.batch_bias.normal_()
        theta = random_theta(adata.n_obs)
        rho = model.rho.weight  # (M, L)
        alpha = model.alphas.weight  # (K, L)
        expected = theta @ alpha @ rho.T + model.batch_bias[torch.as_tensor(batch)]
        torch.testing.assert_close(model.logits(theta), expected)


def test_a_batch_bias_changes_only_its_own_batch(data):
    adata, _, _, batch = data
    model = make_model(adata.n_vars, batch)
    theta = random_theta(adata.n_obs)
    in_batch_1 = torch.as_tensor(batch == 1)
    assert 0 < int(in_batch_1.sum()) < adata.n_obs
    with torch.no_grad():
        before = model.logits(theta)
        model.batch_bias[1, 3] += 2.0
        after = model.logits(theta)
    changed = (after != before).any(1)  # (N,)
    assert torch.equal(changed, in_batch_1)
    torch.testing.assert_close(after[in_batch_1, 3] - before[in_batch_1, 3],
                               torch.full((int(in_batch_1.sum()),), 2.0))
    # its gradient comes from its own batch's cells only
    x = torch.zeros(adata.n_obs, adata.n_vars)
    x[~in_batch_1, 0] = 5.0  # counts in batch 0 only
    model.zero_grad()
    categorical_logits_nll(model.logits(theta), x).backward()
    assert model.batch_bias.grad[1].abs().max() == 0
    assert model.batch_bias.grad[0].abs().max() > 0


def test_sparse_and_dense_counts_give_the_same_loss_and_gradients(data):
    adata, counts, normalized, batch = data
    assert isinstance(counts, CSRCounts)
    values, grads = [], []
    for x in (counts, counts.dense()):
        model = make_model(adata.n_vars, batch)
        with torch.no_grad():
            model.batch_bias.normal_(generator=torch.Generator().manual_seed(1))
        model.eval()  # no dropout, z = mu: the same function twice
        nll, kl = model(x, normalized)
        (nll + kl).backward()
        values.append(nll.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=0)
    for sparse_grad, dense_grad in zip(*grads):
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-4, atol=1e-6)


def test_bf16_input_is_made_once_and_close_to_float32(data):
    adata, _, normalized, batch = data
    model = make_model(adata.n_vars, batch)
    layer = model.q_theta[0]
    assert layer.prepared(normalized) is normalized
    h32 = comp565_A4.get_theta(model, normalized)
    model.set_encoder_bf16(True)
    z = layer.prepared(normalized)
    assert z.dtype == torch.bfloat16 and layer.prepared(normalized) is z  # made once per input tensor
    h16 = comp565_A4.get_theta(model, normalized)
    torch.testing.assert_close(h16, h32, rtol=0.05, atol=0.02)


def test_wrong_number_of_cells_and_bad_batches_say_the_fix(data):
    adata, counts, normalized, batch = data
    model = make_model(adata.n_vars, batch)
    with pytest.raises(AssertionError, match="decodes all cells at once"):
        model(counts.dense()[:10], normalized[:10])
    with pytest.raises(AssertionError, match=">= 0"):
        make_model(adata.n_vars, np.array([0, -1, 1]))


def test_training_with_the_assignment_loop_lowers_the_loss(data):
    adata, counts, normalized, batch = data
    model = make_model(adata.n_vars, batch)
    model.eval()
    with torch.no_grad():
        before = float(model(counts, normalized)[0])
    model, perf = comp565_A4.train_scETM(model, counts, normalized, adata, niter=60, optimizer=adam(model),
                                         kl_weight=linear_warmup(20))
    assert perf.shape == (60, 3) and np.isfinite(perf).all()
    model.eval()
    with torch.no_grad():
        after = float(model(counts, normalized)[0])
    assert after < before - 1.0, f"reconstruction loss {before:.2f} -> {after:.2f}"
    assert perf[-5:, 1].mean() < perf[:5, 1].mean()
    assert perf[-1, 2] > 0.5, f"ARI on three well-separated types: {perf[-1, 2]:.3f}"


def test_the_kl_weight_schedule_reaches_the_loss(data, monkeypatch):
    """train_scETM passes kl_weight(i) to every step: the NELBO it records is nll + w_i kl."""
    adata, counts, normalized, batch = data
    seen = []
    original = comp565_A4.train_scETM_helper

    def spy(model, X, Xn, optimizer=None, kl_weight=1.0):
        seen.append(kl_weight)
        return original(model, X, Xn, optimizer, kl_weight)

    monkeypatch.setattr(comp565_A4, "train_scETM_helper", spy)
    model = make_model(adata.n_vars, batch)
    comp565_A4.train_scETM(model, counts, normalized, adata, niter=6, optimizer=adam(model),
                           kl_weight=linear_warmup(4), scorer=comp565_A4.ARIScorer(adata.obs["Celltype"]))
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    # the step's value is nll + w kl for the same random draws (lr 0: the model does not move)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        nll, kl = (float(t) for t in model(counts, normalized))
    assert kl > 0
    for weight in (0.0, 0.5, 1.0):
        torch.manual_seed(0)
        step_value = original(model, counts, normalized, adam(model, lr=0.0), weight)
        assert step_value == pytest.approx(nll + weight * kl, rel=1e-6), weight


def test_short_run_on_the_real_data(real_adata):
    """50 full-batch steps with the chosen options: finite, and already well above chance (ARI ~0)."""
    adata = real_adata
    torch.manual_seed(0)
    counts, normalized = comp565_A4.normalized_counts(adata)
    model = BatchETM(adata.n_vars, batch_codes(adata.obs["batch"]))
    model, perf = comp565_A4.train_scETM(model, counts, normalized, adata, niter=50, eval_every=10,
                                         optimizer=adam(model), kl_weight=linear_warmup(SCETMConfig.kl_warmup))
    assert perf.shape == (5, 3) and np.isfinite(perf).all()
    assert perf[-1, 1] < perf[0, 1]
    assert math.isfinite(perf[-1, 2]) and perf[-1, 2] > 0.1, f"ARI after 50 steps: {perf[-1, 2]:.3f}"

