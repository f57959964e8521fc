"""The ETM and its likelihoods: the sparse path against the dense formula and torch.distributions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D

import comp565_A4
from cellembed.likelihoods import CSRCounts, categorical_logits_nll, categorical_nll, gaussian_kl
from etm import ETM, EncoderLinear


@pytest.fixture
def tensors(small_adata):
    torch.manual_seed(0)
    counts, normalized = comp565_A4.normalized_counts(small_adata)
    return small_adata, counts, normalized


def make_model(n_genes, seed=0):
    torch.manual_seed(seed)
    return ETM(num_topics=5, vocab_size=n_genes, t_hidden_size=32, rho_size=16, theta_act="relu",
               embeddings=None, train_embeddings=True, enc_drop=0.5)


def test_forward_is_finite_and_beta_theta_are_distributions(tensors):
    adata, counts, normalized = tensors
    model = make_model(adata.n_vars)
    nll, kl = model(counts, normalized)
    assert nll.ndim == 0 and kl.ndim == 0
    assert torch.isfinite(nll) and torch.isfinite(kl) and nll > 0 and kl >= 0
    beta = model.get_beta()
    assert beta.shape == (5, adata.n_vars)
    torch.testing.assert_close(beta.sum(1), torch.ones(5))
    theta = comp565_A4.get_theta(model, normalized)
    assert theta.shape == (adata.n_obs, 5)
    torch.testing.assert_close(theta.sum(1), torch.ones(adata.n_obs))


def test_normalized_counts_rows_sum_to_one(tensors):
    adata, counts, normalized = tensors
    torch.testing.assert_close(normalized.sum(1), torch.ones(adata.n_obs))
    np.testing.assert_array_equal(counts.dense().numpy(), adata.X.toarray())


def test_sparse_nll_equals_dense_value_and_gradients(tensors):
    adata, counts, _ = tensors
    g = torch.Generator().manual_seed(0)
    logits_t = torch.randn(adata.n_obs, 5, generator=g, requires_grad=True)
    logits_b = torch.randn(5, adata.n_vars, generator=g, requires_grad=True)
    values, grads = [], []
    for x in (counts, counts.dense()):
        theta, beta = logits_t.softmax(-1), logits_b.softmax(-1)
        loss = categorical_nll(theta, beta, x)
        values.append(loss.detach())
        grads.append(torch.autograd.grad(loss, (logits_t, logits_b)))
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=0)
    for sparse_grad, dense_grad in zip(*grads):
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-5, atol=1e-7)


def test_sparse_logits_nll_equals_dense_value_and_gradient(tensors):
    """The sparse path's hand-written backward, n_i softmax(l_i) - x_i, against autograd (float64)."""
    adata, _, _ = tensors
    counts = CSRCounts(adata.X, dtype=torch.float64)
    logits = torch.randn(adata.n_obs, adata.n_vars, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0), requires_grad=True)
    values, grads = [], []
    for x in (counts, counts.dense()):
        loss = categorical_logits_nll(logits * 3.0, x)  # a non-trivial upstream gradient
        values.append(loss.detach())
        grads.append(torch.autograd.grad(loss, logits)[0])
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)
    assert grads[0].abs().max() > 0


def test_categorical_nll_is_the_multinomial_log_likelihood(tensors):
    """sum_j x_j log p_j = Multinomial.log_prob(x) - log multinomial coefficient."""
    adata, counts, _ = tensors
    x = counts.dense().double()
    p = torch.softmax(torch.randn(adata.n_obs, adata.n_vars, dtype=torch.float64), -1)
    log_coef = torch.lgamma(x.sum(1) + 1) - torch.lgamma(x + 1).sum(1)
    ref = -(torch.stack([D.Multinomial(int(n), probs=pi).log_prob(xi)
                         for n, pi, xi in zip(x.sum(1), p, x)]) - log_coef).mean()
    theta = torch.eye(adata.n_obs, dtype=torch.float64)  # one "topic" per cell: theta @ beta = p
    got = categorical_nll(theta, p, x)  # includes the 1e-6 guard: tiny difference
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(categorical_logits_nll(torch.log(p), x), ref, rtol=1e-10, atol=0)
    sparse = CSRCounts(adata.X, dtype=torch.float64)
    torch.testing.assert_close(categorical_logits_nll(torch.log(p), sparse), ref, rtol=1e-10, atol=0)


def test_gaussian_kl_matches_torch_distributions():
    mu, logvar = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    ref = D.kl_divergence(D.Normal(mu, (0.5 * logvar).exp()), D.Normal(0.0, 1.0)).sum(1).mean()
    torch.testing.assert_close(gaussian_kl(mu, logvar), ref)


def test_training_lowers_the_nelbo(tensors):
    adata, counts, normalized = tensors
    model = make_model(adata.n_vars)
    losses = [comp565_A4.train_scETM_helper(model, counts, normalized) for _ in range(200)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.98 * np.mean(losses[:10])  # lr 1e-3: slow but steady


def test_train_scetm_records_every_step(tensors):
    adata, counts, normalized = tensors
    model, perf = comp565_A4.train_scETM(make_model(adata.n_vars), counts, normalized, adata, niter=15)
    assert perf.shape == (15, 3)
    np.testing.assert_array_equal(perf[:, 0], np.arange(15))
    assert np.isfinite(perf).all()
    assert perf[-1, 2] == pytest.approx(comp565_A4.evaluate_ari(comp565_A4.get_theta(model, normalized).numpy(), adata))


def test_bf16_encoder_stays_close_to_float32(tensors):
    adata, counts, normalized = tensors
    model = make_model(adata.n_vars)
    theta32 = comp565_A4.get_theta(model, normalized)
    model.set_encoder_bf16(True)
    theta16 = comp565_A4.get_theta(model, normalized)
    assert theta16.dtype == torch.float32
    torch.testing.assert_close(theta16, theta32, rtol=0, atol=2e-2)
    loss = sum(model(counts, normalized))
    loss.backward()
    assert model.q_theta[0].weight.grad.dtype == torch.float32
    assert torch.isfinite(model.q_theta[0].weight.grad).all()


def test_sparse_encoder_input_equals_the_dense_product(tensors):
    adata, _, dense = tensors
    layer = make_model(adata.n_vars).q_theta[0]
    for _ in range(2):  # 57% nonzero: the dense product is kept
        layer(dense)
    assert layer._prepared[2] is dense
    normalized = dense * (torch.rand(dense.shape) < 0.15)  # ~10% nonzero, as real counts
    grads = []
    for call in range(3):  # first call dense; the same input again: the kept CSR copies
        layer.weight.grad = layer.bias.grad = None
        out = layer(normalized)
        assert isinstance(layer._prepared[2], tuple) == (call > 0)
        (out ** 2).sum().backward()
        grads.append((out.detach(), layer.weight.grad.clone(), layer.bias.grad.clone()))
    for got in grads[1:]:
        for a, b in zip(got, grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    batch = normalized[:7]  # a new tensor per minibatch: used once, so never converted
    layer(batch)
    assert layer._prepared[2] is None and layer._prepared[0] is batch


@pytest.mark.parametrize("bf16", [False, True])
def test_encoder_gradients_equal_autograd_of_linear(bf16):
    torch.manual_seed(0)
    x = torch.rand(300, 500)  # dense: its own form, or its bf16 copy
    layer = EncoderLinear(500, 64)
    layer.bf16 = bf16
    grad = torch.randn(300, 64)
    z = x.bfloat16() if bf16 else x
    w, b = (layer.weight.bfloat16(), layer.bias.bfloat16()) if bf16 else (layer.weight, layer.bias)
    F.linear(z, w, b).float().backward(grad)  # what autograd does for a plain nn.Linear
    expected = [layer.weight.grad.clone(), layer.bias.grad.clone()]
    for _ in range(2):  # the second call reuses the kept product
        layer.weight.grad = layer.bias.grad = None
        layer(x).backward(grad)
        torch.testing.assert_close([layer.weight.grad, layer.bias.grad], expected, rtol=0, atol=0)


@pytest.mark.parametrize("bf16", [False, True])
def test_scoring_between_steps_does_not_change_training(tensors, bf16):
    """get_theta's product is kept for the next step: the same parameters, bit for bit."""
    adata, counts, normalized = tensors
    normalized = normalized * (torch.rand(normalized.shape) < 0.15)  # sparse, as real counts
    params = []
    for score in (False, True):
        model = make_model(adata.n_vars)
        model.set_encoder_bf16(bf16)
        torch.manual_seed(1)
        for _ in range(4):
            comp565_A4.train_scETM_helper(model, counts, normalized)
            if score:
                comp565_A4.get_theta(model, normalized)
        params.append([q.detach().clone() for q in model.parameters()])
    torch.testing.assert_close(params[1], params[0], rtol=0, atol=0)
    assert not torch.equal(params[0][0], make_model(adata.n_vars).rho.weight)  # it trained


def test_fixed_embeddings_and_bad_arguments():
    rho = torch.randn(30, 8)
    model = ETM(4, 30, 16, 8, "tanh", embeddings=rho, train_embeddings=False)
    assert model.get_beta().shape == (4, 30)
    with pytest.raises(ValueError, match="embeddings of shape"):
        ETM(4, 30, 16, 8, "tanh", embeddings=None, train_embeddings=False)
    with pytest.raises(ValueError, match="unknown theta_act"):
        ETM(4, 30, 16, 8, "sigmoid-ish")


def test_dropout_keeps_half_and_rescales():
    from etm import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.5)
    x = torch.ones(400, 256)
    y = drop(x)
    assert set(torch.unique(y).tolist()) == {0.0, 2.0}
    assert abs((y > 0).float().mean().item() - 0.5) < 0.01
    drop.eval()
    assert torch.equal(drop(x), x)


def test_fused_adam_matches_the_reference_update(tensors):
    """The assignment's optimizer is Adam(lr=1e-3, weight_decay=1.2e-6); fused is the same math."""
    adata, counts, normalized = tensors
    models = [make_model(adata.n_vars, seed=3) for _ in range(2)]
    for m in models:
        m.t_drop.p = 0.0  # no dropout noise: both runs see the same batch
        m.reparameterize = lambda mu, logvar: mu
    reference = torch.optim.Adam(models[1].parameters(), lr=1e-3, weight_decay=1.2e-6, foreach=False)
    for _ in range(5):
        comp565_A4.train_scETM_helper(models[0], counts, normalized)  # the assignment's (fused) Adam
        comp565_A4.train_scETM_helper(models[1], counts, normalized, optimizer=reference)
    assert comp565_A4.assignment_optimizer(models[0]) is comp565_A4.assignment_optimizer(models[0])
    assert not hasattr(models[0], "optimizer")  # the model carries no optimizer
    for p_fused, p_ref in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p_fused, p_ref, rtol=1e-5, atol=1e-6)


def test_minibatch_epochs_train_and_match_full_batch_when_one_batch(tensors):
    adata, counts, normalized = tensors
    torch.manual_seed(0)
    model, perf = comp565_A4.train_scETM(make_model(adata.n_vars), counts, normalized, adata, niter=6, batch_size=32)
    assert perf.shape == (6, 3) and np.isfinite(perf).all()
    assert perf[-1, 1] < perf[0, 1]
    sub = counts.rows([0, 5, 7])
    np.testing.assert_array_equal(sub.dense().numpy(), adata.X[[0, 5, 7]].toarray())
    # a batch as large as the data is the full-batch step
    runs = []
    for bs in (None, adata.n_obs):
        torch.manual_seed(1)
        runs.append(comp565_A4.train_scETM(make_model(adata.n_vars), counts, normalized, adata, niter=3,
                                   batch_size=bs)[1])
    np.testing.assert_array_equal(runs[0], runs[1])
