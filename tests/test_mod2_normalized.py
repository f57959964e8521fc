"""Public CITE-seq files as they are shipped: CLR-normalized protein counts are read as a normalized
second modality (detected or named), whose normalization the models then skip; the RNA counts must
still be raw."""

import h5py
import numpy as np
import pytest

from cellembed import get_model
from cellembed.data import DataError, DataWarning, load_dataset
from cellembed.models.jae import log10_normalize, normalized_blocks
from cellembed.preprocessing import dense


def clr(counts):
    """Seurat's CLR per cell: log1p(x) - mean over proteins of log1p(x)."""
    logs = np.log1p(counts)
    return logs - logs.mean(axis=1, keepdims=True)


@pytest.fixture
def cite_h5(tmp_path):
    """An scDeepCluster-layout CITE-seq .h5: raw RNA counts X, labels Y, CLR-normalized proteins ADT_X."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    rates = rng.gamma(0.6, 1.0, size=(3, 50)) + 3.0 * np.eye(3).repeat(17, axis=1)[:, :50]
    X = rng.poisson(rates[labels]).astype(np.float64)
    X[X.sum(1) == 0, 0] = 1
    adt = clr(rng.poisson(5.0 + 20.0 * np.eye(3)[labels].repeat(4, axis=1)).astype(np.float64))  # (120, 12)
    path = tmp_path / "cite.h5"
    with h5py.File(path, "w") as f:
        f["X"], f["Y"], f["ADT_X"] = X, labels, adt
    return path, X, adt


def test_clr_proteins_are_detected_and_kept_as_they_are(cite_h5):
    path, _, adt = cite_h5
    with pytest.warns(DataWarning, match=r"ADT_X holds negative values .*read as already normalized, its "
                                         r"normalization skipped \(the RNA counts stay raw\)"):
        adata = load_dataset(path)
    assert adata.uns["mod2"]["normalized"] is True
    np.testing.assert_array_equal(adata.obsm["mod2"], adt.astype(np.float32))
    with pytest.raises(DataError, match=r"ADT_X holds negative values .* not raw counts; .*--mod2-normalized"):
        load_dataset(path, mod2_normalized=False)


def test_the_models_skip_only_the_normalized_modalitys_normalization(cite_h5):
    path, X, adt = cite_h5
    adata = load_dataset(path, mod2_normalized=True)  # named: no warning needed
    rna, mod2 = normalized_blocks(adata, "PCAJoint", 1e4)
    np.testing.assert_array_equal(mod2, adt.astype(np.float32))  # as given
    np.testing.assert_array_equal(dense(rna), log10_normalize(X, 1e4))  # the RNA still normalized
    model = get_model("pca_joint")(hvg_sel=20).fit(adata)
    assert np.isfinite(model.get_latent(adata)).all()
    jae = get_model("jae")(epochs=2).fit(adata, labels_key="Celltype", seed=0)
    assert jae.get_latent(adata).shape[0] == adata.n_obs


def test_raw_protein_counts_are_still_normalized(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "raw.h5"
    with h5py.File(path, "w") as f:
        f["X"], f["Y"] = rng.poisson(2.0, size=(30, 20)) + 1, np.repeat([0, 1], 15)
        f["ADT_X"] = rng.poisson(5.0, size=(30, 6))
    adata = load_dataset(path)
    assert adata.uns["mod2"]["normalized"] is False
    _, mod2 = normalized_blocks(adata, "JAE", 1e4)
    np.testing.assert_array_equal(dense(mod2), log10_normalize(adata.obsm["mod2"], 1e4))


def test_normalized_rna_is_still_refused(cite_h5, tmp_path):
    _, X, adt = cite_h5
    path = tmp_path / "lognorm.h5"
    with h5py.File(path, "w") as f:
        f["X"], f["Y"], f["ADT_X"] = np.log1p(X), np.repeat([0, 1, 2], 40), adt
    with pytest.raises(DataError, match=r"X holds normalized values"):
        load_dataset(path, mod2_normalized=True)
