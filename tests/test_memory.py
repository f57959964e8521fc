"""Memory that grows with the batch, not with the data (cellembed/data/minibatch.py, the sparse
preprocessing, the autoencoder family and the GMVAE): the sparse path's numbers against the dense
ones, the gradient of a batch built from the CSR matrix against the dense rows', the epoch budget,
and the peak resident memory of a fit on 20,000 cells measured in a fresh process."""

import json
import os
import subprocess
import sys

import anndata
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

from cellembed.data import minibatch
from cellembed.data.minibatch import SparseRows, embed_batch_size, scaled_epochs
from cellembed.models import get_model
from cellembed.models.autoencoders import make_loss
from cellembed.models.gmvae import gmvae_loss
from cellembed.preprocessing import gene_scaling, log_normalize, log_normalize_sparse, scale, standardize
from conftest import ROOT, make_counts

TINY = {"hidden": (32, 16, 8), "latent": 4, "precision": "fp32"}


def random_counts(n, m, density, seed=0):
    """CSR float32 counts (n, m), every cell with at least one count."""
    rng = np.random.default_rng(seed)
    X = sp.random(n, m, density=density, format="csr", random_state=rng, dtype=np.float32)
    X.data = rng.geometric(0.3, X.nnz).astype(np.float32)
    X = X + sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), rng.integers(0, m, n))), shape=(n, m))
    return sp.csr_matrix(X, dtype=np.float32)


@pytest.mark.filterwarnings("ignore:zero-centering a sparse")
def test_sparse_log_normalization_and_gene_statistics_are_the_dense_ones_bit_for_bit():
    X = random_counts(3000, 400, 0.05)
    # the dense computation written out: float64 scaling, float32 log1p, numpy's mean and sd (ddof 1)
    totals = np.asarray(X.sum(1), dtype=np.float64).ravel()
    lognorm = np.log1p((X.toarray() * (1e4 / totals)[:, None]).astype(np.float32))
    sparse = log_normalize_sparse(X)
    assert sp.isspmatrix_csr(sparse) and sparse.dtype == np.float32 and sparse.nnz == X.nnz
    np.testing.assert_array_equal(sparse.toarray(), lognorm)
    np.testing.assert_array_equal(log_normalize(X), lognorm)
    dense64 = lognorm.astype(np.float64)
    mean, sd = gene_scaling(sparse)
    np.testing.assert_array_equal(mean, dense64.mean(0))
    np.testing.assert_array_equal(sd, dense64.std(0, ddof=1))
    rows = np.array([5, 2999, 0, 17])
    z = standardize(sparse[rows].toarray(), mean, sd)
    np.testing.assert_array_equal(z, ((dense64[rows] - mean) / sd).astype(np.float32))
    np.testing.assert_array_equal(z, scale(lognorm)[rows])
    # scanpy's normalize_total + log1p + scale (its own float32 arithmetic: to float tolerance)
    ad = anndata.AnnData(X.copy())
    sc.pp.normalize_total(ad, target_sum=1e4)
    sc.pp.log1p(ad)
    sc.pp.scale(ad)
    np.testing.assert_allclose(standardize(sparse.toarray(), mean, sd), ad.X, rtol=1e-4, atol=1e-4)


def test_non_canonical_csr_and_constant_genes():
    X = sp.hstack([random_counts(50, 30, 0.2, seed=1), sp.csr_matrix((50, 1), dtype=np.float32)]).tocsr()
    # every entry stored as two halves, the row's entries in reverse order: duplicates, unsorted indices
    indptr, indices, values = [0], [], []
    for i in range(X.shape[0]):
        cols, vals = X.indices[X.indptr[i]:X.indptr[i + 1]][::-1], X.data[X.indptr[i]:X.indptr[i + 1]][::-1]
        indices += [cols, cols]
        values += [vals / 2, vals / 2]
        indptr.append(indptr[-1] + 2 * cols.size)
    doubled = sp.csr_matrix((np.concatenate(values), np.concatenate(indices), np.array(indptr)), shape=X.shape)
    assert not doubled.has_canonical_format
    np.testing.assert_array_equal(log_normalize_sparse(doubled).toarray(), log_normalize(X))
    mean, sd = gene_scaling(log_normalize_sparse(doubled))
    dense_mean, dense_sd = gene_scaling(log_normalize(X))
    np.testing.assert_array_equal(mean, dense_mean)
    np.testing.assert_array_equal(sd, dense_sd)
    assert sd[30] == 1.0 and mean[30] == 0.0  # a gene without counts: sd 1 (scanpy's scale gives it 0)


def test_sparse_rows_serve_the_dense_rows_in_order():
    X = random_counts(40, 9, 0.3)
    rows = SparseRows(X, lambda b: b * 2)
    assert rows.shape == (40, 9) and len(rows) == 40
    index = torch.tensor([3, 39, 3, 0])
    np.testing.assert_array_equal(rows[index].numpy(), 2 * X.toarray()[[3, 39, 3, 0]])
    np.testing.assert_array_equal(rows[5:8].numpy(), 2 * X.toarray()[5:8])
    assert rows[index].dtype == torch.float32 and rows.device == torch.device("cpu")
    with pytest.raises(TypeError, match="float32 CSR"):
        SparseRows(X.toarray())


def test_validation_loss_over_row_chunks_is_the_one_shot_loss():
    # train(valid_batch_size=...) makes a SparseRows validation set dense one chunk at a time
    from cellembed.training import train

    X = random_counts(60, 9, 0.4)
    y = torch.arange(60) % 3

    def loss_fn(module, batch, kl_weight):
        return torch.nn.functional.cross_entropy(module(batch[0]), batch[1]), {}

    histories = []
    for chunk in (None, 7):
        torch.manual_seed(0)
        net = torch.nn.Linear(9, 3)
        histories.append(train(net, loss_fn, (SparseRows(X[:40]), y[:40]), torch.optim.Adam(net.parameters()),
                               epochs=3, batch_size=8, valid_data=(SparseRows(X[40:]), y[40:]),
                               valid_batch_size=chunk))
    one_shot, chunked = ([row["valid_loss"] for row in h] for h in histories)
    assert one_shot[0] != one_shot[-1]  # training moved it
    np.testing.assert_allclose(chunked, one_shot, rtol=1e-6)


def grads(module, loss_fn, batch, seed=0):
    """The gradient of ``loss_fn(module, batch, 1.0)`` (seeded draws), flattened."""
    module.zero_grad()
    torch.manual_seed(seed)
    loss, _ = loss_fn(module, batch, 1.0)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in module.parameters()])


@pytest.mark.parametrize("likelihood", ["mse", "nb"])
def test_a_batch_from_the_sparse_counts_gives_the_dense_rows_gradient(likelihood):
    adata = make_counts(n_per_type=20)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    model = get_model("vae")(**TINY, likelihood=likelihood)
    model.var_names_ = adata.var_names
    data = model._inputs(X, fit=True)  # the minibatch path: ScaledSparseRows, or SparseRows and library sizes
    counts = torch.from_numpy(X.toarray())
    if likelihood == "mse":  # the dense path of the full data set: every cell z-scored at once
        dense = (torch.from_numpy(scale(log_normalize(X))),)
    else:
        dense = (torch.log1p(counts), counts, counts.sum(1))
    module = model._build_module()
    loss_fn = make_loss(beta=2.0)
    rows = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))[:16]
    for index in (rows, torch.arange(X.shape[0])):  # one minibatch, and the full batch
        sparse_batch = tuple(t[index] for t in data)
        dense_batch = tuple(t[index] for t in dense)
        g = grads(module, loss_fn, sparse_batch)
        assert g.abs().sum() > 0
        if likelihood == "nb":  # the dense rows of the stored counts, bit for bit
            assert all(torch.equal(a, b) for a, b in zip(sparse_batch, dense_batch))
            assert torch.equal(g, grads(module, loss_fn, dense_batch))
        else:  # kept sparse (values + offset) through the first layer and the loss: to float rounding
            torch.testing.assert_close(sparse_batch[0].dense(), dense_batch[0], rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(g, grads(module, loss_fn, dense_batch), rtol=1e-4, atol=1e-4)


def test_gmvae_batch_from_the_sparse_counts_gives_the_dense_rows_gradient():
    adata = make_counts(n_per_type=20)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    model = get_model("gmvae")(hidden=(16,), latent=3)
    model.genes_, model.n_clusters_ = np.arange(0, 60, 2), 3  # every other gene
    data = model._tensors(X)
    counts = torch.from_numpy(X.toarray()[:, model.genes_])
    dense = (torch.log1p(counts), counts, counts.sum(1))
    module = model._build_module()
    rows = torch.tensor([4, 0, 33, 59, 12])
    sparse_batch, dense_batch = tuple(t[rows] for t in data), tuple(t[rows] for t in dense)
    for a, b in zip(sparse_batch, dense_batch):
        assert torch.equal(a, b)
    g = grads(module, gmvae_loss, sparse_batch)
    assert g.abs().sum() > 0 and torch.equal(g, grads(module, gmvae_loss, dense_batch))


def test_latents_do_not_depend_on_the_embedding_batch():
    adata = make_counts(n_per_type=30)
    model = get_model("vsc")(**TINY, epochs=2, batch_size=16).fit(adata, seed=0)
    rows = model._inputs(sp.csr_matrix(adata.X, dtype=np.float32))[0]
    from cellembed.training import predict

    whole = predict(model.module_.latent, rows, batch_size=4096)
    np.testing.assert_allclose(predict(model.module_.latent, rows, batch_size=7), whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(model.get_latent(adata), whole)
    assert (embed_batch_size(60), embed_batch_size(2000), embed_batch_size(30000)) == (4096, 2097, 139)
    assert embed_batch_size(10**8) == 1


def test_epochs_follow_scvi_tools_rule():
    assert scaled_epochs(200, 1_000) == 200 and scaled_epochs(200, 20_000) == 200
    assert scaled_epochs(200, 100_000) == 40 and scaled_epochs(100, 1_000_000) == 2
    assert scaled_epochs(400, 50_000) == 160  # scvi-tools: min(400, round(20000 / N * 400))
    assert scaled_epochs(200, 10**7) == 1  # at least one


def test_models_train_the_scaled_epochs_and_warmup(monkeypatch):
    monkeypatch.setattr(minibatch, "EPOCHS_DECAY_CELLS", 30)  # 60 cells: half the epochs
    adata = make_counts(n_per_type=20)
    assert len(get_model("ae")(**TINY, epochs=6, batch_size=16).fit(adata).history) == 3
    assert len(get_model("ae")(**TINY, epochs=6, batch_size=16, scale_epochs=False).fit(adata).history) == 6
    gmvae = get_model("gmvae")(hidden=(16,), latent=3, epochs=8, warmup=4).fit(adata, n_clusters=3)
    assert [row["kl_weight"] for row in gmvae.history] == [0.0, 0.5, 1.0, 1.0]  # warm-up 2 of 4 epochs
    fixed = get_model("gmvae")(hidden=(16,), latent=3, epochs=8, warmup=4, scale_epochs=False).fit(adata, n_clusters=3)
    assert [row["kl_weight"] for row in fixed.history] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


# The child process of the memory test: 20,000 cells x 2,000 genes, ~5% stored (100 draws per cell,
# repeats summed), integer counts. First the same model's fit and embedding on 1,000 of the cells
# (torch's own start-up: threads, allocator, kernels, ~100 MiB whatever N); then the peak resident
# memory (VmHWM) is reset to the current one (/proc/self/clear_refs, Linux), the baseline, and the
# fit and embedding of all 20,000 cells run; then one dense float32 copy of the counts on top.
CHILD = r"""
import gc, json, sys, warnings
warnings.simplefilter("ignore")
import anndata, numpy as np, pandas as pd, scipy.sparse as sp
from cellembed.models import get_model

sys.path.insert(0, "tests")  # run from the repository root
from memory_child import mib, reset_peak, synthetic_counts

name, options, fit_kw = json.loads(sys.argv[1])
n, m, k = 20_000, 2_000, 100
X = synthetic_counts(n, m, k)
adata = anndata.AnnData(X, var=pd.DataFrame(index=[f"g{j}" for j in range(m)]))
small = adata[:1000].copy()
get_model(name)(epochs=1, device="cpu", **options).fit(small, seed=0, **fit_kw).get_latent(small)
del small
baseline = reset_peak()
model = get_model(name)(epochs=1, device="cpu", **options).fit(adata, seed=0, **fit_kw)
z = model.get_latent(adata)
fit = mib("VmHWM")
dense = X.toarray()
print(json.dumps({"nnz": X.nnz, "latent": list(z.shape), "baseline": baseline, "fit": fit - baseline,
                  "dense": mib("VmHWM") - baseline}))
"""

# One dense float32 copy of the counts is 20,000 * 2,000 * 4 B = 152.6 MiB. Measured (2 CPU cores,
# batch 256): ae 68 MiB, vae "nb" 63 MiB, gmvae 61 MiB, most of it the checked copy of the counts
# and its checks (float64 copies of the stored values) and one embedding batch.
BOUND_MIB = 110


@pytest.mark.parametrize("name,options,fit_kw", [  # narrower modules (and fewer GMVAE steps): seconds
    ("ae", {"hidden": (64, 32, 16)}, {}),
    ("gmvae", {"n_top_genes": 1000, "hidden": (64,), "latent": 10, "batch_size": 256}, {"n_clusters": 5})])
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets the peak RSS in /proc/self")
def test_peak_memory_of_a_20k_cell_fit_stays_below_one_dense_copy(name, options, fit_kw):
    # glibc's mmap threshold held at its start value (128 KiB): freed large blocks go back to the
    # system, so the resident memory follows the live arrays, not what malloc keeps for reuse
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([name, options, fit_kw])], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["latent"][0] == 20_000 and 0.04 < result["nnz"] / (20_000 * 2_000) < 0.05
    assert result["fit"] < BOUND_MIB, result  # the fit and the embedding, on top of the baseline
    assert result["dense"] > BOUND_MIB, result  # one dense copy on top of them breaks the bound
