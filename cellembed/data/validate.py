"""The one validation of a user's AnnData, shared by the loaders (``compare.py``) and the model API.

`setup_anndata` is what ``Model.fit`` / ``get_latent`` / ``predict`` run on the AnnData they are
given; `load_dataset` runs the same pieces (`counts_matrix`, `label_column`, `batch_column`,
`finish`) on a file. Either way the result is a new AnnData (the caller's is never changed)
whose ``X`` holds raw counts as CSR float32, with the labels (when given) in ``obs[LABEL_KEY]``
and the batch in ``obs[BATCH_KEY]``; anything else ends in one `DataError` naming the AnnData
or file, the key and the fix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd

from cellembed.data.backed import BACKED_KEY, BackedCounts, backed_matrix, check_backed_counts
from cellembed.data.checks import (BATCH_KEY, COUNTS_LAYER, LABEL_KEY, LABEL_KEYS, DataError, DataWarning,
                                   checked_counts, drop_empty, few)

RAW_LAYER = "raw"  # ``layer="raw"`` reads ``adata.raw.X`` (where many public files keep the counts)
MOD2_KEY = "mod2"  # obsm / uns key of a second modality (JAE's protein or chromatin counts)


@dataclass(frozen=True)
class Flags:
    """How an error names the setting to change: command-line flags or the API's arguments."""

    layer: str = "--layer"
    labels: str = "--label-key"
    batch: str = "--batch-key"


CLI_FLAGS = Flags()
API_FLAGS = Flags("layer=", "labels_key=", "batch_key=")


def counts_matrix(adata, layer, where, flags=CLI_FLAGS):
    """The raw counts of ``adata`` from ``X``, ``layers[layer]`` or (``layer="raw"``) ``adata.raw``.

    Parameters
    ----------
    adata : anndata.AnnData, shape (N, M)
    layer : str or None
    where : str
        The file or object named in errors.
    flags : Flags

    Returns
    -------
    X : scipy.sparse.csr_matrix of float32, shape (N, M') (M' = M except for ``raw``)
    var : pandas.DataFrame, the M' genes' annotations

    Raises
    ------
    DataError
        No such layer, no ``raw``, or values that are not raw counts (the message says where the
        counts are, when a layer named ``counts`` exists).
    """
    if layer == RAW_LAYER and RAW_LAYER not in adata.layers:
        if adata.raw is None:
            raise DataError(f"{where}: {flags.layer}{' ' if flags.layer.startswith('--') else ''}raw asks for "
                            f"adata.raw, but it has none (layers: {few(adata.layers, 8) or 'none'})")
        return (checked_counts(adata.raw.X, where, "raw.X", adata.obs_names, adata.raw.var_names,
                               "the models need raw counts in adata.raw.X"), adata.raw.var.copy())
    if layer is not None and layer not in adata.layers:
        raise DataError(f"{where}: no layer {layer!r} for {flags.layer} (layers: {few(adata.layers, 8) or 'none'}"
                        f"{', and adata.raw' if adata.raw is not None else ''}); pass one of them, or leave "
                        f"{flags.layer.rstrip('=')} out to read X")
    fix = counts_fix(adata, layer, flags)
    name, matrix = ("X", adata.X) if layer is None else (f"layers[{layer!r}]", adata.layers[layer])
    if matrix is None:
        raise DataError(f"{where}: it stores no X; {fix}")
    return checked_counts(matrix, where, name, adata.obs_names, adata.var_names, fix), adata.var.copy()


def counts_fix(adata, layer, flags=CLI_FLAGS):
    """What an error about values that are not raw counts tells the user to do: where the counts are."""
    sep = " " if flags.layer.startswith("--") else ""
    if layer != COUNTS_LAYER and COUNTS_LAYER in adata.layers:
        return f"pass {flags.layer}{sep}{COUNTS_LAYER!r}" if not sep else f"pass {flags.layer} {COUNTS_LAYER}"
    if len(adata.layers):
        return f"pass {flags.layer.rstrip('=')} with the layer of raw counts (layers: {few(adata.layers, 8)})"
    if adata.raw is not None:
        return f"pass {flags.layer}{sep}raw to read adata.raw"
    return "the models need raw counts: put them in X or a layer"


def label_column(obs, key, where, flags=CLI_FLAGS, detect=True):
    """The obs column holding the labels: ``key``, else (``detect``) the first of `LABEL_KEYS`; None if none."""
    if key is not None:
        if key not in obs.columns:
            raise DataError(f"{where}: no obs column {key!r} for {flags.labels} (obs has "
                            f"{few(obs.columns, 8) or 'no columns'}); pass one of them")
        return key
    return next((k for k in LABEL_KEYS if k in obs.columns), None) if detect else None


def batch_column(obs, key, where, flags=CLI_FLAGS, detect=True):
    """The obs column holding the batch: ``key``, else (``detect``) ``"batch"`` when present; None if none."""
    if key is None:
        return BATCH_KEY if detect and BATCH_KEY in obs.columns else None
    if key not in obs.columns:
        raise DataError(f"{where}: no obs column {key!r} for {flags.batch} (obs has "
                        f"{few(obs.columns, 8) or 'no columns'}); pass one of them or leave {flags.batch} out")
    return key


def as_str(values):
    """Labels or batches as str; integral floats (``Y`` codes stored as 1.0) print as ``'1'``."""
    arr = pd.Series(values).to_numpy()
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8")
    elif arr.dtype.kind == "f" and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    return arr.astype(str)


def finish(adata, where, label_key, batch_key, flags=CLI_FLAGS, drop=True, totals=None):
    """Move labels (and batch) to `LABEL_KEY` (`BATCH_KEY`) and check them and the cells.

    Parameters
    ----------
    adata : anndata.AnnData, shape (N, M)
        A new object of raw counts (modified and returned).
    where : str
    label_key, batch_key : str or None
        The obs columns; None: the data have none.
    flags : Flags
    drop : bool
        True (the loaders): cells without a label, then cells and genes without a single count,
        are dropped with a `DataWarning`. False (the model API, whose output has one row per cell
        given): such cells are a `DataError`.
    totals : ndarray, shape (N,), optional
        The cells' total counts, when ``adata`` holds no ``X`` (a backed AnnData's, counted
        chunk by chunk); only with ``drop=False``.

    Returns
    -------
    anndata.AnnData, shape (N', M')
    """
    label_flag = (label_key if flags.labels == label_key or str(label_key).startswith("--")  # Y, --labels
                  else f"{flags.labels}{' ' if flags.labels.startswith('--') else ''}{label_key!r}")
    if label_key is not None:
        missing = adata.obs[label_key].isna().to_numpy()
        if missing.all():
            raise DataError(f"{where}: {label_flag} is empty for every cell; pass the column that holds the labels")
        if missing.any():
            if not drop:
                raise DataError(f"{where}: {label_flag} is empty for {int(missing.sum())} of {adata.n_obs} cells "
                                f"(e.g. {adata.obs_names[missing][0]!r}); drop them first, e.g. "
                                f"adata[adata.obs[{label_key!r}].notna()].copy()")
            warnings.warn(f"{where}: dropping {int(missing.sum())} of {adata.n_obs} cell(s) without a label in "
                          f"{label_flag}", DataWarning, stacklevel=4)
            adata = adata[~missing].copy()
    labels = None if label_key is None else as_str(adata.obs[label_key])
    batches = None
    if batch_key is not None:
        empty = adata.obs[batch_key].isna().to_numpy()
        if empty.any():
            raise DataError(f"{where}: {flags.batch} {batch_key!r} is empty for {int(empty.sum())} cell(s); "
                            f"fill it in, or leave {flags.batch} out")
        batches = as_str(adata.obs[batch_key])
    for column in {label_key, batch_key, LABEL_KEY, BATCH_KEY} & set(adata.obs.columns):
        del adata.obs[column]  # a column named like ours that was not chosen is replaced
    if labels is not None:
        adata.obs[LABEL_KEY] = pd.Categorical(labels)
    if batches is not None:
        adata.obs[BATCH_KEY] = pd.Categorical(batches)
    if drop:
        adata = drop_empty(adata, where, fix="the data need raw counts in at least 2 cells and 2 genes")
    else:
        totals = np.asarray(adata.X.sum(axis=1)).ravel() if totals is None else totals
        if not (totals > 0).all():
            empty = adata.obs_names[totals <= 0]
            raise DataError(f"{where}: {len(empty)} cell(s) have no counts ({few(empty)}); remove them first: "
                            "sc.pp.filter_cells(adata, min_counts=1)")
    for column in (LABEL_KEY, BATCH_KEY):
        if column in adata.obs.columns:
            adata.obs[column] = adata.obs[column].cat.remove_unused_categories()
    if labels is not None:
        classes = adata.obs[LABEL_KEY].cat.categories
        if len(classes) < 2:
            raise DataError(f"{where}: {label_flag} has one class ({classes[0]!r}); the metrics need at least 2")
    return adata


def setup_anndata(adata, layer=None, labels_key=None, batch_key=None, where="adata", flags=API_FLAGS):
    """A checked copy of a user's AnnData for the model API (the checks of `load_dataset`).

    Parameters
    ----------
    adata : anndata.AnnData, shape (N cells, M genes)
        Raw counts in ``X``, ``layers[layer]`` or (``layer="raw"``) ``adata.raw``; an AnnData
        made by `load_dataset` (labels in ``obs['Celltype']``) is read as it is. Opened with
        ``backed="r"``: checked chunk by chunk, its counts left on disk
        (`cellembed.data.backed`).
    layer : str, optional
    labels_key, batch_key : str, optional
        obs columns of the cell types and the batch; left out, the data have none (except an
        AnnData of `load_dataset`, whose ``Celltype`` and ``batch`` columns are kept).
    where : str
        How errors name the object.
    flags : Flags
        How errors name the settings (the API's arguments; ``compare.py --backed``: its flags).

    Returns
    -------
    anndata.AnnData, shape (N, M)
        ``X`` CSR float32 raw counts (backed: no ``X``, a `BackedCounts` in
        ``uns[BACKED_KEY]``, read through `cellembed.data.backed.counts`), ``var`` the genes,
        ``obs[LABEL_KEY]`` / ``obs[BATCH_KEY]`` (categorical str) when given, ``obsm['mod2']`` /
        ``uns['mod2']`` (a second modality) kept.

    Raises
    ------
    DataError
        Not an AnnData, no such layer or key, values that are not raw counts (e.g. log-normalized
        ``X`` with the counts in a layer: the message names the layer), duplicate gene names,
        cells without counts or labels, labels of one class.
    """
    if not isinstance(adata, anndata.AnnData):
        raise DataError(f"{where}: expected an anndata.AnnData (cells x genes), got {type(adata).__name__}")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(f"{where}: holds {adata.n_obs} cells x {adata.n_vars} genes; nothing to embed")
    if BACKED_KEY in adata.uns:  # made by this function from a backed AnnData: checked already
        return adata
    if adata.isbacked:
        matrix, name = backed_matrix(adata, layer, where, flags.layer)
        X, var = BackedCounts(matrix, where=where), adata.var
    else:
        X, var = counts_matrix(adata, layer, where, flags)
    if not var.index.is_unique:
        dup = var.index[var.index.duplicated()].unique()
        raise DataError(f"{where}: duplicate gene names ({few(dup)}); genes are matched by name: make them "
                        "unique first, e.g. adata.var_names_make_unique()")
    ours = "dataset" in adata.uns  # made by load_dataset: its keys are ours
    labels = label_column(adata.obs, labels_key, where, flags, detect=False)
    batch = batch_column(adata.obs, batch_key, where, flags, detect=False)
    if ours:
        labels = labels or (LABEL_KEY if LABEL_KEY in adata.obs else None)
        batch = batch or (BATCH_KEY if BATCH_KEY in adata.obs else None)
    obs = adata.obs[[c for c in {labels, batch} - {None}]].copy()
    genes = pd.DataFrame(index=var.index.astype(str))
    totals = None
    if isinstance(X, BackedCounts):  # checked chunk by chunk; the counts stay on disk
        totals = check_backed_counts(X, where, name, adata.obs_names, adata.var_names,
                                     counts_fix(adata, layer, flags))
        checked = anndata.AnnData(obs=obs, var=genes)
        checked.uns[BACKED_KEY] = X
    else:
        checked = anndata.AnnData(X=X, obs=obs, var=genes)
    if MOD2_KEY in adata.obsm:
        checked.obsm[MOD2_KEY] = np.asarray(adata.obsm[MOD2_KEY], dtype=np.float32)
        checked.uns[MOD2_KEY] = adata.uns.get(MOD2_KEY, {})
    return finish(checked, where, labels, batch, flags, drop=False, totals=totals)
