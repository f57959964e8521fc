"""The registry and the model API: every registered model fits small synthetic counts, embeds
every cell, gives the same numbers for the same seed, survives save / load bit for bit, matches
genes by name, and embeds cells it was not fit on. A new model is covered by adding its registry line."""

import dataclasses
import warnings

import numpy as np
import pytest

from cellembed import load_model
from cellembed.data import DataError
from cellembed.models import REGISTRY, get_model
from cellembed.models.base import LatentCollapseWarning, Model, NotFittedError, check_latent


@pytest.fixture(scope="module")
def counts():
    from conftest import make_counts

    adata = make_counts(n_per_type=30, n_genes=40)
    adata.var_names = [f"g{j}" for j in range(adata.n_vars)]
    rng = np.random.default_rng(7)  # a second modality, for models that need one
    adata.obsm["mod2"] = rng.poisson(5.0, size=(adata.n_obs, 12)).astype(np.float32)
    adata.uns["mod2"] = {"modality": "ADT", "features": [f"adt{i}" for i in range(12)]}
    return adata


class Fitted(dict):
    """Every registered model fit once (quick settings, seed 0, on first use) with its latent of the fit cells."""

    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __missing__(self, name):
        cls = get_model(name)
        model = cls(**cls.quick, device="cpu") if cls.uses_torch else cls(**cls.quick)
        model.fit(self.counts, labels_key="Celltype", batch_key="batch", seed=0)
        self[name] = (model, model.get_latent(self.counts))
        return self[name]


@pytest.fixture(scope="module")
def fitted(counts):
    return Fitted(counts)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_model_fits_and_is_reproducible(name, counts, fitted):
    cls = get_model(name)
    assert issubclass(cls, Model) and dataclasses.is_dataclass(cls.Config)
    assert set(cls.quick) <= {f.name for f in dataclasses.fields(cls.Config)}
    model, z = fitted[name]
    assert z.ndim == 2 and z.shape[0] == counts.n_obs and z.shape[1] >= 1, z.shape
    assert np.isfinite(z).all()
    assert model.history and all(np.isfinite(v) for row in model.history for v in row.values()
                                 if isinstance(v, float))
    again = cls(**cls.quick).fit(counts, labels_key="Celltype", batch_key="batch", seed=0).get_latent(counts)
    np.testing.assert_allclose(again, z, rtol=1e-5, atol=1e-6, err_msg=f"{name}: same seed, other numbers")
    if cls.clusters:
        labels = model.predict(counts)
        assert labels.shape == (counts.n_obs,) and np.issubdtype(labels.dtype, np.integer)
        assert model.n_clusters_ == 3  # the number of labelled classes


@pytest.mark.parametrize("name", list(REGISTRY))
def test_save_and_load_give_the_same_latent_bit_for_bit(name, counts, fitted, tmp_path):
    model, z = fitted[name]
    model.save(tmp_path / name)
    assert {p.name for p in (tmp_path / name).iterdir()} <= {"model.json", "arrays.npz", "weights.pt"}
    loaded = get_model(name).load(tmp_path / name, device="cpu")
    assert type(loaded) is type(model) and loaded.config == model.config
    np.testing.assert_array_equal(loaded.get_latent(counts), z)
    np.testing.assert_array_equal(load_model(tmp_path / name, device="cpu").get_latent(counts), z)
    if model.clusters:
        np.testing.assert_array_equal(loaded.predict(counts), model.predict(counts))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / name)
    with pytest.raises(DataError, match=r"lacks 2 of the 40 genes the model was trained on \('g3', 'g7'\)"):
        loaded.get_latent(counts[:, [j for j in range(counts.n_vars) if j not in (3, 7)]].copy())


@pytest.mark.parametrize("name", list(REGISTRY))
def test_genes_are_matched_by_name(name, counts, fitted):
    model, z = fitted[name]
    reversed_genes = counts[:, ::-1].copy()
    np.testing.assert_allclose(model.get_latent(reversed_genes), z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in REGISTRY if get_model(n).embeds_new_cells])
def test_new_cells_are_embedded_whatever_cells_come_with_them(name, counts, fitted):
    model, z = fitted[name]
    new = counts[::7].copy()  # a subset: not the cells of fit
    new.obs_names = [f"new{i}" for i in range(new.n_obs)]
    alone = model.get_latent(new)
    assert alone.shape == (new.n_obs, z.shape[1]) and np.isfinite(alone).all()
    np.testing.assert_allclose(model.get_latent(new[:3].copy()), alone[:3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in REGISTRY if not get_model(n).supervised])
def test_unsupervised_models_fit_without_labels(name, counts):
    cls = get_model(name)
    unlabelled = counts.copy()
    del unlabelled.obs["Celltype"]
    options = {"n_clusters": 3} if cls.clusters else {}
    z = cls(**cls.quick).fit(unlabelled, seed=0, **options).get_latent(unlabelled)
    assert z.shape[0] == counts.n_obs
    if cls.clusters:
        with pytest.raises(ValueError, match="pass n_clusters=K"):
            cls(**cls.quick).fit(unlabelled, seed=0)


def test_supervised_models_need_labels(counts):
    for name in REGISTRY:
        if get_model(name).supervised:
            with pytest.raises(DataError, match="pass labels_key=COLUMN"):
                get_model(name)().fit(counts)


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match="unknown model 'nope'; choose from pca, nmf_sse"):
        get_model("nope")


def test_config_overrides_unknown_fields_and_wrong_types():
    cls = get_model("nmf_psn")
    assert cls(niter=7).config.niter == 7 and cls().config.niter == 100
    with pytest.raises(ValueError, match="NMFPoisson has no setting 'not_a_field'; its settings: batch_size, k, niter, solver"):
        cls(not_a_field=1)
    with pytest.raises(ValueError, match=r"NMFPoisson: niter='abc' must be a whole number"):
        cls(niter="abc")
    with pytest.raises(ValueError, match=r"VAE: epochs='abc' must be a whole number"):
        get_model("vae")(epochs="abc")
    with pytest.raises(ValueError, match=r"VAE: hidden=128 must be a tuple"):
        get_model("vae")(hidden=128)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        get_model("vae")(device="gpu")


def test_a_model_that_is_not_fitted_says_so(counts, tmp_path):
    with pytest.raises(NotFittedError, match="call fit"):
        get_model("pca")().get_latent(counts)
    with pytest.raises(DataError, match="no saved model"):
        load_model(tmp_path)


def test_check_latent_warns_when_every_cell_has_the_same_latent():
    with pytest.warns(LatentCollapseWarning, match="same for every cell"):
        check_latent(np.zeros((5, 6)), 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = check_latent(np.eye(5, 6), 5)  # one varying unit is enough
    assert z.shape == (5, 6)
    with pytest.raises(AssertionError, match="NaN"):
        check_latent(np.full((3, 2), np.nan), 3)
