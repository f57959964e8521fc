"""The course's data folder (the assignment's Mouse Pancreas) as one AnnData of raw counts.

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
import pickle
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellembed.data.checks import BATCH_KEY, LABEL_KEY, DataError, count_problem, drop_empty, few

COURSE_FILES = ("MP.pickle", "MP_genes.pickle", "cell_IDs.pkl", "sample_info.csv")
ID_COLUMN = "Unnamed: 0"
LABEL_COLUMN = "assigned_cluster"
BATCH_COLUMN = "batch"
HOW_TO_GET = (
    "copy the course's data folder (MP.pickle, MP_genes.pickle, cell_IDs.pkl, sample_info.csv) "
    "into data/, pass --data-dir DIR (or set COMP565_DATA_DIR), or rebuild it from GEO with --download"
)


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
                        f"({few(absent)}); the two files come from different data sets")
    absent = [g for g in genes if g not in df.columns]
    if absent:
        raise DataError(f"{data_dir / 'MP_genes.pickle'}: {len(absent)} gene(s) are not columns of "
                        f"MP.pickle ({few(absent)}); the two files come from different data sets")
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
    adata.obs[LABEL_KEY] = pd.Categorical(sample_info[LABEL_COLUMN].astype(str).to_numpy())
    adata.obs[BATCH_KEY] = pd.Categorical(sample_info[BATCH_COLUMN].to_numpy())
    return drop_empty(adata, data_dir / "MP.pickle")


def _read_sample_info(path):
    try:
        info = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc}); re-copy it from "
                        "the course's data folder") from None
    missing = [c for c in (LABEL_COLUMN, BATCH_COLUMN) if c not in info.columns]
    if missing:
        raise DataError(f"{path}: no column {', '.join(repr(c) for c in missing)} (it has "
                        f"{few(info.columns, 5)}); re-copy it from the course's data folder")
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
        raise DataError(f"{path}: duplicate {what}s ({few(dup)}); every {what} must appear once")


def _counts_matrix(counts, path):
    X, problem = count_problem(counts)
    if problem is None:
        return X.astype(np.int64)
    if problem[0] == "text":
        raise DataError(f"{path}: gene column(s) {few(problem[1])} are not numeric; the assignment "
                        "needs raw UMI counts")
    kind, n, i, j = problem
    where = f"cell {counts.index[i]!r}, gene {counts.columns[j]!r}"
    if kind == "non-integer":
        raise DataError(f"{path}: non-integer count {X[i, j]:g} ({where}); the assignment needs raw UMI "
                        "counts, not normalized data")
    raise DataError(f"{path}: {n} {kind} count(s), e.g. {where}; the assignment needs raw UMI counts")


