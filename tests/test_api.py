"""The Python API as a scanpy user meets it: a user-style AnnData (log-normalized X, counts in a
layer, own keys) gives the latent compare.py gives on the same file; wrong input is one clear
error; saved models load; the package imports from outside the repository."""

import os
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import compare
from cellembed import get_model, load_model
from cellembed.data import DataError
from cellembed.datasets import demo_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def user_adata():
    """The bundled real PBMC 3k cells as a scanpy user keeps them: log-normalized X, counts in a layer."""
    demo = anndata.read_h5ad(demo_path())
    adata = anndata.AnnData(X=demo.X.astype(np.float32), obs=pd.DataFrame(index=demo.obs_names),
                            var=pd.DataFrame(index=demo.var_names))
    adata.layers["counts"] = demo.X.copy()
    adata.obs["my_type"] = demo.obs["cell_type"].astype(str).to_numpy()
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 2, "a", "b")
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


@pytest.fixture(scope="module")
def compare_run(user_adata, tmp_path_factory):
    """compare.py on the user's file, with --save-models."""
    folder = tmp_path_factory.mktemp("user")
    path = folder / "cells.h5ad"
    user_adata.write_h5ad(path)
    code = compare.main(["--data", str(path), "--layer", "counts", "--label-key", "my_type", "--batch-key", "donor",
                         "--models", "pca,vae:epochs=3,gmvae:epochs=2", "--seeds", "0", "--no-tsne",
                         "--save-models", "--device", "cpu", "--out", str(folder / "out")])
    assert code == 0
    return folder / "out" / "cells"


@pytest.mark.parametrize("name, key, options", [("pca", "X_pca", {}), ("vae", "X_vae_epochs_3", {"epochs": 3})])
def test_api_gives_compare_pys_latent_on_the_same_file(user_adata, compare_run, name, key, options):
    model = get_model(name)(**options).fit(user_adata, layer="counts", labels_key="my_type", batch_key="donor",
                                           seed=0)
    expected = anndata.read_h5ad(compare_run / "embeddings.h5ad").obsm[key]
    np.testing.assert_allclose(model.get_latent(user_adata, layer="counts"), expected, rtol=1e-6, atol=1e-6)


def test_saved_models_of_compare_py_load_and_give_its_latent(user_adata, compare_run):
    embeddings = anndata.read_h5ad(compare_run / "embeddings.h5ad")
    for folder, key in (("vae_epochs_3", "X_vae_epochs_3"), ("gmvae_epochs_2", "X_gmvae_epochs_2")):
        model = load_model(compare_run / "models" / folder, device="cpu")
        np.testing.assert_array_equal(model.get_latent(user_adata, layer="counts"), embeddings.obsm[key])
    gmvae = load_model(compare_run / "models" / "gmvae_epochs_2")
    assert gmvae.n_clusters_ == 9  # the labelled classes of the file
    own = embeddings.obs["gmvae_epochs_2_clusters"].astype(int).to_numpy()
    np.testing.assert_array_equal(gmvae.predict(user_adata, layer="counts"), own)


def test_normalized_values_are_one_clear_error(user_adata):
    with pytest.raises(DataError, match=r"adata: X holds normalized values .*; pass layer='counts'"):
        get_model("pca")().fit(user_adata)


def test_counts_in_adata_raw(user_adata):
    raw = user_adata.copy()
    raw.raw = anndata.AnnData(X=raw.layers.pop("counts"), var=raw.var.copy())
    z_raw = get_model("pca")().fit(raw, layer="raw").get_latent(raw, layer="raw")
    z_layer = get_model("pca")().fit(user_adata, layer="counts").get_latent(user_adata, layer="counts")
    np.testing.assert_array_equal(z_raw, z_layer)
    with pytest.raises(DataError, match="asks for adata.raw, but it has none"):
        get_model("pca")().fit(user_adata, layer="raw")


def test_bad_keys_and_empty_cells_name_the_fix(user_adata):
    with pytest.raises(DataError, match=r"no obs column 'kind' for labels_key="):
        get_model("pca")().fit(user_adata, layer="counts", labels_key="kind")
    one_class = user_adata.copy()
    one_class.obs["my_type"] = "T"
    with pytest.raises(DataError, match=r"labels_key='my_type' has one class \('T'\)"):
        get_model("gmvae")().fit(one_class, layer="counts", labels_key="my_type")
    empty = user_adata[:20].copy()
    empty.layers["counts"][3] = 0
    empty.layers["counts"].eliminate_zeros()
    with pytest.raises(DataError, match=r"1 cell\(s\) have no counts .*sc.pp.filter_cells"):
        get_model("pca")().fit(empty, layer="counts")
    with pytest.raises(ValueError, match="n_clusters=4: PCA does not cluster"):
        get_model("pca")().fit(user_adata, layer="counts", n_clusters=4)


def test_models_embed_cells_they_were_not_fit_on(user_adata):
    """PCA by its loadings, NMF with W fixed, an encoder: the held-out cells' latent is that of the
    cells alone (not of the batch they come in), and close to a fit on every cell's structure."""
    fit_cells, new_cells = user_adata[::2].copy(), user_adata[1::2].copy()
    for name, options in (("pca", {}), ("nmf_psn", {"niter": 20}), ("vae", {"epochs": 3})):
        model = get_model(name)(**options).fit(fit_cells, layer="counts", seed=0)
        z = model.get_latent(new_cells, layer="counts")
        assert z.shape[0] == new_cells.n_obs and np.isfinite(z).all()
        np.testing.assert_allclose(model.get_latent(new_cells[:5].copy(), layer="counts"), z[:5], rtol=1e-4,
                                   atol=1e-5, err_msg=name)
        assert not np.allclose(z[0], z[1]), name  # different cells, different latents


def test_nmf_keeps_the_fitted_factors_of_its_own_cells(user_adata):
    model = get_model("nmf_psn")(niter=5).fit(user_adata, layer="counts", seed=0)
    np.testing.assert_array_equal(model.get_latent(user_adata, layer="counts"), model.H_.T)


def test_the_package_imports_from_outside_the_repository(tmp_path):
    """After the README's install (pip install -e .), from any folder, with nothing on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import cellembed, comp565_A4, etm; from cellembed import get_model, load_model; "
            "print(cellembed.__file__); print(get_model('vae').__name__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"install the package first: pip install -r requirements.txt -e .\n{done.stderr}"
    path, name = done.stdout.split()
    assert Path(path).resolve() == (ROOT / "cellembed" / "__init__.py").resolve() and name == "VAE"
