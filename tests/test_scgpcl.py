"""scGPCL (cellembed/models/scgpcl.py): graph, losses against direct formulas, planted clusters,
new cells, save / load, real data."""


import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import make_counts
from scipy import stats
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from cellembed.data.checks import DataError
from cellembed.likelihoods import CSRCounts, zinb_loss
from cellembed.models import load_model
from cellembed.models.scgpcl import (SCGPCL, CellGeneGraph, SCGPCLConfig, SCGPCLModule, column_mask, dec_kl,
                                     epoch_budget, granularities, instance_nce, kmeans_fit, preprocess, proto_nce,
                                     select_genes, target_distribution)
from cellembed.preprocessing import scale

FAST = dict(epochs=6, warmup=3, fine_epochs=6, batch_size=64, num_samples=(64, 32), layers=(32, 8), kmeans_n_init=4)


def tiny_counts():
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.8, size=(12, 9)).astype(np.float32)
    counts[:, 0] += 1  # no empty cell
    return torch.from_numpy(counts)


def test_graph_has_one_edge_per_nonzero_count():
    counts = tiny_counts()
    graph = CellGeneGraph(counts)
    assert graph.n_edges == int((counts > 0).sum())
    full = graph.view()
    h = torch.randn(counts.shape[1], 4)
    for i in range(counts.shape[0]):  # mean over the cell's expressed genes
        expressed = torch.nonzero(counts[i]).ravel()
        torch.testing.assert_close((full["cell_from_gene"] @ h)[i], h[expressed].mean(0))
    g = torch.randn(counts.shape[0], 4)
    for j in range(counts.shape[1]):
        cells = torch.nonzero(counts[:, j]).ravel()
        expected = g[cells].mean(0) if cells.numel() else torch.zeros(4)
        torch.testing.assert_close((full["gene_from_cell"] @ g)[j], expected)


def test_sampled_subgraph_starts_with_the_seeds_and_keeps_induced_edges():
    counts = tiny_counts()
    graph = CellGeneGraph(counts)
    seeds = torch.tensor([3, 0, 7])
    view = graph.sample(seeds, (5, 4), torch.Generator().manual_seed(0), max_neighbors=100)
    cells, genes = view["cells"], view["genes"]
    assert torch.equal(cells[:3], seeds) and cells.unique().numel() == cells.numel()
    assert genes.numel() <= 5 + 4 and cells.numel() <= 3 + 4
    # max_neighbors above every degree: the induced subgraph, every edge kept
    sub = (counts[cells][:, genes] > 0).float()
    torch.testing.assert_close(view["cell_from_gene"].dense() > 0, sub > 0)
    torch.testing.assert_close(view["gene_from_cell"].dense() > 0, sub.T > 0)


def test_cell_budget_equals_the_direct_product_over_the_drawn_genes():
    """Hop 2's budget read from the fewer edges (the drawn genes', or the others' subtracted) is the product."""
    rng = np.random.default_rng(1)
    counts = (rng.random((200, 60)) < 0.3) * rng.integers(1, 5, size=(200, 60))
    counts[:, 59] = 0  # a gene without cells
    counts[5] = 0  # a cell without genes
    graph = CellGeneGraph(counts.astype(np.float32))
    edges = (counts > 0).astype(np.float64)
    inv_gene = 1.0 / np.maximum(edges.sum(0), 1)
    for genes in [np.arange(60), np.arange(55), rng.choice(60, 40, replace=False),  # most genes: subtracted
                  np.array([2, 7, 11]), np.array([], dtype=np.int64)]:  # few genes: read directly
        weights = np.zeros(60)
        weights[genes] = inv_gene[genes]
        expected = edges @ weights
        got = graph.cell_budget(genes)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
        assert np.array_equal(got > 0, expected > 0)  # no rounding residue where a cell has none of the genes


def test_edge_cap_keeps_about_max_neighbors():
    counts = torch.ones(300, 400)  # every cell has 400 genes, every gene 300 cells
    view = CellGeneGraph(counts).view(generator=torch.Generator().manual_seed(0), max_neighbors=50)
    kept = (view["cell_from_gene"].dense() > 0).sum(1).float()
    assert abs(kept.mean().item() - 50) < 2 and (view["gene_from_cell"].dense() > 0).sum(1).float().mean() < 55


def test_sparse_view_step_equals_the_dense_one():
    """A training view on sparse features and graphs: the dense computation's outputs and gradients."""
    adata = make_counts(n_per_type=20, n_types=3, n_genes=40, seed=2)
    counts, _, features, _ = preprocess(adata.X)
    graph = CellGeneGraph(counts)
    generator = torch.Generator().manual_seed(0)
    view = graph.sample(torch.arange(10), (30, 20), generator, max_neighbors=8)
    columns = column_mask(graph.n_genes, 0.2, generator)
    assert 0 < columns.sum() < graph.n_genes
    torch.manual_seed(0)
    module = SCGPCLModule(graph.n_genes, 3, layers=(16, 4))
    cell_x = features[view["cells"]]
    gene_x = lambda: module.gene_embedding.weight[view["genes"]]  # noqa: E731  a graph of its own for each pass
    sparse = module.encode(cell_x, gene_x(), view["cell_from_gene"], view["gene_from_cell"], columns)
    dense = module.encode(cell_x.dense() * columns, gene_x(), view["cell_from_gene"].dense(),
                          view["gene_from_cell"].dense())
    for got, expected in zip(sparse, dense):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    params = [p for p in module.parameters() if p.requires_grad]
    weights = [torch.randn(out.shape) for out in sparse]  # batch norm outputs: a random direction, not a norm
    loss = lambda outs: sum((out * w).sum() for out, w in zip(outs, weights))  # noqa: E731
    grads = torch.autograd.grad(loss(sparse), params, allow_unused=True)
    dense_grads = torch.autograd.grad(loss(dense), params, allow_unused=True)
    assert sum(g is not None and g.abs().max() > 1e-3 for g in grads) >= 8
    for got, expected in zip(grads, dense_grads):
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


def test_instance_nce_equals_the_papers_formula():
    torch.manual_seed(0)
    r1, r2, tau = torch.randn(4, 3), torch.randn(4, 3), 0.25
    sim = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0) / tau  # noqa: E731

    def l(h, h2, i):
        denominator = sum(torch.exp(sim(h[i], h[j])) for j in range(4) if j != i)
        denominator = denominator + sum(torch.exp(sim(h[i], h2[j])) for j in range(4))
        return sim(h[i], h2[i]) - torch.log(denominator)

    direct = -sum(l(r1, r2, i) + l(r2, r1, i) for i in range(4)) / 8
    torch.testing.assert_close(instance_nce(r1, r2, tau), direct)


def test_instance_nce_is_lowest_when_the_views_agree():
    torch.manual_seed(0)
    r1 = torch.randn(16, 8)
    agree = instance_nce(r1, r1.clone(), 0.25)
    assert agree < instance_nce(r1, r1 + 0.5 * torch.randn(16, 8), 0.25)
    assert agree < instance_nce(r1, r1[torch.randperm(16)], 0.25)


def test_proto_nce_equals_direct_formula():
    torch.manual_seed(0)
    rep = torch.randn(5, 3)
    assignments = [torch.tensor([0, 1, 0, 1, 1]), torch.tensor([2, 0, 1, 2, 0])]
    centroids = [torch.randn(2, 3), torch.randn(3, 3)]
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0) / 0.25  # noqa: E731
    total = 0
    for i in range(5):
        for a, c in zip(assignments, centroids):
            total += cos(rep[i], c[a[i]]) - torch.log(sum(torch.exp(cos(rep[i], ck)) for ck in c))
    torch.testing.assert_close(proto_nce(rep, assignments, centroids, 0.25), -total / (5 * 2))
    assert granularities(8) == [8, 12, 16] and granularities(16) == [16, 24, 32] and granularities(1) == [1, 2, 3]


def test_zinb_loss_equals_the_direct_formula():
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, size=(6, 5)).astype(np.float64)
    x[0, :3] = 0
    mean, disp = rng.uniform(0.2, 3, size=(6, 5)), rng.uniform(0.3, 5, size=(6, 5))
    pi, sf = rng.uniform(0.05, 0.6, size=(6, 5)), rng.uniform(0.5, 2, size=6)
    mu = mean * sf[:, None]
    nb = stats.nbinom.pmf(x, disp, disp / (disp + mu))  # NB(x; mean mu, inverse dispersion disp)
    direct = -np.log(np.where(x == 0, pi + (1 - pi) * nb, (1 - pi) * nb)).mean()
    got = zinb_loss(*(torch.tensor(a) for a in (x, mean, disp, pi, sf)))
    assert got.item() == pytest.approx(direct, rel=1e-6)


def test_zinb_loss_on_sparse_counts_equals_the_dense_loss_and_gradients():
    rng = np.random.default_rng(1)
    x = sp.random(30, 40, density=0.15, format="csr", random_state=1)
    x.data = np.ceil(x.data * 6)
    x.data[0] = 0.0  # a stored zero counts as a zero
    assert x.nnz > np.count_nonzero(x.toarray())
    sf = torch.from_numpy(rng.uniform(0.5, 2, size=30))

    def loss_and_grads(counts):
        heads = [torch.tensor(rng_heads, requires_grad=True) for rng_heads in heads0]
        loss = zinb_loss(counts, heads[0], heads[1], torch.sigmoid(heads[2]), sf)
        return loss, torch.autograd.grad(loss, heads)

    heads0 = [rng.uniform(0.2, 3, size=(30, 40)), rng.uniform(0.3, 5, size=(30, 40)), rng.normal(size=(30, 40))]
    dense, dense_grads = loss_and_grads(torch.from_numpy(x.toarray()))
    sparse, sparse_grads = loss_and_grads(CSRCounts(x, dtype=torch.float64))
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=0)
    for got, expected in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


def test_dec_target_sharpens_and_kl_is_direct():
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(50, 4), dim=1)
    p = target_distribution(q)
    entropy = lambda d: -(d * d.log()).sum(1).mean()  # noqa: E731
    assert entropy(p) < entropy(q)
    torch.testing.assert_close(p.sum(1), torch.ones(50))
    p64, q64 = p.double().numpy(), q.double().numpy()
    direct = np.mean([sum(p64[i, k] * np.log(p64[i, k] / (q64[i, k] + 1e-6)) for k in range(4)) for i in range(50)])
    assert dec_kl(p, q).item() == pytest.approx(float(direct), rel=1e-5)


def test_gene_selection_and_preprocessing():
    X = np.zeros((4, 10))
    X[:, :9] = np.arange(1, 37).reshape(4, 9) % 7  # gene 9 has no count
    assert select_genes(X, top_fraction=0.2, min_genes=3).tolist() == sorted(
        np.argsort(X[:, :9].var(0), kind="stable")[::-1][:3].tolist())
    assert select_genes(X, 0.2, min_genes=2000).tolist() == list(range(9))  # all expressed genes
    counts, sf, features, train_stats = preprocess(X[:, :9])
    totals = X.sum(1)
    np.testing.assert_allclose(sf, totals / np.median(totals), rtol=1e-6)
    np.testing.assert_array_equal(counts.toarray(), X[:, :9])
    dense = features[:].dense().numpy()  # (4, 9): kept sparse, made dense here only
    np.testing.assert_allclose(dense.mean(0), 0, atol=1e-5)
    # the training cells' features are scDeepCluster's scale(log1p(x / sf)) (float32 rounding)
    expected = scale(np.log1p(X[:, :9] / (totals / np.median(totals))[:, None]))
    np.testing.assert_allclose(dense, expected, rtol=1e-6, atol=1e-6)
    assert features[:].values.values().numel() == np.count_nonzero(X[:, :9])  # the counts' pattern
    # with the stored statistics a cell's inputs depend on that cell alone
    counts1, sf1, features1, same = preprocess(X[[2], :9], train_stats)
    assert same is train_stats
    np.testing.assert_array_equal(counts1.toarray(), counts[[2]].toarray())
    np.testing.assert_array_equal(sf1, sf[[2]])
    np.testing.assert_array_equal(features1[:].dense().numpy(), dense[[2]])


def test_epoch_budget_follows_the_data_size_above_5000_cells():
    default = SCGPCLConfig()
    assert epoch_budget(default, 5_000) == (200, 100, 200)  # the source's, up to 5,000 cells
    assert epoch_budget(default, 20_000) == (50, 25, 50)  # the steps of 5,000 cells
    assert epoch_budget(default, 100_000) == (10, 5, 10)
    assert epoch_budget(SCGPCLConfig(decay_cells=20_000), 100_000) == (40, 20, 40)  # scvi-tools' rule
    assert epoch_budget(SCGPCLConfig(scale_epochs=False), 100_000) == (200, 100, 200)
    assert epoch_budget(SCGPCLConfig(fine_epochs=0), 5_000) == (200, 100, 0)  # no fine-tuning
    assert epoch_budget(SCGPCLConfig(fine_epochs=0), 10**7) == (1, 0, 0)  # 0 stays 0 (scaled_epochs gives >= 1)
    assert epoch_budget(SCGPCLConfig(epochs=3, warmup=1, fine_epochs=2), 10**7) == (1, 0, 1)


def test_kmeans_above_max_cells_fits_a_subsample_and_assigns_every_cell():
    rng = np.random.default_rng(0)
    truth = rng.integers(4, size=3000)
    rep = torch.from_numpy(rng.normal(size=(4, 8))[truth] * 4 + rng.normal(size=(3000, 8))).float()
    x = rep.double().numpy()
    labels, centres = kmeans_fit(rep, 4, 5, 7, max_cells=3000)  # up to max_cells: sklearn on every cell
    km = KMeans(4, n_init=5, random_state=7).fit(x)
    np.testing.assert_array_equal(labels, km.labels_)
    np.testing.assert_array_equal(centres, km.cluster_centers_)
    labels, centres = kmeans_fit(rep, 4, 5, 7, max_cells=500)  # above: a seeded subsample of 500
    rows = np.random.RandomState(7).choice(3000, 500, replace=False)
    km = KMeans(4, n_init=5, random_state=7).fit(x[rows])
    np.testing.assert_array_equal(centres, km.cluster_centers_)
    nearest = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(labels, nearest)  # every cell, not only the subsample
    assert adjusted_rand_score(truth, labels) > 0.99


def test_planted_clusters_recovered_and_same_seed_same_clusters():
    adata = make_counts(n_per_type=60, n_types=3, n_genes=60, seed=1)
    labels = adata.obs["Celltype"].to_numpy()
    first = SCGPCL(**FAST).fit(adata, labels_key="Celltype", seed=0)
    assert first.n_clusters_ == 3
    pred = first.predict(adata)
    assert adjusted_rand_score(labels, pred) > 0.9
    assert first.history[-1]["phase"] == "finetune" and "proto" in first.history[FAST["warmup"]]
    again = SCGPCL(**FAST).fit(adata, labels_key="Celltype", seed=0)
    np.testing.assert_array_equal(again.predict(adata), pred)
    z = first.get_latent(adata)
    np.testing.assert_array_equal(again.get_latent(adata), z)
    order = np.random.default_rng(0).permutation(adata.n_vars)  # genes are matched by name
    np.testing.assert_array_equal(first.get_latent(adata[:, order].copy()), z)
    with pytest.raises(DataError, match="lacks 30 of the 60 genes"):
        first.get_latent(adata[:, :30])
    with pytest.raises(ValueError, match="unknown precision"):
        SCGPCL(precision="fp8", **FAST).fit(adata, labels_key="Celltype")


def test_without_fine_tuning_the_clusters_are_the_kmeans_of_the_pretrained_latent():
    """``fine_epochs=0``: argmax of the Student-t assignment to k-means' centres is k-means' own
    labels on the latent, and no fine-tuning epoch runs."""
    adata = make_counts(n_per_type=40, n_types=3, n_genes=60, seed=2)
    model = SCGPCL(**{**FAST, "fine_epochs": 0}).fit(adata, n_clusters=3, seed=1)
    assert {row["phase"] for row in model.history} == {"pretrain"} and model.timings_["finetune_epochs"] == 0
    z = model.get_latent(adata)
    km = KMeans(3, n_init=FAST["kmeans_n_init"], random_state=1).fit(z.astype(np.float64))
    np.testing.assert_allclose(model.module_.mu.detach().numpy(), km.cluster_centers_, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.predict(adata), km.labels_)
    assert len(np.unique(km.labels_)) == 3


@pytest.fixture(scope="module")
def split():
    """Planted types: 2/3 of the cells to fit on, the other 1/3 held out (both AnnData)."""
    adata = make_counts(n_per_type=60, n_types=3, n_genes=60, seed=1)
    held = np.zeros(adata.n_obs, dtype=bool)
    held[np.random.default_rng(0).permutation(adata.n_obs)[:adata.n_obs // 3]] = True
    return adata[~held].copy(), adata[held].copy()


@pytest.fixture(scope="module")
def fitted(split):
    """scGPCL fit on the 2/3 without labels (the model is not told of obs['Celltype']), K = 3."""
    return SCGPCL(**FAST).fit(split[0], n_clusters=3, seed=0)


def test_fits_without_labels_and_clusters_new_cells(fitted, split):
    train, held = split
    assert fitted.n_clusters_ == 3 and fitted.module_.mu.shape == (3, FAST["layers"][-1])
    for part in (train, held):  # held-out cells land in the clusters of their planted type
        pred = fitted.predict(part)
        assert pred.dtype == np.int64 and set(np.unique(pred)) <= {0, 1, 2}
        assert adjusted_rand_score(part.obs["Celltype"].to_numpy(), pred) > 0.9
    with pytest.raises(ValueError, match="pass n_clusters"):
        SCGPCL(**FAST).fit(train)
    with pytest.raises(ValueError, match="no setting 'n_clusters'"):
        SCGPCL(n_clusters=3)


def test_training_cells_keep_the_full_graph_embedding(fitted, split):
    """The training cells' latent is the deterministic pass over the whole training graph."""
    train = split[0]
    counts, _, features, stats_ = preprocess(train.X[:, fitted.genes_])
    assert stats_["median_total"] == fitted.median_total_
    np.testing.assert_array_equal(stats_["mean"], fitted.feature_mean_)
    np.testing.assert_array_equal(stats_["scale"], fitted.feature_scale_)
    full = CellGeneGraph(counts).view()
    module = fitted.module_
    with torch.no_grad():
        z, states = module.encode(features[:], module.gene_embedding.weight, full["cell_from_gene"],
                                  full["gene_from_cell"])
    np.testing.assert_array_equal(module.gene_states.numpy(), states.numpy())
    np.testing.assert_allclose(fitted.get_latent(train), z.numpy(), rtol=1e-5, atol=1e-5)


def test_new_cells_embed_independently_of_the_cells_passed_with_them(fitted, split):
    train, held = split
    z = fitted.get_latent(held)
    assert z.shape == (held.n_obs, FAST["layers"][-1]) and np.isfinite(z).all()
    close = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fitted.get_latent(held[[0]].copy()), z[[0]], **close)  # alone
    np.testing.assert_allclose(fitted.get_latent(held[:5].copy()), z[:5], **close)
    np.testing.assert_allclose(fitted.get_latent(held[::-1].copy())[::-1], z, **close)
    with_train = fitted.get_latent(anndata.concat([held[:5], train]))  # among the training cells
    np.testing.assert_allclose(with_train[:5], z[:5], **close)
    np.testing.assert_allclose(with_train[5:], fitted.get_latent(train), **close)


def test_save_load_is_bit_identical(fitted, split, tmp_path):
    train, held = split
    fitted.save(tmp_path / "scgpcl")
    loaded = SCGPCL.load(tmp_path / "scgpcl", device="cpu")
    assert type(load_model(tmp_path / "scgpcl", device="cpu")) is SCGPCL
    np.testing.assert_array_equal(loaded.genes_, fitted.genes_)
    assert loaded.n_clusters_ == 3 and loaded.median_total_ == fitted.median_total_
    assert loaded.timings_ == fitted.timings_
    for part in (train, held):
        np.testing.assert_array_equal(loaded.get_latent(part), fitted.get_latent(part))
        np.testing.assert_array_equal(loaded.predict(part), fitted.predict(part))


def test_real_data_short_run(data_root):
    from cellembed.data import load_dataset

    adata = load_dataset("mouse_bladder", data_root=data_root)[::4].copy()  # 687 cells, 2003 genes
    model = SCGPCL(epochs=2, warmup=1, fine_epochs=1, batch_size=256, num_samples=(2048, 256),
                   device="auto").fit(adata, seed=0)  # labels (and K) from load_dataset's obs['Celltype']
    z = model.get_latent(adata)
    assert z.shape == (adata.n_obs, 64) and np.isfinite(z).all()
    pred = model.predict(adata)
    assert pred.shape == (adata.n_obs,) and set(np.unique(pred)) <= set(range(model.n_clusters_))
    assert adjusted_rand_score(adata.obs["Celltype"].to_numpy(), pred) > 0.2  # random: ~0
