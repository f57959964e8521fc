"""Every data set by name or by path: one AnnData of raw counts, labels and batch under fixed keys.

`load_dataset` takes a name of `DATASETS` (resolved under a data root, see `default_data_root`)
or a path (``.h5ad``, scDeepCluster ``.h5``, MuData ``.h5mu``, or the course's folder, read by
`cellembed.data.course`) and returns cells x genes raw counts with the labels in
``obs[LABEL_KEY]`` and the batch, when there is one, in ``obs[BATCH_KEY]``, checked by the same
code as the model API (`cellembed.data.validate`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd

from cellembed.data.checks import (COUNTS_LAYER, LABEL_KEYS, DataError, DataWarning, checked_counts, few,
                                   second_modality)
from cellembed.data.course import COURSE_FILES, load_course_data
from cellembed.data.validate import (MOD2_KEY, RAW_LAYER, Flags, batch_column, counts_matrix, finish,
                                     label_column)

MODALITIES = (("prot", "ADT"), ("adt", "ADT"), ("atac", "ATAC"))  # part of a MuData modality's name -> its kind
DATA_ROOT_ENV = "A4_DATA_ROOT"
LABELS_CSV_COLUMN = "--labels"  # the obs column a --labels CSV's labels pass through


@dataclass(frozen=True)
class NamedDataset:
    """Where a named data set lives under the data root, and its keys.

    ``file`` None means the course's folder (`load_course_data`, keys fixed). ``mod2`` is the
    h5ad of the second modality (same cells as ``file``), of kind ``modality`` ("ADT" or "ATAC").
    """

    folder: str
    file: str | None = None
    label_key: str | None = None
    batch_key: str | None = None
    layer: str | None = None
    mod2: str | None = None
    modality: str | None = None


_CITE = "openproblems_bmmc_cite_starter.output_"
_MULTIOME = "openproblems_bmmc_multiome_starter.output_"
DATASETS = {
    "mouse_pancreas": NamedDataset("mouse_pancreas"),
    "baron_mouse": NamedDataset("baron_mouse", "baron_mouse_1886_counts.h5ad", "assigned_cluster", "batch"),
    "pbmc3k": NamedDataset("pbmc3k", "pbmc3k_counts_seurat_labels.h5ad", "cell_type"),  # 62 cells unlabelled
    "10x_pbmc": NamedDataset("scdcc_top2000", "10X_PBMC_top2000.h5"),
    "mouse_bladder": NamedDataset("scdcc_top2000", "mouse_bladder_cell_top2000.h5"),
    "neurips_cite": NamedDataset("neurips2021_bmmc_cite_subset", _CITE + "rna.h5ad", "cell_type", "batch",
                                 COUNTS_LAYER, _CITE + "mod2.h5ad", "ADT"),
    "neurips_multiome": NamedDataset("neurips2021_bmmc_multiome_subset", _MULTIOME + "rna.h5ad", "cell_type",
                                     "batch", COUNTS_LAYER, _MULTIOME + "mod2.h5ad", "ATAC"),
}


def default_data_root():
    """The folder the names of `DATASETS` are looked up in: ``$A4_DATA_ROOT``, else ``data``.

    Returns
    -------
    Path
        Relative to the current folder unless ``A4_DATA_ROOT`` is absolute.
    """
    return Path(os.environ.get(DATA_ROOT_ENV) or "data")


def load_dataset(data, data_root=None, label_key=None, batch_key=None, layer=None, labels=None,
                 mod2_normalized=None, backed=False):
    """Load a data set by name or by path as raw counts with labels (and batch) under fixed keys.

    Parameters
    ----------
    data : str or Path
        A name of `DATASETS` (looked up under ``data_root``), or a path: an ``.h5ad`` file, an
        ``.h5`` file in the scDeepCluster layout (``X`` cells x genes counts, ``Y`` labels,
        optional ``ADT_X`` cells x proteins counts of a CITE-seq set), a MuData ``.h5mu`` file
        (the modality named ``rna``, else the first, plus at most one more), a Cell Ranger ``.h5``
        or a 10x ``mtx`` folder (``matrix.mtx[.gz]``, read by scanpy's readers), or a folder with the
        course's four files (`load_course_data`). A name wins over a file of the same name.
    data_root : str or Path, optional
        Where names are looked up (same layout as ``shared/data``); default `default_data_root()`.
        Not used for paths, which are relative to the current folder.
    label_key : str, optional
        The obs column of labels (``.h5ad``, ``.h5mu``; overrides a name's); default the first of
        `LABEL_KEYS` present.
    batch_key : str, optional
        The obs column of batches; default ``"batch"`` when present, else the data have no batch.
    layer : str, optional
        The layer holding the raw counts, for both modalities (``.h5ad``, ``.h5mu``); ``raw``:
        ``adata.raw``; default ``X``.
    labels : str or Path, optional
        A CSV of cell id (first column) and label (second column), e.g. for 10x files, which
        hold none; it replaces any label column of the file.
    mod2_normalized : bool, optional
        The second modality is already normalized (True: ``--mod2-normalized``), or must be raw
        counts (False); None: detected (negative or non-integer values, e.g. the CLR-normalized
        proteins of public CITE-seq files, are read as normalized, with a `DataWarning`). The
        RNA counts must be raw either way.
    backed : bool
        Leave the counts on disk (``compare.py --backed``): an ``.h5ad`` file (or a name whose
        file is one, with one modality) opened with ``backed="r"`` and checked chunk by chunk
        (`cellembed.data.backed`); for the models that stream it. Cells without a label or a
        count are then an error (nothing is copied to drop them).

    Returns
    -------
    anndata.AnnData, shape (N cells, M genes)
        ``X``: raw counts, CSR float32 (the course's folder: int64, exactly `load_course_data`).
        ``obs[LABEL_KEY]``: categorical of str labels; absent when the file has none (a
        `DataWarning` says so: embeddings without scores). ``obs[BATCH_KEY]``: categorical of str,
        only when there is a batch. The file's other obs columns keep their names (the label and
        batch columns are moved, and a column already named ``Celltype`` or ``batch`` that was not
        chosen is replaced); for two modalities, the second's obs columns that the first lacks are
        added. ``var``: the file's (``"gene0"``.. for ``.h5`` files, which store no names).
        Multimodal data: ``obsm["mod2"]`` (N, M2) float32 ndarray of the second modality's raw
        counts (or normalized values), and ``uns["mod2"] = {"modality": "ADT" or "ATAC",
        "features": M2 names, "path", "normalized": bool}``.
        ``uns["dataset"] = {"name": the name or the file's stem, "path": the file or folder read}``.
        Cells without a label are dropped with a `DataWarning`, then cells and genes without a
        single count (`_drop_empty`); the second modality's features are kept as they are.

    Raises
    ------
    DataError
        One line naming the file, key or flag and the fix: an unknown name, a name whose folder is
        missing under the root, a missing, unreadable or unknown kind of file, a missing label,
        batch or layer, values that are not raw counts, labels of one class, fewer than 2 cells or
        genes with counts, or two modalities that hold different cells.
    """
    if backed:
        return _load_backed(data, data_root, label_key, batch_key, layer, labels)
    if isinstance(data, str) and data in DATASETS:
        root = Path(data_root) if data_root is not None else default_data_root()
        return _load_named(data, root, label_key, batch_key, layer, labels, mod2_normalized)
    path = Path(data)
    if not path.exists() and not path.suffix and len(path.parts) == 1:
        raise DataError(f"unknown data set {str(data)!r}; the names are {', '.join(DATASETS)}, and a path to an "
                        ".h5ad, .h5 (scDeepCluster X/Y or Cell Ranger) or .h5mu file, a 10x mtx folder, or the "
                        "course's data folder, also works")
    return _load_path(path, path.name if path.is_dir() else path.stem, label_key, batch_key, layer, labels=labels,
                      mod2_normalized=mod2_normalized)


def _load_backed(data, data_root, label_key, batch_key, layer, labels):
    """`load_dataset` with ``backed=True``: a checked AnnData whose counts stay in the ``.h5ad`` file."""
    from cellembed.data.validate import CLI_FLAGS, setup_anndata

    path, name = Path(data), Path(data).stem
    if isinstance(data, str) and data in DATASETS:
        spec = DATASETS[data]
        root = Path(data_root) if data_root is not None else default_data_root()
        if spec.file is None or not spec.file.endswith(".h5ad") or spec.mod2 is not None:
            raise DataError(f"--backed: data set {data!r} is not one .h5ad file; --backed streams an .h5ad's X "
                            "(leave --backed out for this one)")
        path, name = root / spec.folder / spec.file, data
        label_key, batch_key, layer = label_key or spec.label_key, batch_key or spec.batch_key, layer or spec.layer
    if path.suffix != ".h5ad":
        raise DataError(f"{path}: --backed streams an .h5ad file; write the data as .h5ad (adata.write_h5ad) or "
                        "leave --backed out")
    rna = _read_h5ad(path, backed=True)
    key = _label_key(rna, label_key, labels, path, stacklevel=5)
    adata = setup_anndata(rna, layer, key, batch_column(rna.obs, batch_key, path), where=str(path), flags=CLI_FLAGS)
    adata.uns["dataset"] = {"name": name, "path": str(path), "backed": True}
    return adata


def _load_named(name, root, label_key, batch_key, layer, labels=None, mod2_normalized=None):
    spec = DATASETS[name]
    folder = root / spec.folder
    if not folder.is_dir():
        course = spec.file is None and all((root / f).is_file() for f in COURSE_FILES)
        also = f"; or pass the course's folder itself as a path: --data {root}" if course else ""
        raise DataError(f"data set {name!r}: no folder {folder.absolute()}; pass --data-root DIR or set "
                        f"{DATA_ROOT_ENV}=DIR, DIR holding {spec.folder}/ (see data/README.md){also}")
    if spec.file is None:
        return _load_path(folder, name, label_key, batch_key, layer, labels=labels)
    return _load_path(folder / spec.file, name, label_key or spec.label_key, batch_key or spec.batch_key,
                      layer or spec.layer, None if spec.mod2 is None else folder / spec.mod2, spec.modality, labels,
                      mod2_normalized)


def _load_path(path, name, label_key, batch_key, layer, mod2_path=None, modality=None, labels=None,
               mod2_normalized=None):
    if path.is_dir() and _is_10x_mtx(path):
        adata = _from_anndata(_read_10x(path), path, label_key, batch_key, layer, labels=labels)
    elif path.is_dir():
        _reject_flags(path, "the course's data folder (labels assigned_cluster, batch from sample_info.csv)",
                      label_key=label_key, batch_key=batch_key, layer=layer, labels=labels)
        adata = load_course_data(path)
    elif not path.exists():
        raise DataError(f"{path.absolute()}: no such file; pass an existing .h5ad, .h5 or .h5mu file, a 10x mtx "
                        f"folder, or one of the names {', '.join(DATASETS)}")
    elif path.suffix == ".h5ad":
        mod2 = None
        if mod2_path is not None:
            mod2 = (_read_h5ad(mod2_path), modality, mod2_path, ("rna", modality.lower()))
        adata = _from_anndata(_read_h5ad(path), path, label_key, batch_key, layer, mod2, labels=labels,
                              mod2_normalized=mod2_normalized)
    elif path.suffix == ".h5mu":
        adata = _from_h5mu(path, label_key, batch_key, layer, labels, mod2_normalized)
    elif path.suffix == ".h5" and _is_cell_ranger_h5(path):
        adata = _from_anndata(_read_10x(path), path, label_key, batch_key, layer, labels=labels)
    elif path.suffix == ".h5":
        _reject_flags(path, "an scDeepCluster .h5 file (labels in Y, counts in X)",
                      label_key=label_key, batch_key=batch_key, layer=layer, labels=labels)
        adata = _from_h5(path, mod2_normalized)
    else:
        raise DataError(f"{path}: unknown file suffix {path.suffix!r}; pass an .h5ad, .h5 (scDeepCluster X/Y or "
                        "Cell Ranger) or .h5mu file, a 10x mtx folder, or the course's data folder")
    adata.uns["dataset"] = {"name": name, "path": str(path)}
    return adata


def _is_10x_mtx(folder):
    return any((folder / f).is_file() for f in ("matrix.mtx", "matrix.mtx.gz"))


def _is_cell_ranger_h5(path):
    """Whether ``path`` is a Cell Ranger HDF5 (a ``matrix`` group, or v2's one group per genome)."""
    try:
        with h5py.File(path, "r") as f:
            groups = [f[k] for k in f.keys() if isinstance(f[k], h5py.Group)]
            return any({"barcodes", "data", "indices", "indptr"} <= set(g.keys()) for g in groups)
    except OSError:  # not HDF5: _from_h5 names the problem
        return False


def _read_10x(path):
    """A Cell Ranger .h5 or a 10x mtx folder with scanpy's readers (gene symbols, made unique)."""
    import scanpy as sc

    try:
        adata = sc.read_10x_mtx(path) if path.is_dir() else sc.read_10x_h5(path)
    except Exception as exc:  # scanpy raises many kinds for a damaged file
        raise DataError(f"{path}: not a readable 10x {'mtx folder' if path.is_dir() else 'Cell Ranger .h5'} "
                        f"({_why(exc)}); re-copy the files Cell Ranger wrote") from None
    adata.var_names_make_unique()
    return adata


def _read_labels(path, cells):
    """The labels of a ``--labels`` CSV (cell id, label) in the order of ``cells`` (NaN where absent)."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV for --labels ({_why(exc)}); write cell id, label per line") \
            from None
    if table.shape[1] < 2:
        raise DataError(f"{path}: --labels needs two columns, cell id and label (it has {table.shape[1]})")
    ids, values = table.iloc[:, 0], table.iloc[:, 1]
    if ids.duplicated().any():
        raise DataError(f"{path}: cell id {ids[ids.duplicated()].iloc[0]!r} is listed twice; one label per cell")
    found = pd.Series(values.to_numpy(), index=ids.to_numpy()).reindex(cells)
    if found.isna().all():
        raise DataError(f"{path}: none of its {len(ids)} cell ids ({few(ids)}) is a cell of the data set "
                        f"({few(cells)}); the first column must hold the data set's cell ids")
    return found.to_numpy()


def _reject_flags(path, what, **flags):
    given = [f"--{key.replace('_', '-')}" for key, value in flags.items() if value is not None]
    if given:
        raise DataError(f"{path}: {', '.join(given)} cannot be used with {what}; leave it out")


def _why(exc):
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _read_h5ad(path, backed=False):
    if not path.is_file():
        raise DataError(f"{path.absolute()}: no such file; re-copy the data set's folder")
    try:
        with warnings.catch_warnings():  # files from anndata < 0.8 (NeurIPS 2021): one notice per element
            warnings.simplefilter("ignore", anndata.OldFormatWarning)
            return anndata.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # not HDF5, truncated, or not an AnnData: anndata raises many kinds
        raise DataError(f"{path}: not a readable .h5ad ({_why(exc)}); re-copy or re-write the file") from None


def _from_h5mu(path, label_key, batch_key, layer, labels=None, mod2_normalized=None):
    """The rna modality (else the first) of a MuData file, with at most one more as mod2."""
    import mudata  # only .h5mu files need it

    try:
        with mudata.set_options(pull_on_update=False):  # read the modalities as stored
            mdata = mudata.read_h5mu(path)
    except Exception as exc:  # not HDF5, truncated, or not a MuData
        raise DataError(f"{path}: not a readable .h5mu ({_why(exc)}); re-copy or re-write the file") from None
    names = list(mdata.mod)
    if not names:
        raise DataError(f"{path}: holds no modality; write the RNA counts as a modality named 'rna'")
    first = "rna" if "rna" in names else names[0]
    others = [n for n in names if n != first]
    if len(others) > 1:
        raise DataError(f"{path}: holds {len(names)} modalities ({', '.join(names)}); load_dataset takes the rna "
                        "modality and at most one more: write a MuData with two")
    # MuData-wide obs columns (not the 'mod:column' copies of a modality's own)
    prefixes = tuple(f"{n}:" for n in names)
    shared = mdata.obs[[c for c in mdata.obs.columns if not str(c).startswith(prefixes)]]
    mod2 = None
    if others:
        other = others[0]
        mod2 = (mdata.mod[other], _modality(other, path), f"{path} (modality {other!r})", (first, other))
    rna = mdata.mod[first]
    return _from_anndata(rna, path, label_key, batch_key, layer, mod2, shared.reindex(rna.obs_names), labels,
                         mod2_normalized)


def _modality(name, path):
    low = name.lower()
    kind = next((kind for part, kind in MODALITIES if part in low), None)
    if kind is None:
        raise DataError(f"{path}: cannot tell what modality {name!r} holds (a name with 'prot' or 'adt' is ADT, "
                        "with 'atac' ATAC); rename it")
    return kind


def _from_anndata(rna, path, label_key, batch_key, layer, mod2=None, extra_obs=None, labels=None,
                  mod2_normalized=None):
    """Counts, obs and var of ``rna`` (N, M), plus ``mod2 = (AnnData, kind, path, names)``.

    ``extra_obs``: obs columns (rows in ``rna`` order) added where ``rna.obs`` lacks them;
    ``labels``: a ``--labels`` CSV, whose labels replace the file's.
    """
    X, var = counts_matrix(rna, layer, path)
    adata = anndata.AnnData(X=X, obs=rna.obs.copy(), var=var)
    if extra_obs is not None:
        _add_obs(adata, extra_obs)
    if mod2 is not None:
        other, kind, other_path, names = mod2
        other = _same_cells(adata.obs_names, other, names, path)
        layer2 = None if layer == RAW_LAYER else layer
        if layer2 is not None and layer2 not in other.layers:
            raise DataError(f"{other_path}: no layer {layer2!r} for --layer (layers: {few(other.layers, 8) or 'none'})")
        values = other.X if layer2 is None else other.layers[layer2]
        where = "X" if layer2 is None else f"layers[{layer2!r}]"
        adata.obsm[MOD2_KEY], normalized = second_modality(
            values, other_path, where, other.obs_names, other.var_names,
            "the second modality needs raw counts, or pass --mod2-normalized", mod2_normalized)
        adata.uns[MOD2_KEY] = {"modality": kind, "features": [str(f) for f in other.var_names],
                               "path": str(other_path), "normalized": normalized}
        _add_obs(adata, other.obs)
    key = _label_key(adata, label_key, labels, path, stacklevel=5)
    return finish(adata, path, key, batch_column(adata.obs, batch_key, path))


def _label_key(adata, label_key, labels, path, stacklevel):
    """The obs column of the labels: a ``--labels`` CSV's (added to ``adata.obs``), ``label_key``, or detected.

    None, with a `DataWarning`, when the data have no labels.
    """
    if labels is not None:
        if label_key is not None:
            raise DataError(f"{path}: pass --labels or --label-key, not both")
        label_key = LABELS_CSV_COLUMN
        adata.obs[label_key] = _read_labels(labels, adata.obs_names)
    key = label_column(adata.obs, label_key, path)
    if key is None:
        warnings.warn(f"{path}: no label column (looked for {', '.join(LABEL_KEYS)}; obs has "
                      f"{few(adata.obs.columns, 8) or 'no columns'}): embeddings and clusters without scores; "
                      "pass --label-key COLUMN or --labels CSV to score them", DataWarning, stacklevel=stacklevel)
    return key


def _add_obs(adata, obs):
    for column in obs.columns:
        if column not in adata.obs.columns:
            adata.obs[column] = obs[column].values  # rows already in adata's order; keeps categoricals


def _same_cells(cells, other, names, path):
    """``other`` with its rows in the order of ``cells`` (matched by name); else one DataError."""
    theirs = other.obs_names
    if theirs.equals(cells):
        return other
    if len(theirs) == len(cells) and theirs.is_unique and cells.is_unique and theirs.isin(cells).all():
        return other[cells]  # the same cells in another order
    n = min(len(cells), len(theirs))
    diff = np.flatnonzero(cells[:n].to_numpy() != theirs[:n].to_numpy())
    i = int(diff[0]) if diff.size else n
    mine = repr(cells[i]) if i < len(cells) else "nothing"
    yours = repr(theirs[i]) if i < len(theirs) else "nothing"
    raise DataError(f"{path}: the {names[0]} and {names[1]} modalities hold different cells ({len(cells)} vs "
                    f"{len(theirs)}; first differing at row {i}: {mine} in {names[0]}, {yours} in {names[1]}); "
                    "both must hold the same cells")


def _from_h5(path, mod2_normalized=None):
    """An scDeepCluster .h5: ``X`` (N, M) counts, ``Y`` (N,) labels, optional ``ADT_X`` (N, P)."""
    try:
        with h5py.File(path, "r") as f:
            keys = list(f.keys())
            absent = [k for k in ("X", "Y") if not isinstance(f.get(k), h5py.Dataset)]
            if absent:
                raise DataError(f"{path}: not the scDeepCluster layout: no dataset {', '.join(absent)} (it has "
                                f"{few(keys, 8) or 'nothing'}); expected X (cells x genes counts) and Y (labels)")
            X, Y = f["X"][()], f["Y"][()]
            adt = f["ADT_X"][()] if "ADT_X" in f else None
    except DataError:
        raise
    except Exception as exc:  # not HDF5 or truncated: h5py raises OSError, KeyError, ...
        raise DataError(f"{path}: not a readable .h5 ({_why(exc)}); re-copy or re-write the file") from None
    Y = np.asarray(Y)
    if Y.ndim == 2 and 1 in Y.shape:
        Y = Y.ravel()
    if Y.ndim != 1:
        raise DataError(f"{path}: Y has shape {Y.shape}; expected one label per cell")
    n = Y.size
    oriented = _cells_by_features(X, n, path, "X")
    if oriented is None:
        raise DataError(f"{path}: X is {' x '.join(map(str, np.shape(X)))} but Y has {n} labels; neither side of X "
                        "matches: re-write the file with X cells x genes")
    X = oriented
    cells = pd.Index([f"cell{i}" for i in range(n)])
    genes = pd.Index([f"gene{j}" for j in range(X.shape[1])])
    fix = "the models need raw counts: re-write the file with them"
    adata = anndata.AnnData(X=checked_counts(X, path, "X", cells, genes, fix),
                            obs=pd.DataFrame({"Y": Y}, index=cells), var=pd.DataFrame(index=genes))
    if adt is not None:
        oriented = _cells_by_features(adt, n, path, "ADT_X")
        if oriented is None:
            raise DataError(f"{path}: the rna and adt modalities hold different cells (X has {n} cells, ADT_X is "
                            f"{' x '.join(map(str, np.shape(adt)))}); ADT_X needs one row per cell of X")
        proteins = pd.Index([f"adt{j}" for j in range(oriented.shape[1])])
        adata.obsm[MOD2_KEY], normalized = second_modality(oriented, path, "ADT_X", cells, proteins,
                                                           fix + ", or pass --mod2-normalized", mod2_normalized)
        adata.uns[MOD2_KEY] = {"modality": "ADT", "features": list(proteins), "path": str(path),
                               "normalized": normalized}
    return finish(adata, path, "Y", None, Flags(labels="Y"))


def _cells_by_features(matrix, n, path, name):
    """``matrix`` with one row per cell of the ``n`` labels, transposed if stored features x cells; None if
    neither side has length ``n``. A square one is read as rows = cells (the layout's), with a warning."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise DataError(f"{path}: {name} has shape {matrix.shape}; expected a 2-D cells x features matrix")
    rows, cols = matrix.shape
    if rows == n and cols == n:
        warnings.warn(f"{path}: {name} is square ({n} x {n}) and Y has {n} labels: reading its rows as cells, "
                      "as the scDeepCluster layout stores them", DataWarning, stacklevel=4)
    if rows == n:
        return matrix
    if cols == n:
        return matrix.T  # stored features x cells: Y's length leaves no doubt
    return None
