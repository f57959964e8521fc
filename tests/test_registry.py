"""The registry: every registered model fits small synthetic counts, embeds every cell, and gives
the same numbers for the same seed. A new model is covered by adding its registry line."""

import dataclasses
import warnings

import numpy as np
import pytest

from models import REGISTRY, get_model
from models.base import LatentCollapseWarning, Model, check_latent


@pytest.fixture(scope="module")
def counts():
    from conftest import make_counts

    adata = make_counts(n_per_type=30, n_genes=40)
    rng = np.random.default_rng(7)  # a second modality, for models that need one
    adata.obsm["mod2"] = rng.poisson(5.0, size=(adata.n_obs, 12)).astype(np.float32)
    adata.uns["mod2"] = {"modality": "ADT", "features": [f"adt{i}" for i in range(12)]}
    return adata


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_model_round_trips(name, counts):
    cls = get_model(name)
    assert issubclass(cls, Model) and dataclasses.is_dataclass(cls.Config)
    assert set(cls.quick) <= {f.name for f in dataclasses.fields(cls.Config)}
    model = cls(**cls.quick).fit(counts, seed=0)
    z = model.get_latent(counts)
    assert z.ndim == 2 and z.shape[0] == counts.n_obs and z.shape[1] >= 1, z.shape
    assert np.isfinite(z).all()
    assert model.history and all(np.isfinite(v) for row in model.history for v in row.values()
                                 if isinstance(v, float))
    again = cls(**cls.quick).fit(counts, seed=0).get_latent(counts)
    np.testing.assert_allclose(again, z, rtol=1e-5, atol=1e-6, err_msg=f"{name}: same seed, other numbers")
    if cls.clusters:
        labels = model.predict(counts)
        assert labels.shape == (counts.n_obs,) and np.issubdtype(labels.dtype, np.integer)


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match="unknown model 'nope'; choose from pca, nmf_sse"):
        get_model("nope")


def test_config_overrides_and_unknown_fields():
    cls = get_model("nmf_psn")
    assert cls(niter=7).config.niter == 7 and cls().config.niter == 100
    with pytest.raises(TypeError):
        cls(not_a_field=1)


def test_check_latent_warns_when_every_cell_has_the_same_latent():
    with pytest.warns(LatentCollapseWarning, match="same for every cell"):
        check_latent(np.zeros((5, 6)), 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = check_latent(np.eye(5, 6), 5)  # one varying unit is enough
    assert z.shape == (5, 6)
    with pytest.raises(AssertionError, match="NaN"):
        check_latent(np.full((3, 2), np.nan), 3)
