"""scGPCL (models/scgpcl.py): graph, losses against direct formulas, planted clusters, real data."""


import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import adjusted_rand_score

from a4.likelihoods import zinb_loss
from models.scgpcl import (SCGPCL, CellGeneGraph, dec_kl, granularities, instance_nce, preprocess,
                           proto_nce, select_genes, target_distribution)
from tests.conftest import make_counts

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
    torch.testing.assert_close(view["cell_from_gene"] > 0, sub > 0)
    torch.testing.assert_close(view["gene_from_cell"] > 0, sub.T > 0)


def test_edge_cap_keeps_about_max_neighbors():
    counts = torch.ones(300, 400)  # every cell has 400 genes, every gene 300 cells
    view = CellGeneGraph(counts).view(generator=torch.Generator().manual_seed(0), max_neighbors=50)
    kept = (view["cell_from_gene"] > 0).sum(1).float()
    assert abs(kept.mean().item() - 50) < 2 and (view["gene_from_cell"] > 0).sum(1).float().mean() < 55


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
    counts, sf, features = preprocess(X[:, :9])
    totals = X.sum(1)
    np.testing.assert_allclose(sf, totals / np.median(totals), rtol=1e-6)
    np.testing.assert_allclose(features.mean(0), 0, atol=1e-5)


def test_planted_clusters_recovered_and_same_seed_same_clusters():
    adata = make_counts(n_per_type=60, n_types=3, n_genes=60, seed=1)
    labels = adata.obs["Celltype"].to_numpy()
    first = SCGPCL(**FAST).fit(adata, seed=0)
    pred = first.predict(adata)
    assert adjusted_rand_score(labels, pred) > 0.9
    assert first.history[-1]["phase"] == "finetune" and "proto" in first.history[FAST["warmup"]]
    again = SCGPCL(**FAST).fit(adata, seed=0)
    np.testing.assert_array_equal(again.predict(adata), pred)
    np.testing.assert_array_equal(again.get_latent(adata), first.get_latent(adata))
    with pytest.raises(ValueError, match="fitted on 60 genes"):
        first.get_latent(adata[:, :30])
    with pytest.raises(ValueError, match="precision must be"):
        SCGPCL(precision="fp8", **FAST).fit(adata)


def test_real_data_short_run(data_root):
    from a4.data import load_dataset

    adata = load_dataset("mouse_bladder", data_root=data_root)[::4].copy()  # 687 cells, 2003 genes
    model = SCGPCL(epochs=2, warmup=1, fine_epochs=1, batch_size=256, num_samples=(2048, 256)).fit(adata, seed=0)
    z = model.get_latent(adata)
    assert z.shape == (adata.n_obs, 64) and np.isfinite(z).all()
    pred = model.predict(adata)
    assert pred.shape == (adata.n_obs,) and set(np.unique(pred)) <= set(range(model.n_clusters_))
    assert adjusted_rand_score(adata.obs["Celltype"].to_numpy(), pred) > 0.2  # random: ~0
