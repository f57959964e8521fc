"""Every data set as one AnnData of raw counts, checked before any training.

`load_dataset` takes a name of `DATASETS` (resolved under a data root, see
`default_data_root`) or a path (``.h5ad``, scDeepCluster ``.h5``, MuData ``.h5mu``, or the
course's folder) and returns cells x genes raw counts with the labels in
``obs[LABEL_KEY]`` and the batch, when there is one, in ``obs[BATCH_KEY]``.

The course's data folder holds four files (``MP.pickle``, ``MP_genes.pickle``,
``cell_IDs.pkl``, ``sample_info.csv``) and the assignment reads them as

    df = pickle.load(MP.pickle).set_index("Unnamed: 0")
    df = df.loc[list(cell_IDs)]
    X = df[MP_genes].values           # cells x genes raw counts
    labels = sample_info["assigned_cluster"]

`load_course_data` does the same, with two differences: the pickles go through an
allow-list unpickler (a pickle can run any code; these may only rebuild a DataFrame, an
Index and a tuple of strings), and every way the folder can be wrong ends in one
`DataError` that names the file and the fix.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

COURSE_FILES = ("MP.pickle", "MP_genes.pickle", "cell_IDs.pkl", "sample_info.csv")
ID_COLUMN = "Unnamed: 0"
LABEL_COLUMN = "assigned_cluster"
BATCH_COLUMN = "batch"
HOW_TO_GET = (
    "copy the course's data folder (MP.pickle, MP_genes.pickle, cell_IDs.pkl, sample_info.csv) "
    "into data/, pass --data-dir DIR (or set COMP565_DATA_DIR), or rebuild it from GEO with --download"
)


class DataError(Exception):
    """The data folder is missing or wrong; the message names the file and the fix."""


class DataWarning(UserWarning):
    """Something in the data folder was fixed on the way in (cells or genes without counts dropped)."""


# What a pickled DataFrame (any pandas >= 1.0), a pickled Index and a tuple of strings need:
# data containers and their rebuild helpers, nothing that can call arbitrary code.
_SAFE_GLOBALS = frozenset({
    ("_codecs", "encode"),  # how protocol 2 stores bytes (str -> bytes; torch's weights_only allows it too)
    ("builtins", "slice"),
    ("builtins", "object"),
    ("collections", "OrderedDict"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("pandas.core.frame", "DataFrame"),
    ("pandas.core.series", "Series"),
    ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.internals.managers", "BlockManager"),
    ("pandas.core.internals.managers", "SingleBlockManager"),
    ("pandas.core.internals.blocks", "new_block"),
    ("pandas._libs.internals", "_unpickle_block"),
    ("pandas._libs.internals", "BlockPlacement"),
})


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, fh, name):
        super().__init__(fh)
        self._name = name

    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module  # its name in protocols 0-2
        if (module, name) not in _SAFE_GLOBALS:
            raise DataError(
                f"{self._name}: refusing to unpickle it: it asks for {module}.{name}, which is "
                "not a numpy/pandas data class (a pickle can run code). Re-copy the file from "
                "the course's data folder."
            )
        return super().find_class(module, name)


def safe_load_pickle(path):
    """Unpickle ``path`` allowing only the classes of a DataFrame, an Index and builtins.

    Raises
    ------
    DataError
        Unreadable, truncated or not a pickle, or asks for any other class.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror}); {HOW_TO_GET}") from None
    try:
        return _AllowListUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except Exception as exc:  # truncated, corrupt, or not a pickle at all
        raise DataError(
            f"{path}: not a readable pickle ({type(exc).__name__}: {exc}); the file is damaged "
            "or truncated: re-copy it from the course's data folder"
        ) from None


def _few(items, n=3):
    items = [str(x) for x in items]
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(repr(x) for x in items[:n]) + more


def load_course_data(data_dir):
    """Read the course's data folder into an AnnData, as the assignment does.

    Parameters
    ----------
    data_dir : str or Path
        Folder with MP.pickle, MP_genes.pickle, cell_IDs.pkl and sample_info.csv.

    Returns
    -------
    anndata.AnnData, shape (N cells, M genes)
        ``X``: raw counts (CSR, int64), rows in ``cell_IDs.pkl`` order, columns the genes of
        ``MP_genes.pickle``; ``obs['Celltype']`` (categorical) and ``obs['batch']`` from
        ``sample_info.csv``. Cells and genes with no counts at all are dropped with a warning.

    Raises
    ------
    DataError
        The folder or a file is missing, unreadable or inconsistent.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise DataError(f"data folder {data_dir.absolute()} {what}; {HOW_TO_GET}")
    missing = [name for name in COURSE_FILES if not (data_dir / name).is_file()]
    if missing:
        try:
            below = sorted(sub for sub in data_dir.iterdir() if sub.is_dir() and (sub / "MP.pickle").is_file())
        except OSError:  # an unreadable folder: no hint, the message below
            below = []
        if below:  # --data-dir names the folder that holds the course folder
            raise DataError(f"data folder {data_dir.absolute()} lacks {', '.join(missing)}; the course folder "
                            f"is one level down at {below[0].absolute()}: pass --data-dir {below[0]}")
        raise DataError(f"data folder {data_dir.absolute()} lacks {', '.join(missing)}; {HOW_TO_GET}")

    df = safe_load_pickle(data_dir / "MP.pickle")
    genes = safe_load_pickle(data_dir / "MP_genes.pickle")
    cell_ids = safe_load_pickle(data_dir / "cell_IDs.pkl")
    sample_info = _read_sample_info(data_dir / "sample_info.csv")

    if not isinstance(df, pd.DataFrame):
        raise DataError(f"{data_dir / 'MP.pickle'}: holds a {type(df).__name__}, not the cells x genes "
                        "DataFrame; re-copy it from the course's data folder")
    if ID_COLUMN not in df.columns:
        raise DataError(f"{data_dir / 'MP.pickle'}: no {ID_COLUMN!r} column of cell ids; re-copy it "
                        "from the course's data folder")
    genes = _as_str_list(genes, data_dir / "MP_genes.pickle", "gene names")
    cell_ids = _as_str_list(cell_ids, data_dir / "cell_IDs.pkl", "cell ids")

    _check_unique(cell_ids, data_dir / "cell_IDs.pkl", "cell id")
    _check_unique(genes, data_dir / "MP_genes.pickle", "gene")
    df_ids = df[ID_COLUMN].astype(str)
    _check_unique(df_ids, data_dir / "MP.pickle", f"{ID_COLUMN!r} cell id")
    df = df.set_index(df_ids)

    absent = [c for c in cell_ids if c not in df.index]
    if absent:
        raise DataError(f"{data_dir / 'cell_IDs.pkl'}: {len(absent)} cell id(s) are not in MP.pickle "
                        f"({_few(absent)}); the two files come from different data sets")
    absent = [g for g in genes if g not in df.columns]
    if absent:
        raise DataError(f"{data_dir / 'MP_genes.pickle'}: {len(absent)} gene(s) are not columns of "
                        f"MP.pickle ({_few(absent)}); the two files come from different data sets")
    if len(sample_info) != len(cell_ids):
        raise DataError(f"{data_dir / 'sample_info.csv'}: {len(sample_info)} rows but cell_IDs.pkl has "
                        f"{len(cell_ids)} cells; both must list the same cells in the same order")
    if ID_COLUMN in sample_info.columns:
        ids = sample_info[ID_COLUMN].astype(str).to_numpy()
        bad = np.flatnonzero(ids != np.asarray(cell_ids))
        if bad.size:
            raise DataError(f"{data_dir / 'sample_info.csv'}: row {bad[0] + 2} is cell {ids[bad[0]]!r} but "
                            f"cell_IDs.pkl lists {cell_ids[bad[0]]!r} there ({bad.size} rows differ); "
                            "both must list the same cells in the same order")

    counts = df.loc[cell_ids, genes]
    X = _counts_matrix(counts, data_dir / "MP.pickle")
    adata = anndata.AnnData(
        X=sp.csr_matrix(X),
        obs=pd.DataFrame(index=pd.Index(cell_ids, name="cell")),
        var=pd.DataFrame(index=pd.Index(genes, name="gene")),
    )
    adata.obs["Celltype"] = pd.Categorical(sample_info[LABEL_COLUMN].astype(str).to_numpy())
    adata.obs["batch"] = pd.Categorical(sample_info[BATCH_COLUMN].to_numpy())
    return _drop_empty(adata, data_dir / "MP.pickle")


def _read_sample_info(path):
    try:
        info = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc}); re-copy it from "
                        "the course's data folder") from None
    missing = [c for c in (LABEL_COLUMN, BATCH_COLUMN) if c not in info.columns]
    if missing:
        raise DataError(f"{path}: no column {', '.join(repr(c) for c in missing)} (it has "
                        f"{_few(info.columns, 5)}); re-copy it from the course's data folder")
    for column, need in ((LABEL_COLUMN, "a cell type"), (BATCH_COLUMN, "its mouse (batch)")):
        if info[column].isna().any():
            row = int(np.flatnonzero(info[column].isna())[0]) + 2
            raise DataError(f"{path}: empty {column!r} on line {row}; every cell needs {need}")
    return info


def _as_str_list(obj, path, what):
    if isinstance(obj, (pd.Index, pd.Series, np.ndarray, list, tuple)):
        items = list(obj)
        if not items:
            raise DataError(f"{path}: the list of {what} is empty; re-copy it from the course's data folder")
        if all(isinstance(x, str) for x in items):
            return [str(x) for x in items]  # plain str, also for numpy's str_
        bad = next(x for x in items if not isinstance(x, str))
        raise DataError(f"{path}: expected {what} as strings, found {type(bad).__name__} {bad!r}; "
                        "re-copy it from the course's data folder")
    raise DataError(f"{path}: expected a list of {what} (strings), found a {type(obj).__name__}; "
                    "re-copy it from the course's data folder")


def _check_unique(items, path, what):
    dup = pd.Index(items)
    dup = dup[dup.duplicated()].unique()
    if len(dup):
        raise DataError(f"{path}: duplicate {what}s ({_few(dup)}); every {what} must appear once")


# the ways a table of numbers is not raw UMI counts, checked in this order
COUNT_CHECKS = (("NaN", np.isnan), ("infinite", np.isinf), ("negative", lambda a: a < 0),
                ("non-integer", lambda a: a != np.round(a)))


def count_problem(counts):
    """The counts of a cells x genes DataFrame as float64, and the first reason they are not raw counts.

    Parameters
    ----------
    counts : pandas.DataFrame, shape (N, M)

    Returns
    -------
    values : ndarray of float64, shape (N, M), or None when some columns hold text
    problem : None, ``("text", columns)``, or ``(kind, n, i, j)``: ``n`` entries fail the check
        ``kind`` of `COUNT_CHECKS`, the first at row ``i``, column ``j``
    """
    text = [c for c, t in counts.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
    if text:
        return None, ("text", text)
    values = counts.to_numpy(dtype=np.float64)
    for kind, test in COUNT_CHECKS:
        hit = test(values)
        if hit.any():
            i, j = np.argwhere(hit)[0]
            return values, (kind, int(hit.sum()), i, j)
    return values, None


def _counts_matrix(counts, path):
    X, problem = count_problem(counts)
    if problem is None:
        return X.astype(np.int64)
    if problem[0] == "text":
        raise DataError(f"{path}: gene column(s) {_few(problem[1])} are not numeric; the assignment "
                        "needs raw UMI counts")
    kind, n, i, j = problem
    where = f"cell {counts.index[i]!r}, gene {counts.columns[j]!r}"
    if kind == "non-integer":
        raise DataError(f"{path}: non-integer count {X[i, j]:g} ({where}); the assignment needs raw UMI "
                        "counts, not normalized data")
    raise DataError(f"{path}: {n} {kind} count(s), e.g. {where}; the assignment needs raw UMI counts")


def _drop_empty(adata, path, fix="the assignment needs the raw UMI counts: re-copy it from the course's data folder"):
    """Drop cells and genes without a single count (a cell's normalized profile would be 0/0).

    Parameters
    ----------
    adata : anndata.AnnData, shape (N, M)
        ``X`` raw counts; ``obsm`` entries are subset with the cells.
    path : str or Path
        Named in the warning and the error.
    fix : str
        What the error tells the user to do.

    Returns
    -------
    anndata.AnnData, shape (N', M'), the cells and genes with a positive total

    Raises
    ------
    DataError
        Fewer than 2 cells or genes are left.
    """
    cell_tot = np.asarray(adata.X.sum(axis=1)).ravel()
    gene_tot = np.asarray(adata.X.sum(axis=0)).ravel()
    n_cells, n_genes = int((cell_tot == 0).sum()), int((gene_tot == 0).sum())
    if n_cells or n_genes:
        warnings.warn(
            f"{path}: dropping {n_cells} cell(s) and {n_genes} gene(s) with zero total counts "
            f"(of {adata.n_obs} cells and {adata.n_vars} genes)",
            DataWarning,
            stacklevel=3,
        )
        adata = adata[cell_tot > 0, gene_tot > 0].copy()
    if adata.n_obs < 2 or adata.n_vars < 2:
        raise DataError(f"{path}: fewer than 2 cells or genes have any counts ({adata.n_obs} cells x "
                        f"{adata.n_vars} genes); {fix}")
    return adata


# ---------------------------------------------------------------------------------------------
# Every data set by name or by path: one AnnData of raw counts, labels and batch under fixed keys

LABEL_KEY = "Celltype"  # every loader puts the labels here (the assignment's evaluate_ari reads this name)
BATCH_KEY = "batch"  # and the batch here, when the data set has one
LABEL_KEYS = ("cell_type", "celltype", "Celltype", "assigned_cluster", "labels", "label")  # tried in this order
COUNTS_LAYER = "counts"  # where h5ad files with normalized X keep their raw counts (NeurIPS 2021, scvi-tools)
MODALITIES = (("prot", "ADT"), ("adt", "ADT"), ("atac", "ATAC"))  # part of a MuData modality's name -> its kind
DATA_ROOT_ENV = "A4_DATA_ROOT"


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
_NEEDS_COUNTS = "the file needs raw counts in at least 2 cells and 2 genes"


def default_data_root():
    """The folder the names of `DATASETS` are looked up in: ``$A4_DATA_ROOT``, else ``data``.

    Returns
    -------
    Path
        Relative to the current folder unless ``A4_DATA_ROOT`` is absolute.
    """
    return Path(os.environ.get(DATA_ROOT_ENV) or "data")


def load_dataset(data, data_root=None, label_key=None, batch_key=None, layer=None):
    """Load a data set by name or by path as raw counts with labels (and batch) under fixed keys.

    Parameters
    ----------
    data : str or Path
        A name of `DATASETS` (looked up under ``data_root``), or a path: an ``.h5ad`` file, an
        ``.h5`` file in the scDeepCluster layout (``X`` cells x genes counts, ``Y`` labels,
        optional ``ADT_X`` cells x proteins counts of a CITE-seq set), a MuData ``.h5mu`` file
        (the modality named ``rna``, else the first, plus at most one more), or a folder with the
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
        The layer holding the raw counts, for both modalities (``.h5ad``, ``.h5mu``); default ``X``.

    Returns
    -------
    anndata.AnnData, shape (N cells, M genes)
        ``X``: raw counts, CSR float32 (the course's folder: int64, exactly `load_course_data`).
        ``obs[LABEL_KEY]``: categorical of str labels. ``obs[BATCH_KEY]``: categorical of str,
        only when there is a batch. The file's other obs columns keep their names (the label and
        batch columns are moved, and a column already named ``Celltype`` or ``batch`` that was not
        chosen is replaced); for two modalities, the second's obs columns that the first lacks are
        added. ``var``: the file's (``"gene0"``.. for ``.h5`` files, which store no names).
        Multimodal data: ``obsm["mod2"]`` (N, M2) float32 ndarray of the second modality's raw
        counts, and ``uns["mod2"] = {"modality": "ADT" or "ATAC", "features": M2 names, "path"}``.
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
    if isinstance(data, str) and data in DATASETS:
        root = Path(data_root) if data_root is not None else default_data_root()
        return _load_named(data, root, label_key, batch_key, layer)
    path = Path(data)
    if not path.exists() and not path.suffix and len(path.parts) == 1:
        raise DataError(f"unknown data set {str(data)!r}; the names are {', '.join(DATASETS)}, and a path to an "
                        ".h5ad, .h5 (scDeepCluster X/Y) or .h5mu file, or to the course's data folder, also works")
    return _load_path(path, path.name if path.is_dir() else path.stem, label_key, batch_key, layer)


def _load_named(name, root, label_key, batch_key, layer):
    spec = DATASETS[name]
    folder = root / spec.folder
    if not folder.is_dir():
        course = spec.file is None and all((root / f).is_file() for f in COURSE_FILES)
        also = f"; or pass the course's folder itself as a path: --data {root}" if course else ""
        raise DataError(f"data set {name!r}: no folder {folder.absolute()}; pass --data-root DIR or set "
                        f"{DATA_ROOT_ENV}=DIR, DIR holding {spec.folder}/ (see data/README.md){also}")
    if spec.file is None:
        return _load_path(folder, name, label_key, batch_key, layer)
    return _load_path(folder / spec.file, name, label_key or spec.label_key, batch_key or spec.batch_key,
                      layer or spec.layer, None if spec.mod2 is None else folder / spec.mod2, spec.modality)


def _load_path(path, name, label_key, batch_key, layer, mod2_path=None, modality=None):
    if path.is_dir():
        _reject_flags(path, "the course's data folder (labels assigned_cluster, batch from sample_info.csv)",
                      label_key=label_key, batch_key=batch_key, layer=layer)
        adata = load_course_data(path)
    elif not path.exists():
        raise DataError(f"{path.absolute()}: no such file; pass an existing .h5ad, .h5 or .h5mu file, or one of "
                        f"the names {', '.join(DATASETS)}")
    elif path.suffix == ".h5ad":
        mod2 = None
        if mod2_path is not None:
            mod2 = (_read_h5ad(mod2_path), modality, mod2_path, ("rna", modality.lower()))
        adata = _from_anndata(_read_h5ad(path), path, label_key, batch_key, layer, mod2)
    elif path.suffix == ".h5mu":
        adata = _from_h5mu(path, label_key, batch_key, layer)
    elif path.suffix == ".h5":
        _reject_flags(path, "an scDeepCluster .h5 file (labels in Y, counts in X)",
                      label_key=label_key, batch_key=batch_key, layer=layer)
        adata = _from_h5(path)
    else:
        raise DataError(f"{path}: unknown file suffix {path.suffix!r}; pass an .h5ad, .h5 (scDeepCluster X/Y) or "
                        ".h5mu file, or the course's data folder")
    adata.uns["dataset"] = {"name": name, "path": str(path)}
    return adata


def _reject_flags(path, what, **flags):
    given = [f"--{key.replace('_', '-')}" for key, value in flags.items() if value is not None]
    if given:
        raise DataError(f"{path}: {', '.join(given)} cannot be used with {what}; leave it out")


def _why(exc):
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _read_h5ad(path):
    if not path.is_file():
        raise DataError(f"{path.absolute()}: no such file; re-copy the data set's folder")
    try:
        with warnings.catch_warnings():  # files from anndata < 0.8 (NeurIPS 2021): one notice per element
            warnings.simplefilter("ignore", anndata.OldFormatWarning)
            return anndata.read_h5ad(path)
    except Exception as exc:  # not HDF5, truncated, or not an AnnData: anndata raises many kinds
        raise DataError(f"{path}: not a readable .h5ad ({_why(exc)}); re-copy or re-write the file") from None


def _from_h5mu(path, label_key, batch_key, layer):
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
    return _from_anndata(rna, path, label_key, batch_key, layer, mod2, shared.reindex(rna.obs_names))


def _modality(name, path):
    low = name.lower()
    kind = next((kind for part, kind in MODALITIES if part in low), None)
    if kind is None:
        raise DataError(f"{path}: cannot tell what modality {name!r} holds (a name with 'prot' or 'adt' is ADT, "
                        "with 'atac' ATAC); rename it")
    return kind


def _from_anndata(rna, path, label_key, batch_key, layer, mod2=None, extra_obs=None):
    """Counts, obs and var of ``rna`` (N, M), plus ``mod2 = (AnnData, kind, path, names)``.

    ``extra_obs``: obs columns (rows in ``rna`` order) added where ``rna.obs`` lacks them.
    """
    adata = anndata.AnnData(X=_counts(rna, layer, path), obs=rna.obs.copy(), var=rna.var.copy())
    if extra_obs is not None:
        _add_obs(adata, extra_obs)
    if mod2 is not None:
        other, kind, other_path, names = mod2
        other = _same_cells(adata.obs_names, other, names, path)
        adata.obsm["mod2"] = _counts(other, layer, other_path).toarray()  # (N, M2)
        adata.uns["mod2"] = {"modality": kind, "features": [str(f) for f in other.var_names],
                             "path": str(other_path)}
        _add_obs(adata, other.obs)
    label_key = _label_key(adata.obs, label_key, path)
    batch_key = _batch_key(adata.obs, batch_key, path)
    return _finish(adata, path, label_key, f"--label-key {label_key!r}", batch_key)


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


def _label_key(obs, key, path):
    if key is not None:
        if key not in obs.columns:
            raise DataError(f"{path}: no obs column {key!r} for --label-key (obs has "
                            f"{_few(obs.columns, 8) or 'no columns'}); pass one of them")
        return key
    key = next((k for k in LABEL_KEYS if k in obs.columns), None)
    if key is None:
        raise DataError(f"{path}: no label column (looked for {', '.join(LABEL_KEYS)}; obs has "
                        f"{_few(obs.columns, 8) or 'no columns'}); pass --label-key COLUMN")
    return key


def _batch_key(obs, key, path):
    if key is None:
        return BATCH_KEY if BATCH_KEY in obs.columns else None
    if key not in obs.columns:
        raise DataError(f"{path}: no obs column {key!r} for --batch-key (obs has "
                        f"{_few(obs.columns, 8) or 'no columns'}); pass one of them or leave --batch-key out")
    return key


def _counts(adata, layer, path):
    """The raw counts of ``adata``, from ``X`` or ``layers[layer]``, checked: CSR float32 (N, M)."""
    if layer is not None and layer not in adata.layers:
        raise DataError(f"{path}: no layer {layer!r} for --layer (layers: {_few(adata.layers, 8) or 'none'}); "
                        "pass one of them, or leave --layer out to read X")
    if layer != COUNTS_LAYER and COUNTS_LAYER in adata.layers:
        fix = f"pass --layer {COUNTS_LAYER}"
    elif len(adata.layers):
        fix = f"pass --layer with the layer of raw counts (layers: {_few(adata.layers, 8)})"
    else:
        fix = "the models need raw counts: re-write the file with them in X or a layer"
    where, matrix = ("X", adata.X) if layer is None else (f"layers[{layer!r}]", adata.layers[layer])
    if matrix is None:
        raise DataError(f"{path}: the file stores no X; {fix}")
    return _checked_counts(matrix, path, where, adata.obs_names, adata.var_names, fix)


def _checked_counts(matrix, path, where, cells, features, fix):
    """``matrix`` (N, M) as CSR float32 after `count_problem`'s checks on its stored entries."""
    if not sp.issparse(matrix):
        matrix = np.asarray(matrix)
    if matrix.dtype.kind not in "biuf":
        raise DataError(f"{path}: {where} holds {matrix.dtype} values, not numbers; {fix}")
    X = sp.csr_matrix(matrix)
    values, problem = count_problem(pd.DataFrame({"count": X.data}))
    if problem is not None:
        kind, n, k, _ = problem
        i = int(np.searchsorted(X.indptr, k, side="right")) - 1  # the row of stored entry k
        what = "normalized values" if kind == "non-integer" else f"{kind} values"
        raise DataError(f"{path}: {where} holds {what} ({n} entries, e.g. {values[k, 0]:g} at cell {cells[i]!r}, "
                        f"feature {features[X.indices[k]]!r}), not raw counts; {fix}")
    return X.astype(np.float32)


def _as_str(values):
    """Labels or batches as str; integral floats (``Y`` codes stored as 1.0) print as ``'1'``."""
    arr = pd.Series(values).to_numpy()
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8")
    elif arr.dtype.kind == "f" and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    return arr.astype(str)


def _finish(adata, path, label_key, label_flag, batch_key):
    """Move labels (and batch) to `LABEL_KEY` (`BATCH_KEY`), drop unlabelled and empty cells, check."""
    missing = adata.obs[label_key].isna().to_numpy()
    if missing.all():
        raise DataError(f"{path}: {label_flag} is empty for every cell; pass the column that holds the labels")
    if missing.any():
        warnings.warn(f"{path}: dropping {int(missing.sum())} of {adata.n_obs} cell(s) without a label in "
                      f"{label_flag}", DataWarning, stacklevel=4)
        adata = adata[~missing].copy()
    labels = _as_str(adata.obs[label_key])
    batches = None
    if batch_key is not None:
        empty = adata.obs[batch_key].isna().to_numpy()
        if empty.any():
            raise DataError(f"{path}: --batch-key {batch_key!r} is empty for {int(empty.sum())} labelled cell(s); "
                            "fill it in, or leave --batch-key out")
        batches = _as_str(adata.obs[batch_key])
    for column in {label_key, batch_key} - {None}:
        del adata.obs[column]
    adata.obs[LABEL_KEY] = pd.Categorical(labels)
    if batches is not None:
        adata.obs[BATCH_KEY] = pd.Categorical(batches)
    adata = _drop_empty(adata, path, fix=_NEEDS_COUNTS)
    for column in (LABEL_KEY, BATCH_KEY):
        if column in adata.obs.columns:
            adata.obs[column] = adata.obs[column].cat.remove_unused_categories()
    classes = adata.obs[LABEL_KEY].cat.categories
    if len(classes) < 2:
        raise DataError(f"{path}: {label_flag} has one class ({classes[0]!r}); the metrics need at least 2")
    return adata


def _from_h5(path):
    """An scDeepCluster .h5: ``X`` (N, M) counts, ``Y`` (N,) labels, optional ``ADT_X`` (N, P)."""
    try:
        with h5py.File(path, "r") as f:
            keys = list(f.keys())
            absent = [k for k in ("X", "Y") if not isinstance(f.get(k), h5py.Dataset)]
            if absent:
                raise DataError(f"{path}: not the scDeepCluster layout: no dataset {', '.join(absent)} (it has "
                                f"{_few(keys, 8) or 'nothing'}); expected X (cells x genes counts) and Y (labels)")
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
    adata = anndata.AnnData(X=_checked_counts(X, path, "X", cells, genes, fix),
                            obs=pd.DataFrame({"Y": Y}, index=cells), var=pd.DataFrame(index=genes))
    if adt is not None:
        oriented = _cells_by_features(adt, n, path, "ADT_X")
        if oriented is None:
            raise DataError(f"{path}: the rna and adt modalities hold different cells (X has {n} cells, ADT_X is "
                            f"{' x '.join(map(str, np.shape(adt)))}); ADT_X needs one row per cell of X")
        proteins = pd.Index([f"adt{j}" for j in range(oriented.shape[1])])
        adata.obsm["mod2"] = _checked_counts(oriented, path, "ADT_X", cells, proteins, fix).toarray()  # (N, P)
        adata.uns["mod2"] = {"modality": "ADT", "features": list(proteins), "path": str(path)}
    return _finish(adata, path, "Y", "Y", None)


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
