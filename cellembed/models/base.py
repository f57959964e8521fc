"""The model API: every registered model is a `Model` built from a config dataclass.

    model = get_model("vae")(latent=8, device="auto")        # the config's defaults, one overridden
    model.fit(adata, layer="counts", seed=0)                 # checks the AnnData, trains, fills history
    adata.obsm["X_vae"] = model.get_latent(adata, layer="counts")   # (N, d), genes matched by name
    labels = model.predict(adata, layer="counts")            # models that cluster by themselves
    model.save("vae_dir"); model = get_model("vae").load("vae_dir")

`Model.fit` runs the checks of ``compare.py`` (`cellembed.data.setup_anndata`: raw counts in
``X``, a layer or ``adata.raw``; keys present; no empty cells), records the genes it was
trained on (``var_names_``) and hands the subclass a checked AnnData: ``X`` CSR float32 raw
counts (N cells x M genes), ``obs['Celltype']`` labels when ``labels_key`` was given,
``obs['batch']`` when ``batch_key`` was, ``obsm['mod2']`` for two-modality data.
`get_latent` and `predict` check the same way and put the genes in the trained order by name.

A subclass implements ``_fit(data, seed)``, ``_get_latent(data) -> (N, d)`` and, when it
clusters, ``_predict(data) -> (N,)``; a torch model also ``_build_module()`` (its module from
the config and the fitted attributes, so that `load` rebuilds it before reading the weights).
Fitted attributes end in ``_`` (scikit-learn's rule): ``module_`` (the torch module),
``var_names_``, ``n_clusters_`` (models that cluster), and arrays; `save` writes them all. The
torch modules know nothing of AnnData (scvi-tools' module / model split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
import warnings
from pathlib import Path
from typing import ClassVar

import anndata
import numpy as np
import pandas as pd

from cellembed.data.backed import BACKED_KEY, counts, fingerprint_backed, is_backed
from cellembed.data.checks import LABEL_KEY, DataError, few
from cellembed.data.validate import setup_anndata

SAVE_FORMAT = "cellembed-model"
SAVE_VERSION = 1
MODEL_FILE, ARRAYS_FILE, WEIGHTS_FILE = "model.json", "arrays.npz", "weights.pt"


class NotFittedError(RuntimeError):
    """A model was asked for a latent, clusters or a save before `fit` (or `load`)."""


class Model:
    """Base class of every registered model.

    Class attributes
    ----------------
    Config : type
        The model's config dataclass (every hyperparameter, defaults from its source).
    clusters : bool
        The model has `predict` (its own clusters, scored as ``ari_own``) and takes ``n_clusters``.
    supervised : bool
        Labels enter training: `fit` needs ``labels_key``.
    embeds_new_cells : bool
        `get_latent` embeds cells the model was not fit on. A model that cannot raises one
        clear error for them.
    uses_torch : bool
        The model trains a torch module: it takes ``device`` and has ``module_``.
    streams_backed : bool
        `fit` and `get_latent` take an AnnData opened with ``backed="r"`` and read its counts in
        row chunks and minibatches from disk (`cellembed.data.backed`); other models ask for
        ``adata.to_memory()``.
    quick : dict
        Config settings of a smoke run (a few iterations): ``compare.py --quick`` and the
        registry's tests use them.

    Parameters
    ----------
    config : Config, optional
        Default: ``Config()``.
    device : str
        torch models: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    **overrides
        Fields of the config to change; an unknown field or a value of the wrong type is a
        ValueError naming it.
    """

    Config: ClassVar[type]
    clusters: ClassVar[bool] = False
    supervised: ClassVar[bool] = False
    embeds_new_cells: ClassVar[bool] = True
    uses_torch: ClassVar[bool] = True
    streams_backed: ClassVar[bool] = False
    quick: ClassVar[dict] = {}

    def __init__(self, config=None, device="auto", **overrides):
        config = self.Config() if config is None else config
        self.config = checked_config(type(self), config, overrides)
        if self.uses_torch:
            from cellembed.runtime import check_device_name

            check_device_name(device)
        self.device = device
        self.history = []  # one dict per epoch / iteration, filled by fit

    # ------------------------------------------------------------------ the public API
    def fit(self, adata, layer=None, labels_key=None, batch_key=None, n_clusters=None, seed=0):
        """Check ``adata`` and train on its N cells; returns self.

        Parameters
        ----------
        adata : anndata.AnnData, shape (N, M)
            Raw counts in ``X``, ``layers[layer]`` or ``adata.raw`` (``layer="raw"``).
        layer : str, optional
        labels_key : str, optional
            obs column of cell types: needed by supervised models; gives clustering models
            their default ``n_clusters`` (the number of classes).
        batch_key : str, optional
            obs column of the batch (models that correct for it, e.g. ``scetm``).
        n_clusters : int, optional
            Models that cluster: the number of clusters (default: the number of labelled classes).
        seed : int
            Seeds numpy, torch and the model's own draws.

        Raises
        ------
        DataError
            The AnnData fails a check (the message names the key and the fix).
        ValueError
            ``n_clusters`` missing or given to a model that does not cluster.
        """
        from cellembed.training import seed_everything

        data = self._setup(adata, layer, labels_key, batch_key)
        name = type(self).__name__
        if self.supervised and LABEL_KEY not in data.obs:
            raise DataError(f"adata: {name} is supervised (labels enter its training); pass labels_key=COLUMN")
        if self.clusters:
            self.n_clusters_ = resolve_n_clusters(n_clusters, data, name)
        elif n_clusters is not None:
            raise ValueError(f"n_clusters={n_clusters}: {name} does not cluster by itself; leave n_clusters out "
                             "and cluster its latent (e.g. sc.tl.leiden)")
        self.var_names_ = pd.Index(data.var_names, dtype=str)
        self.fit_cells_ = fingerprint(data)
        if self.uses_torch:
            from cellembed.runtime import resolve_device

            self.device_ = resolve_device(self.device)
        seed_everything(seed)
        self.history = []
        self._fit(data, seed)
        return self

    def get_latent(self, adata, layer=None):
        """The embedding of ``adata``'s cells, float ndarray (N, d), deterministic after `fit`.

        Genes are matched by name (any order; extra genes are ignored; missing ones are a
        DataError naming them).
        """
        data = self._checked(adata, layer)
        return check_latent(self._get_latent(data), data.n_obs)

    def predict(self, adata, layer=None):
        """The model's own cluster of every cell, int ndarray (N,) (models with ``clusters``)."""
        if not self.clusters:
            raise NotImplementedError(f"{type(self).__name__} does not cluster by itself; cluster its latent")
        data = self._checked(adata, layer)
        return np.asarray(self._predict(data))

    def to(self, device):
        """Move a fitted torch model to ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``); returns self."""
        from cellembed.runtime import resolve_device

        if not self.uses_torch:
            return self
        self.device = device
        self.device_ = resolve_device(device)
        if hasattr(self, "module_"):
            self.module_.to(self.device_)
        return self

    # ------------------------------------------------------------------ keeping a model
    def save(self, path, overwrite=False):
        """Write the model to the folder ``path``: config, fitted arrays and weights, genes.

        Files: ``model.json`` (class, config, history, scalar fitted attributes),
        ``arrays.npz`` (array attributes and gene names; read back without pickle) and, for
        torch models, ``weights.pt`` (state dicts, read back with ``weights_only=True``).

        Raises
        ------
        FileExistsError
            ``path`` holds a saved model and ``overwrite`` is False.
        """
        from cellembed.outputs import atomic_path

        self._check_fitted()
        path = Path(path)
        if (path / MODEL_FILE).exists() and not overwrite:
            raise FileExistsError(f"{path}: holds a saved model already; pass overwrite=True or another folder")
        path.mkdir(parents=True, exist_ok=True)
        scalars, arrays, indexes, modules = {}, {}, [], {}
        for key, value in vars(self).items():
            if not key.endswith("_") or key.startswith("_") or key == "device_":
                continue
            if hasattr(value, "state_dict") and hasattr(value, "parameters"):
                modules[key] = {k: v.detach().cpu() for k, v in value.state_dict().items()}
            elif isinstance(value, pd.Index):
                arrays[key], indexes = np.asarray(value, dtype=str), indexes + [key]
            elif isinstance(value, np.ndarray):
                if value.dtype == object:
                    raise TypeError(f"{type(self).__name__}.{key}: an object array cannot be saved without pickle")
                arrays[key] = value
            else:
                try:
                    json.dumps(value)
                except TypeError:
                    raise TypeError(f"{type(self).__name__}.{key}: a {type(value).__name__} cannot be saved; "
                                    "fitted attributes are arrays, torch modules or JSON values") from None
                scalars[key] = value
        meta = {"format": SAVE_FORMAT, "version": SAVE_VERSION, "class": class_path(type(self)),
                "config": dataclasses.asdict(self.config), "fitted": scalars, "indexes": indexes,
                "arrays": sorted(arrays), "modules": sorted(modules), "history": self.history}
        with atomic_path(path / ARRAYS_FILE) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        if modules:
            import torch

            with atomic_path(path / WEIGHTS_FILE) as tmp:
                torch.save(modules, tmp)
        with atomic_path(path / MODEL_FILE) as tmp:  # last: a folder with model.json is complete
            tmp.write_text(json.dumps(meta, indent=1, default=_json_number) + "\n")
        return path

    @classmethod
    def load(cls, path, device="auto"):
        """A model saved by `save`, ready for `get_latent` / `predict` (on ``device``).

        Raises
        ------
        DataError
            ``path`` holds no saved model, one of another class, or a damaged one.
        """
        path = Path(path)
        meta = read_meta(path)
        saved = resolve_class(meta["class"], path)
        if cls is not Model and saved is not cls:
            raise DataError(f"{path}: holds a {saved.__name__}, not a {cls.__name__}; load it with "
                            f"{saved.__name__}.load or cellembed.load_model")
        config = _config_from_dict(saved.Config, meta["config"], path)
        model = saved(config, device=device) if saved.uses_torch else saved(config)
        for key, value in meta["fitted"].items():
            setattr(model, key, value)
        try:
            with np.load(path / ARRAYS_FILE, allow_pickle=False) as npz:
                for key in meta["arrays"]:
                    value = npz[key]
                    setattr(model, key, pd.Index(value, dtype=str) if key in meta["indexes"] else value)
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{path / ARRAYS_FILE}: unreadable ({exc}); save the model again") from None
        model.history = meta["history"]
        if model.uses_torch:
            import torch

            from cellembed.runtime import resolve_device

            model.device_ = resolve_device(device)
            try:
                states = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
            except Exception as exc:  # missing, truncated, or a pickle asking for code
                raise DataError(f"{path / WEIGHTS_FILE}: unreadable ({type(exc).__name__}: {exc}); "
                                "save the model again") from None
            model.module_ = model._build_module()
            model.module_.load_state_dict(states["module_"])
            model.module_.to(model.device_).eval()
        return model

    # ------------------------------------------------------------------ for subclasses
    def _fit(self, data, seed):
        raise NotImplementedError

    def _get_latent(self, data):
        raise NotImplementedError

    def _predict(self, data):
        raise NotImplementedError

    def _build_module(self):
        raise NotImplementedError(f"{type(self).__name__} has no torch module")

    def _is_fit_data(self, data):
        """Whether ``data`` (checked, genes in order) holds exactly the cells and counts of `fit`."""
        return fingerprint(data) == self.fit_cells_

    def _check_fitted(self):
        if not hasattr(self, "var_names_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(adata) or "
                                 f"{type(self).__name__}.load(path) first")

    def _setup(self, adata, layer, labels_key=None, batch_key=None):
        """`setup_anndata`, after checking that a backed AnnData goes to a model that streams."""
        if isinstance(adata, anndata.AnnData) and (adata.isbacked or is_backed(adata)) and not self.streams_backed:
            from cellembed.models import REGISTRY, get_model

            streaming = [name for name in REGISTRY if get_model(name).streams_backed]
            raise DataError(f"adata: opened with backed='r', but {type(self).__name__} needs the counts in memory; "
                            f"load them with adata.to_memory(), or use a model that streams ({', '.join(streaming)})")
        return setup_anndata(adata, layer, labels_key, batch_key)

    def _checked(self, adata, layer):
        self._check_fitted()
        data = match_genes(self._setup(adata, layer), self.var_names_)
        if not self.embeds_new_cells and not self._is_fit_data(data):
            raise DataError(f"adata: {type(self).__name__} embeds only the cells it was fit on; fit it on these "
                            "cells (it has no encoder for new ones)")
        return data


def _json_number(value):
    """numpy scalars in ``model.json`` as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def class_path(cls):
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_class(path_text, where):
    """The registered class saved as ``module:Class``; only registered models are loaded."""
    from cellembed.models import REGISTRY, get_model

    for name, target in REGISTRY.items():
        if target == path_text:
            return get_model(name)
    raise DataError(f"{where}: saved class {path_text!r} is not a registered model; it was saved by another "
                    "version of cellembed")


def read_meta(path):
    """The parsed ``model.json`` of a saved model folder; DataError when there is none or it is damaged."""
    file = Path(path) / MODEL_FILE
    if not file.is_file():
        raise DataError(f"{Path(path).absolute()}: no saved model ({MODEL_FILE} missing); pass the folder "
                        "that model.save(...) wrote")
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: unreadable ({exc}); save the model again") from None
    if meta.get("format") != SAVE_FORMAT or meta.get("version") != SAVE_VERSION:
        raise DataError(f"{file}: not a {SAVE_FORMAT} v{SAVE_VERSION} file; save the model again with this version")
    return meta


def _config_from_dict(config_cls, values, where):
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise DataError(f"{where}: saved setting(s) {', '.join(unknown)} unknown to {config_cls.__name__}; it was "
                        "saved by another version of cellembed")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return config_cls(**converted)


def checked_config(model_cls, config, overrides):
    """``config`` with ``overrides`` set, each checked against the field's annotation.

    Raises
    ------
    ValueError
        An unknown field, or a value of the wrong type (one line naming the field, the value
        and the type it needs, e.g. ``vae: epochs='abc' must be an int``).
    """
    name = model_cls.__name__
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{name} has no setting {unknown[0]!r}; its settings: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(type(config))
    for key, value in overrides.items():
        problem = _type_problem(value, hints.get(key))
        if problem:
            raise ValueError(f"{name}: {key}={value!r} {problem}")
    return dataclasses.replace(config, **overrides)


def _type_problem(value, hint):
    """Why ``value`` does not fit the annotation ``hint`` (None when it does)."""
    if hint is None or hint is typing.Any:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        problems = [_type_problem(value, a) for a in args]
        return None if any(p is None for p in problems) else problems[0]
    if hint is type(None):
        return None if value is None else "must be None"
    if origin is typing.Literal:
        return None if value in args else f"must be one of {', '.join(map(repr, args))}"
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return "must be a tuple, e.g. (128, 32)"
        inner = [a for a in args if a is not Ellipsis]
        if inner:
            for item in value:
                problem = _type_problem(item, inner[0])
                if problem:
                    return f"holds {item!r}, which {problem}"
        return None
    if hint is bool:
        return None if isinstance(value, (bool, np.bool_)) else "must be True or False"
    if hint is int:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        return None if ok else "must be a whole number"
    if hint is float:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        return None if ok else "must be a number"
    if hint is str:
        return None if isinstance(value, str) else "must be a word (str)"
    return None


def resolve_n_clusters(n_clusters, data, name):
    """K for a model that clusters: ``n_clusters``, else the number of labelled classes."""
    if n_clusters is not None:
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) or n_clusters < 2:
            raise ValueError(f"n_clusters={n_clusters!r}: {name} needs a whole number of clusters, at least 2")
        if n_clusters > data.n_obs:
            raise ValueError(f"n_clusters={n_clusters}: more clusters than the {data.n_obs} cells")
        return int(n_clusters)
    if LABEL_KEY in data.obs:
        return n_classes(data)
    raise ValueError(f"{name} clusters the cells: pass n_clusters=K (or labels_key=COLUMN to use the number of "
                     "labelled classes)")


def n_classes(adata):
    """Number of labelled classes in ``adata.obs['Celltype']``."""
    return int(adata.obs[LABEL_KEY].nunique())


def fingerprint(data):
    """A digest of a checked AnnData's cell names and counts: which cells `fit` saw."""
    if is_backed(data):
        return fingerprint_backed(counts(data), data.obs_names)
    X = data.X if data.X.has_sorted_indices else data.X.sorted_indices()  # one layout per matrix
    digest = hashlib.blake2b(digest_size=16)
    for part in (np.asarray(data.obs_names, dtype=str), X.indptr, X.indices, X.data):
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()


def match_genes(data, genes):
    """``data`` with its genes in the order of ``genes`` (matched by name).

    Raises
    ------
    DataError
        ``data`` lacks some of ``genes`` (the message names them).
    """
    if data.var_names.equals(genes):
        return data
    missing = genes.difference(data.var_names, sort=False)
    if len(missing):
        raise DataError(f"adata: lacks {len(missing)} of the {len(genes)} genes the model was trained on "
                        f"({few(missing, 5)}); pass cells measured on those genes (genes are matched by name)")
    if is_backed(data):  # the same cells, their genes read in the trained order from disk
        matched = anndata.AnnData(obs=data.obs, var=pd.DataFrame(index=genes), obsm=dict(data.obsm))
        matched.uns[BACKED_KEY] = counts(data).select_columns(data.var_names.get_indexer(genes))
        return matched
    return data[:, genes].copy()


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
