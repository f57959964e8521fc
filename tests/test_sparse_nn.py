"""The sparse first layer and squared error of the autoencoders equal autograd on the dense rows."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellembed.data.minibatch import ScaledSparseRows
from cellembed.models.autoencoders import AutoencoderModule, make_loss
from cellembed.preprocessing import gene_scaling, log_normalize_sparse, standardize
from cellembed.sparse_nn import GeneLinear, SparseMatrix, scaled_sparse_mse


def lognorm_counts(n=120, m=300, seed=0):
    """Log-normalized sparse counts (N, M) CSR float32, every cell with counts, ~8% stored."""
    X = sp.random(n, m, density=0.08, format="lil", dtype=np.float32, random_state=seed)
    X[np.arange(n), np.arange(n) % m] = 0.1  # no empty cell
    X = sp.csr_matrix(X)
    X.data = np.ceil(X.data * 20).astype(np.float32)
    return log_normalize_sparse(X)


def scaled_rows(max_value=None, n=120):
    """`ScaledSparseRows` of `lognorm_counts` with their own gene statistics, and that CSR matrix."""
    L = lognorm_counts(n=n)
    return ScaledSparseRows(L, *gene_scaling(L), max_value), L


@pytest.mark.parametrize("max_value", [None, 1.5])
def test_a_batch_is_its_dense_z_scores_with_the_counts_pattern(max_value):
    rows, L = scaled_rows(max_value)
    index = torch.tensor([5, 0, 77, 31])
    batch = rows[index]
    dense = standardize(L[index.numpy()].toarray(), rows.mean, rows.sd, max_value)
    np.testing.assert_allclose(batch.dense().numpy(), dense, rtol=1e-6, atol=1e-6)
    assert batch.values._nnz() == L[index.numpy()].nnz  # a zero count is stored nowhere
    np.testing.assert_allclose(batch.transposed.to_dense().numpy(), batch.values.to_dense().numpy().T)
    if max_value is not None:
        assert np.abs(dense).max() == max_value  # the clip acted, and the sparse form kept it


@pytest.mark.parametrize("max_value", [None, 1.5])
def test_gene_linear_and_its_gradients_equal_a_linear_layer_on_the_dense_rows(max_value):
    rows, L = scaled_rows(max_value)
    batch = rows[torch.arange(40)]
    torch.manual_seed(0)
    layer = GeneLinear(L.shape[1], 16)
    torch.manual_seed(0)
    oracle = torch.nn.Linear(L.shape[1], 16)  # the same draws: GeneLinear is nn.Linear stored (M, h)
    torch.testing.assert_close(layer.weight, oracle.weight.t().contiguous())
    target = torch.randn(40, 16)
    out = layer(batch)
    dense_out = oracle(batch.dense())
    torch.testing.assert_close(out, dense_out, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(((out - target) ** 2).sum(), [layer.weight, layer.bias])
    dense_grads = torch.autograd.grad(((dense_out - target) ** 2).sum(), [oracle.weight, oracle.bias])
    torch.testing.assert_close(grads[0], dense_grads[0].t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], dense_grads[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer(batch.dense()), out, rtol=1e-5, atol=1e-5)  # dense rows too


def test_a_pass_without_gradients_never_transposes_the_batch():
    """An embedding pass (no_grad) computes the layer without the transpose that only backward reads."""
    rows, L = scaled_rows()
    batch = rows[torch.arange(40)]
    layer = GeneLinear(L.shape[1], 16)
    with torch.no_grad():
        out = layer(batch)
        dense_out = torch.nn.functional.linear(batch.dense(), layer.weight.t(), layer.bias)
    torch.testing.assert_close(out, dense_out, rtol=1e-5, atol=1e-5)
    assert callable(batch._transposed)  # not made
    layer(batch).sum().backward()  # with a gradient it is made, once, and kept
    assert not callable(batch._transposed)
    np.testing.assert_allclose(batch.transposed.to_dense().numpy(), batch.values.to_dense().numpy().T)


@pytest.mark.parametrize("max_value", [None, 1.5])
def test_scaled_sparse_mse_and_its_gradients_equal_the_dense_squared_error(max_value):
    rows, L = scaled_rows(max_value)
    batch = rows[torch.arange(50)]
    torch.manual_seed(1)
    decoder = torch.nn.Linear(8, L.shape[1])
    g = torch.randn(50, 8, requires_grad=True)
    loss = scaled_sparse_mse(batch, g, decoder)
    dense = ((batch.dense() - decoder(g)) ** 2).sum(-1).mean()
    torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-4)
    params = [g, decoder.weight, decoder.bias]
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(dense, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["ae", "vae", "vsc"])
def test_training_steps_on_sparse_batches_follow_the_dense_ones(kind):
    # both squared-error paths: the Gram matrix (last hidden width 8 <= 32 rows) and dense rows (> 4 rows)
    rows, L = scaled_rows(n=160)
    for batch_rows in (32, 4):
        torch.manual_seed(0)
        sparse_module = AutoencoderModule(L.shape[1], (16, 8, 8), 3, kind, "mse")
        dense_module = AutoencoderModule(L.shape[1], (16, 8, 8), 3, kind, "mse")
        dense_module.load_state_dict(sparse_module.state_dict())
        loss_fn = make_loss(beta=2.0)
        for module, dense in ((sparse_module, False), (dense_module, True)):
            optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
            for step in range(5):
                batch = rows[torch.arange(step * batch_rows, (step + 1) * batch_rows)]
                torch.manual_seed(step)  # the same VAE / VSC noise on both
                loss, _ = loss_fn(module, (batch.dense() if dense else batch,), 1.0)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        for (name, a), b in zip(sparse_module.state_dict().items(), dense_module.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{kind} {name} at {batch_rows} rows")
        assert not torch.equal(sparse_module.decoder[-1].weight, AutoencoderModule(
            L.shape[1], (16, 8, 8), 3, kind, "mse").decoder[-1].weight)  # it trained


def test_an_nn_linear_state_dict_loads_into_gene_linear_transposed():
    torch.manual_seed(0)
    old = torch.nn.Linear(30, 5)  # a model saved before the first layer was GeneLinear
    layer = GeneLinear(30, 5)
    layer.load_state_dict(old.state_dict())
    x = torch.randn(4, 30)
    torch.testing.assert_close(layer(x), old(x))


def test_gene_linear_without_bias_is_nn_linear_without_bias():
    rows, L = scaled_rows()
    batch = rows[torch.arange(30)]
    torch.manual_seed(0)
    layer = GeneLinear(L.shape[1], 8, bias=False)
    torch.manual_seed(0)
    oracle = torch.nn.Linear(L.shape[1], 8, bias=False)
    assert layer.bias is None and "bias" not in layer.state_dict()
    torch.testing.assert_close(layer(batch), oracle(batch.dense()), rtol=1e-5, atol=1e-5)
    grad = torch.autograd.grad(layer(batch).pow(2).sum(), layer.weight)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(oracle(batch.dense()).pow(2).sum(), oracle.weight)[0].t(),
                               rtol=1e-4, atol=1e-4)


def test_sparse_matrix_product_and_its_gradient_equal_the_dense_product():
    A = sp.random(50, 70, density=0.1, format="csr", dtype=np.float64, random_state=1)
    matrix = SparseMatrix(A)
    assert matrix.shape == (50, 70)
    np.testing.assert_allclose(matrix.dense().numpy(), A.toarray(), rtol=1e-6)
    h = torch.randn(70, 6, requires_grad=True)
    target = torch.randn(50, 6)
    out = matrix @ h
    dense = torch.from_numpy(A.toarray().astype(np.float32))
    torch.testing.assert_close(out, dense @ h)
    grad = torch.autograd.grad(((out - target) ** 2).sum(), h)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(((dense @ h - target) ** 2).sum(), h)[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 also under autocast
        assert (matrix @ h.bfloat16()).dtype == torch.float32
