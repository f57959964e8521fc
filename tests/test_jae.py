"""JAE (models/jae.py): its preprocessing, latent slices, losses, input checks, and short real runs."""

import math
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.decomposition import TruncatedSVD

from models import get_model
from models.jae import (JAE, JointFeatures, PCAJoint, cell_cycle_genes, cell_cycle_scores, jae_loss,
                        log10_normalize, markers_present, uniform_batch_loss)

FAST = dict(epochs=3, n_components=10)


def multimodal(n_per_type=30, n_types=3, n_genes=80, n_prot=12, batch=True, genes=None, seed=0):
    """Planted types in both modalities: RNA counts in X, protein counts in obsm['mod2']."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_types), n_per_type)
    rates = rng.gamma(0.6, 1.0, (n_types, n_genes))
    prot = rng.gamma(2.0, 5.0, (n_types, n_prot))
    for t in range(n_types):
        rates[t, t * (n_genes // n_types):(t + 1) * (n_genes // n_types)] += 4.0
        prot[t, t * (n_prot // n_types):(t + 1) * (n_prot // n_types)] += 60.0
    X = rng.poisson(rates[labels]).astype(np.float32)
    X[X.sum(1) == 0, 0] = 1
    var = pd.DataFrame(index=genes if genes is not None else [f"g{j}" for j in range(n_genes)])
    adata = anndata.AnnData(X=sp.csr_matrix(X), var=var)
    adata.obs_names = [f"c{i}" for i in range(labels.size)]
    adata.obs["Celltype"] = pd.Categorical([f"type{t}" for t in labels])
    if batch:
        adata.obs["batch"] = pd.Categorical(rng.integers(0, 2, labels.size).astype(str))
    adata.obsm["mod2"] = rng.poisson(prot[labels]).astype(np.float32)
    adata.uns["mod2"] = {"modality": "ADT", "features": [f"p{j}" for j in range(n_prot)]}
    adata.uns["dataset"] = {"name": "planted"}
    return adata


def with_cell_cycle_genes(n_genes=80):
    table = cell_cycle_genes()
    names = list(table[table.phase == "S"].gene_name[:6]) + list(table[table.phase == "G2M"].gene_name[:6])
    return names + [f"g{j}" for j in range(n_genes - len(names))]


def test_the_marker_list_holds_43_s_and_54_g2m_genes():
    table = cell_cycle_genes()
    assert (table.phase == "S").sum() == 43 and (table.phase == "G2M").sum() == 54
    assert table.gene_name.is_unique and table.gene_id.str.startswith("ENSG").all()
    assert list(table.gene_name[:3]) == ["MCM5", "PCNA", "TYMS"] and table.gene_name.iloc[-1] == "CENPA"


def test_log10_normalization_equals_the_direct_numpy_computation():
    rng = np.random.default_rng(1)
    X = rng.poisson(2.0, (20, 15)).astype(np.float64)
    X[3] = 0  # an empty cell stays zero
    direct = np.log10(1 + 1e4 * X / np.maximum(X.sum(1, keepdims=True), 1))
    np.testing.assert_allclose(log10_normalize(sp.csr_matrix(X)), direct, rtol=1e-6)
    np.testing.assert_allclose(log10_normalize(X), direct, rtol=1e-6)


def test_joint_features_are_svd_of_rna_and_the_unreduced_proteins():
    adata = multimodal()
    feats = JointFeatures(n_components=10, reduce_mod2=False, seed=123).fit(adata.X, adata.obsm["mod2"])
    Z = feats.transform(adata.X, adata.obsm["mod2"])
    X = adata.X.toarray().astype(np.float64)
    rna = np.log10(1 + 1e4 * X / X.sum(1, keepdims=True))
    P = adata.obsm["mod2"].astype(np.float64)
    prot = np.log10(1 + 1e4 * P / P.sum(1, keepdims=True))
    svd = TruncatedSVD(10, random_state=123).fit(rna)
    assert Z.shape == (adata.n_obs, 10 + 12)
    np.testing.assert_allclose(Z[:, :10], svd.transform(rna), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(Z[:, 10:], prot, rtol=1e-5, atol=1e-6)
    atac = JointFeatures(n_components=5, reduce_mod2=True, seed=123).fit(adata.X, adata.obsm["mod2"])
    assert atac.transform(adata.X, adata.obsm["mod2"]).shape == (adata.n_obs, 10)


def test_uniform_batch_loss_is_minimal_at_a_uniform_prediction():
    for k in (2, 5):
        uniform = torch.zeros(4, k)
        assert uniform_batch_loss(uniform).item() == pytest.approx(math.log(k))
        rng = torch.Generator().manual_seed(0)
        for _ in range(20):
            other = torch.randn(4, k, generator=rng) * 3
            assert uniform_batch_loss(other).item() >= math.log(k) - 1e-6
        confident = torch.tensor([[5.0] + [0.0] * (k - 1)])
        assert uniform_batch_loss(confident).item() > math.log(k) + 0.1
    logits = torch.zeros(3, 2, requires_grad=True)
    uniform_batch_loss(logits).backward()
    assert torch.allclose(logits.grad, torch.zeros(3, 2))  # a stationary point


def test_loss_is_the_weighted_sum_of_its_four_direct_terms():
    slices = {"type": (0, 3), "batch": (3, 5), "phase": (5, 7), "free": (7, 12)}
    torch.manual_seed(0)
    x = torch.rand(6, 9)
    z, recon = torch.randn(6, 12), torch.randn(6, 9)
    types, phase = torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(6, 2)
    loss, parts = jae_loss(slices, (0.7, 0.2, 0.05, 0.05))(lambda inp: (z, recon), (x, types, phase), 1.0)
    rec = ((recon - x) ** 2).mean()
    ce = -torch.log_softmax(z[:, :3], 1)[torch.arange(6), types].mean()
    uni = -torch.log_softmax(z[:, 3:5], 1).mean()
    ph = ((z[:, 5:7] - phase) ** 2).mean()
    assert loss.item() == pytest.approx((0.7 * rec + 0.2 * ce + 0.05 * uni + 0.05 * ph).item(), rel=1e-6)
    assert parts["ce_batch"] == pytest.approx(uni.item())


def test_latent_slices_have_the_sizes_types_batches_phase_free():
    adata = multimodal(genes=with_cell_cycle_genes())
    model = JAE(**FAST).fit(adata, seed=0)
    z = model.get_latent(adata)
    assert model.slices == {"type": (0, 3), "batch": (3, 5), "phase": (5, 7), "free": (7, 12)}
    assert z.shape == (adata.n_obs, 3 + 2 + 2 + 5)
    assert (z >= 0).all()  # the source's ReLU latent
    np.testing.assert_array_equal(z, model.get_latent(adata))  # deterministic
    z2 = JAE(**FAST).fit(adata, seed=0).get_latent(adata)
    np.testing.assert_array_equal(z, z2)  # same seed, same numbers
    assert not np.array_equal(z, JAE(**FAST).fit(adata, seed=1).get_latent(adata))
    assert JAE.supervised and get_model("jae") is JAE and get_model("pca_joint") is PCAJoint


def test_no_batch_column_and_no_markers_turn_those_heads_off():
    adata = multimodal(batch=False)  # gene names g0.., as in an .h5 file: no cell-cycle marker
    with pytest.warns(UserWarning, match="no S or no G2M cell-cycle marker"):
        model = JAE(**FAST).fit(adata, seed=0)
    assert model.slices["batch"] is None and model.slices["phase"] is None
    assert model.get_latent(adata).shape == (adata.n_obs, 3 + 5)
    assert all("ce_batch" not in row and "phase" not in row for row in model.history)


def test_cell_cycle_scores_are_scanpys_on_the_scaled_log_expression():
    import scanpy as sc

    from a4.preprocessing import log_normalize, scale

    adata = multimodal(genes=with_cell_cycle_genes())
    scores = cell_cycle_scores(adata.X, adata.var_names, seed=0)
    ref = anndata.AnnData(scale(log_normalize(adata.X)), var=pd.DataFrame(index=adata.var_names))
    sc.tl.score_genes_cell_cycle(ref, s_genes=markers_present(adata.var_names, "S"),
                                 g2m_genes=markers_present(adata.var_names, "G2M"))
    np.testing.assert_allclose(scores, ref.obs[["S_score", "G2M_score"]].to_numpy(), rtol=1e-5)
    assert len(markers_present(adata.var_names, "S")) == 6
    assert cell_cycle_scores(adata.X, [f"x{j}" for j in range(adata.n_vars)]) is None


def test_one_modality_and_mismatched_cells_give_one_clear_error():
    adata = multimodal()
    rna_only = adata.copy()
    del rna_only.obsm["mod2"]
    for model in (JAE(**FAST), PCAJoint()):
        with pytest.raises(ValueError, match="'planted' has one modality; JAE needs two"):
            model.fit(rna_only)
    feats = JointFeatures(n_components=5)
    with pytest.raises(ValueError, match=r"different cells \(90 RNA vs 89 mod2 rows\)"):
        feats.fit(adata.X, adata.obsm["mod2"][:89])
    feats.fit(adata.X, adata.obsm["mod2"])
    with pytest.raises(ValueError, match="different cells"):
        feats.transform(adata.X[:10], adata.obsm["mod2"])
    with pytest.raises(ValueError, match="RNA has 79 features, the model was fitted on 80"):
        feats.transform(adata.X[:, :79], adata.obsm["mod2"])


def test_jae_separates_planted_types_better_than_chance():
    from a4.metrics import clustering_scores

    adata = multimodal(seed=2)
    with pytest.warns(UserWarning, match="cell-cycle marker"):
        z = JAE(epochs=12, lr=3e-3, n_components=10).fit(adata, seed=0).get_latent(adata)
    assert clustering_scores(z, adata.obs["Celltype"], seed=0)["ari_kmeans"] > 0.9
    base = PCAJoint(n_dims=5).fit(adata).get_latent(adata)
    assert base.shape == (adata.n_obs, 5)
    assert clustering_scores(base, adata.obs["Celltype"], seed=0)["ari_kmeans"] > 0.9


@pytest.mark.parametrize("name, n_types", [("neurips_cite", 41), ("neurips_multiome", 21)])
def test_short_run_on_the_real_subsets(name, n_types, data_root):
    from a4.data import load_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = load_dataset(name, data_root=data_root)
    model = JAE(epochs=1).fit(adata, seed=0)
    z = model.get_latent(adata)
    assert model.slices["type"] == (0, n_types) and model.slices["batch"] == (n_types, n_types + 2)
    assert z.shape == (adata.n_obs, n_types + 2 + 2 + 5)
    assert len(model.history) == 1 and np.isfinite(model.history[-1]["valid_loss"])
    n_rna = 100
    n_mod2 = adata.obsm["mod2"].shape[1] if name == "neurips_cite" else 100
    assert model.features.transform(adata.X, adata.obsm["mod2"]).shape == (adata.n_obs, n_rna + n_mod2)
