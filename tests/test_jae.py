"""JAE and the PCA baseline (cellembed/models/jae.py): preprocessing, latent slices, losses, input
checks, new cells, save / load, and short real runs."""

import math
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.decomposition import PCA, TruncatedSVD

from cellembed.data import DataError
from cellembed.data.markers import cell_cycle_genes, markers_present
from cellembed.models import get_model, load_model
from cellembed.models.jae import (JAE, PCAJoint, cell_cycle_scores, jae_loss, joint_features, log10_normalize,
                                  normalized_blocks, svd_loadings, uniform_batch_loss)
from cellembed.preprocessing import column_sd, dense
from tests.conftest import make_counts

FAST = dict(epochs=3, n_components=10)
HELD_OUT = dict(epochs=12, lr=3e-3, n_components=10)  # enough to learn the planted types


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
    adata.uns["dataset"] = {"name": "planted"}  # as load_dataset's: its Celltype and batch are read
    return adata


def with_cell_cycle_genes(n_genes=80):
    table = cell_cycle_genes()
    names = list(table[table.phase == "S"].gene_name[:6]) + list(table[table.phase == "G2M"].gene_name[:6])
    return names + [f"g{j}" for j in range(n_genes - len(names))]


@pytest.fixture(scope="module")
def counts():
    """tests/test_registry.py's two-modality counts: a user's AnnData (labels only when asked for)."""
    adata = make_counts(n_per_type=30, n_genes=40)
    rng = np.random.default_rng(7)
    adata.obsm["mod2"] = rng.poisson(5.0, size=(adata.n_obs, 12)).astype(np.float32)
    adata.uns["mod2"] = {"modality": "ADT", "features": [f"adt{i}" for i in range(12)]}
    adata.obs_names = [f"c{i}" for i in range(adata.n_obs)]
    return adata


def split(adata):
    """Every third cell held out (each type in both parts): (fit cells, held-out cells)."""
    held = np.arange(adata.n_obs) % 3 == 2
    return adata[~held].copy(), adata[held].copy()


@pytest.fixture(scope="module")
def fitted(counts):
    """``jae`` (ADT), ``jae_atac`` (the second modality reduced too) and ``pca_joint``, fit on 2/3 of ``counts``."""
    atac = counts.copy()
    atac.uns["mod2"] = {"modality": "ATAC"}
    models = {}
    for key, data in (("jae", counts), ("jae_atac", atac)):
        with pytest.warns(UserWarning, match="no S or no G2M cell-cycle marker"):  # genes 0..39: no symbols
            models[key] = JAE(**HELD_OUT, device="cpu").fit(split(data)[0], labels_key="Celltype",
                                                          batch_key="batch", seed=0)
    models["pca_joint"] = PCAJoint(n_dims=5).fit(split(counts)[0], seed=0)
    return models


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
    from_sparse = log10_normalize(sp.csr_matrix(X))
    assert sp.issparse(from_sparse) and from_sparse.nnz == np.count_nonzero(X)  # nothing made dense
    np.testing.assert_allclose(log10_normalize(X), direct, rtol=1e-6)
    np.testing.assert_array_equal(from_sparse.toarray(), log10_normalize(X))  # the same values either way


def test_joint_features_are_truncated_svd_of_rna_and_the_unreduced_proteins():
    adata = multimodal()
    rna, prot = log10_normalize(adata.X), log10_normalize(adata.obsm["mod2"])
    loadings = svd_loadings(rna, 10, seed=123)
    Z = joint_features(rna, prot, loadings)
    X = adata.X.toarray().astype(np.float64)
    P = adata.obsm["mod2"].astype(np.float64)
    direct_rna = np.log10(1 + 1e4 * X / X.sum(1, keepdims=True))
    svd = TruncatedSVD(10, random_state=123).fit(direct_rna)
    assert loadings.shape == (80, 10) and loadings.flags.c_contiguous
    assert Z.shape == (adata.n_obs, 10 + 12) and Z.dtype == np.float32
    np.testing.assert_allclose(Z[:, :10], svd.transform(direct_rna), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(Z[:, 10:], np.log10(1 + 1e4 * P / P.sum(1, keepdims=True)), rtol=1e-5, atol=1e-6)
    reduced = joint_features(rna, prot, svd_loadings(rna, 5, 123), svd_loadings(prot, 5, 123))
    assert reduced.shape == (adata.n_obs, 5 + 5)  # ATAC: both modalities reduced
    assert svd_loadings(prot, 100, 123).shape == (12, 11)  # capped below the number of features


def test_jae_trains_the_scaled_epochs_and_keeps_sparse_counts_sparse(monkeypatch):
    from cellembed.data import minibatch

    monkeypatch.setattr(minibatch, "EPOCHS_DECAY_CELLS", 45)  # 90 cells: half the epochs
    adata = multimodal()
    assert len(JAE(epochs=6, n_components=10, patience=100).fit(adata, seed=0).history) == 3
    assert len(JAE(epochs=6, n_components=10, patience=100, scale_epochs=False).fit(adata, seed=0).history) == 6
    rna, _ = normalized_blocks(adata, "JAE", 1e4)
    assert sp.issparse(rna) and rna.nnz == adata.X.nnz  # no dense N x M copy before the SVD


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
    assert model.slices_ == {"type": [0, 3], "batch": [3, 5], "phase": [5, 7], "free": [7, 12]}
    assert model.cell_types_ == ["type0", "type1", "type2"]
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
    assert model.slices_["batch"] is None and model.slices_["phase"] is None
    assert model.get_latent(adata).shape == (adata.n_obs, 3 + 5)
    assert all("ce_batch" not in row and "phase" not in row for row in model.history)


@pytest.mark.parametrize("genes_per_block", [None, 2, 3])  # None: all 80 genes in one block
def test_cell_cycle_scores_are_scanpys_on_the_scaled_log_expression(genes_per_block, monkeypatch):
    import scanpy as sc

    import cellembed.models.jae as jae
    from cellembed.preprocessing import log_normalize, scale

    adata = multimodal(genes=with_cell_cycle_genes())
    if genes_per_block:  # the gene means from blocks of 2 or 3 genes (80 = 26 x 3 + 2: 4-gene blocks too)
        monkeypatch.setattr(jae, "CHUNK", genes_per_block * adata.n_obs)
    scores = cell_cycle_scores(adata.X, adata.var_names, seed=0)
    ref = anndata.AnnData(scale(log_normalize(adata.X)), var=pd.DataFrame(index=adata.var_names))
    sc.tl.score_genes_cell_cycle(ref, s_genes=markers_present(adata.var_names, "S"),
                                 g2m_genes=markers_present(adata.var_names, "G2M"))
    expected = ref.obs[["S_score", "G2M_score"]].to_numpy(np.float32)
    np.testing.assert_array_equal(scores, expected)  # scanpy's numbers bit for bit, without the dense N x M input
    np.testing.assert_array_equal(cell_cycle_scores(adata.X.toarray(), adata.var_names, seed=0), expected)
    assert len(markers_present(adata.var_names, "S")) == 6
    assert cell_cycle_scores(adata.X, [f"x{j}" for j in range(adata.n_vars)]) is None


def test_one_modality_is_one_clear_error():
    rna_only = multimodal()
    del rna_only.obsm["mod2"]
    for model in (JAE(**FAST), PCAJoint()):
        with pytest.raises(DataError, match=rf"adata: has one modality; {type(model).__name__} needs two .*"
                                            r"obsm\['mod2'\]"):
            model.fit(rna_only)


def test_fit_without_labels_key_is_a_data_error(counts):
    with pytest.raises(DataError, match="JAE is supervised .*pass labels_key=COLUMN"):
        JAE(epochs=1).fit(counts, seed=0)  # a user's AnnData: its Celltype column is not read unasked
    assert PCAJoint(n_dims=3).fit(counts).get_latent(counts).shape == (counts.n_obs, 3)  # unsupervised


@pytest.mark.parametrize("key", ["jae", "jae_atac", "pca_joint"])
def test_held_out_cells_are_embedded_each_on_its_own(key, fitted, counts):
    model = fitted[key]
    fit_cells, held = split(counts)
    z = model.get_latent(held)
    assert z.shape == (held.n_obs, model.get_latent(fit_cells).shape[1]) and np.isfinite(z).all()
    np.testing.assert_allclose(model.get_latent(held[7:19]), z[7:19], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_latent(held[[4]]), z[[4]], rtol=1e-5, atol=1e-6)
    mixed = anndata.concat([held[:5], fit_cells[:30]])  # other cells beside them change nothing
    np.testing.assert_allclose(model.get_latent(mixed)[:5], z[:5], rtol=1e-5, atol=1e-6)
    fewer = held.copy()
    fewer.obsm["mod2"] = fewer.obsm["mod2"][:, :11]
    with pytest.raises(DataError, match=rf"obsm\['mod2'\] holds 11 features; {type(model).__name__} was fit on 12"):
        model.get_latent(fewer)


def test_jae_tells_the_types_of_held_out_cells(fitted, counts):
    model, atac = fitted["jae"], fitted["jae_atac"]
    _, held = split(counts)
    assert next(model.module_.parameters()).device == model.device_ == torch.device("cpu")
    assert model.svd_rna_loadings_.shape == atac.svd_rna_loadings_.shape == (40, 10)
    assert model.svd_mod2_loadings_ is None and atac.svd_mod2_loadings_.shape == (12, 10)  # ADT unreduced
    assert model.module_.decoder[-2].out_features == 10 + 12 and atac.module_.decoder[-2].out_features == 10 + 10
    logits = model.get_latent(held)[:, slice(*model.slices_["type"])]  # the cell-type head
    predicted = np.asarray(model.cell_types_)[logits.argmax(1)]
    assert (predicted == held.obs["Celltype"].astype(str).to_numpy()).mean() > 0.9  # chance: 1/3


def test_column_sd_is_numpys_std_of_the_dense_matrix(monkeypatch):
    import cellembed.preprocessing as pre

    rng = np.random.default_rng(3)
    X = rng.poisson(0.5, size=(40, 7)).astype(np.float32) * 3.1
    X[:, 2] = 0.0  # no stored entry
    X[:, 5] = 2.5  # constant: sd 0
    want = X.astype(np.float64).std(axis=0)
    monkeypatch.setattr(pre, "CHUNK", 5)  # the stored entries in several chunks
    for given in (X, sp.csr_matrix(X), sp.csc_matrix(X)):
        np.testing.assert_allclose(column_sd(given), want, rtol=1e-12, atol=1e-12)
    assert column_sd(X)[2] == 0.0 and column_sd(X)[5] < 1e-12


def test_pca_joint_projects_any_cells_as_sklearns_pca_of_the_fit_cells():
    adata = multimodal()
    fit_cells, held = split(adata)
    model = PCAJoint(n_dims=4, hvg_sel=20).fit(fit_cells)
    assert model.features_rna_.shape == (20,) and model.features_mod2_.shape == (12,)  # all 12 proteins kept

    def selected(data):  # dense float64: the oracle
        rna, prot = dense(log10_normalize(data.X), np.float64), dense(log10_normalize(data.obsm["mod2"]), np.float64)
        return np.hstack([rna[:, model.features_rna_], prot])

    rna = dense(log10_normalize(fit_cells.X), np.float64)
    np.testing.assert_array_equal(model.features_rna_, np.sort(np.argsort(-rna.std(0), kind="stable")[:20]))
    pca = PCA(n_components=4, svd_solver="full").fit(selected(fit_cells))
    assert model.loadings_.shape == (20 + 12, 4) and model.mean_.shape == (20 + 12,)
    for cells in (fit_cells, held):  # float32 latents against the dense float64 PCA (sign included)
        np.testing.assert_allclose(model.get_latent(cells), pca.transform(selected(cells)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", ["jae", "jae_atac", "pca_joint"])
def test_save_and_load_give_the_same_latent_bit_for_bit(key, fitted, counts, tmp_path):
    model = fitted[key]
    _, held = split(counts)
    model.save(tmp_path / key)
    loaded = load_model(tmp_path / key, device="cpu")
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(loaded.get_latent(held), model.get_latent(held))
    np.testing.assert_array_equal(loaded.get_latent(counts), model.get_latent(counts))
    fitted_state = [k for k in vars(model) if k.endswith("_") and k not in ("module_", "device_")]
    for name in fitted_state:
        saved, back = getattr(model, name), getattr(loaded, name)
        if isinstance(saved, np.ndarray):
            np.testing.assert_array_equal(back, saved)
        elif isinstance(saved, pd.Index):
            assert back.equals(saved)
        else:
            assert back == saved, name
    assert loaded.history == model.history


def test_jae_separates_planted_types_better_than_chance():
    from cellembed.evaluation.metrics import clustering_scores

    adata = multimodal(seed=2)
    with pytest.warns(UserWarning, match="cell-cycle marker"):
        z = JAE(**HELD_OUT).fit(adata, seed=0).get_latent(adata)
    assert clustering_scores(z, adata.obs["Celltype"], seed=0)["ari_kmeans"] > 0.9
    base = PCAJoint(n_dims=5).fit(adata).get_latent(adata)
    assert base.shape == (adata.n_obs, 5)
    assert clustering_scores(base, adata.obs["Celltype"], seed=0)["ari_kmeans"] > 0.9


@pytest.mark.parametrize("name, n_types", [("neurips_cite", 41), ("neurips_multiome", 21)])
def test_short_run_on_the_real_subsets(name, n_types, data_root):
    from cellembed.data import load_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = load_dataset(name, data_root=data_root)
    model = JAE(epochs=1).fit(adata, seed=0)
    z = model.get_latent(adata)
    assert model.slices_["type"] == [0, n_types] and model.slices_["batch"] == [n_types, n_types + 2]
    assert z.shape == (adata.n_obs, n_types + 2 + 2 + 5)
    assert len(model.history) == 1 and np.isfinite(model.history[-1]["valid_loss"])
    assert model.svd_rna_loadings_.shape == (adata.n_vars, 100)
    n_mod2 = adata.obsm["mod2"].shape[1]
    assert model.n_mod2_ == n_mod2
    if name == "neurips_cite":  # proteins unreduced
        assert model.svd_mod2_loadings_ is None
    else:
        assert model.svd_mod2_loadings_.shape == (n_mod2, 100)
