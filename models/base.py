"""The model API: every model in `models/` is a `Model` built from a config dataclass.

    model = get_model("vae")(latent=8)             # the config's defaults, one overridden
    model.fit(adata, seed=0)                       # trains; fills model.history
    z = model.get_latent(adata)                    # (N, d) embedding
    labels = model.predict(adata)                  # models that cluster by themselves

``adata`` is what `a4.data.load_dataset` returns: ``X`` raw counts (N cells x M genes),
``obs['Celltype']`` labels (used only by models that say so, `Model.supervised`, and for the
number of clusters K where a model's source sets K to the number of classes), optional
``obs['batch']``, and for multimodal sets ``obsm['mod2']``. The torch modules inside know
nothing of AnnData (scvi-tools' module / model split): a model turns the AnnData into tensors,
hands them to its module and to `a4.training.train`, and turns the results back.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

import numpy as np


class Model:
    """Base class of every registered model.

    Class attributes
    ----------------
    Config : type
        The model's config dataclass (every hyperparameter, defaults from its source).
    clusters : bool
        The model has `predict` (its own clusters, scored as ``ari_own``).
    supervised : bool
        Labels enter training (shown in the leaderboard's ``supervised`` column).
    quick : dict
        Config settings of a smoke run (a few iterations): ``compare.py --quick`` and the
        registry's tests use them.

    Parameters
    ----------
    config : Config, optional
        Default: ``Config()``.
    **overrides
        Fields of the config to change.
    """

    Config: ClassVar[type]
    clusters: ClassVar[bool] = False
    supervised: ClassVar[bool] = False
    quick: ClassVar[dict] = {}

    def __init__(self, config=None, **overrides):
        config = self.Config() if config is None else config
        self.config = dataclasses.replace(config, **overrides)
        self.history = []  # one dict per epoch / iteration, filled by fit

    def fit(self, adata, seed=0):
        """Train on ``adata`` (N cells); returns self."""
        raise NotImplementedError

    def get_latent(self, adata):
        """The embedding of ``adata``'s cells, ndarray (N, d), deterministic after `fit`."""
        raise NotImplementedError

    def predict(self, adata):
        """The model's own cluster of every cell, ndarray of int (N,) (models with ``clusters``)."""
        raise NotImplementedError(f"{type(self).__name__} does not cluster by itself")


def n_classes(adata):
    """Number of labelled classes in ``adata.obs['Celltype']`` (K for models whose source uses it)."""
    return int(adata.obs["Celltype"].nunique())


def check_latent(z, n_cells):
    """``z`` as a float ndarray (N, d); AssertionError naming the problem otherwise.

    A latent that is the same for every cell (training collapsed, e.g. every unit of a ReLU
    code dead) is returned as it is, with a `LatentCollapseWarning`: its scores are then 0.
    """
    z = np.asarray(z)
    assert z.ndim == 2 and z.shape[0] == n_cells, f"latent of shape {z.shape}, expected ({n_cells}, d)"
    assert np.isfinite(z).all(), "the latent space holds NaN or infinite values"
    if n_cells > 1 and not np.ptp(z, axis=0).any():
        warnings.warn(f"the latent space ({n_cells} x {z.shape[1]}) is the same for every cell: training "
                      "collapsed (e.g. every unit of a ReLU code dead); try another --seed",
                      LatentCollapseWarning, stacklevel=2)
    return z


class LatentCollapseWarning(UserWarning):
    """A model's latent space is the same for every cell."""
