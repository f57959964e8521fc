"""What every loader and the model API check: the one place of the data's key names, errors and
count checks.

Every data set becomes one AnnData of raw counts with its labels in ``obs[LABEL_KEY]`` and its
batch, when it has one, in ``obs[BATCH_KEY]``; a value that is not a raw count, a missing key or
an empty cell ends in one `DataError` naming the file (or AnnData), the key and the fix.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellembed.cli import Notice

LABEL_KEY = "Celltype"  # every loader puts the labels here (the assignment's evaluate_ari reads this name)
BATCH_KEY = "batch"  # and the batch here, when the data set has one
LABEL_KEYS = ("cell_type", "celltype", "Celltype", "assigned_cluster", "labels", "label")  # tried in this order
COUNTS_LAYER = "counts"  # where h5ad files with normalized X keep their raw counts (NeurIPS 2021, scvi-tools)

class DataError(Exception):
    """The data folder is missing or wrong; the message names the file and the fix."""


class DataWarning(Notice):
    """Something in the data folder was fixed on the way in (cells or genes without counts dropped)."""


def few(items, n=3):
    items = [str(x) for x in items]
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(repr(x) for x in items[:n]) + more



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


def checked_counts(matrix, path, where, cells, features, fix):
    """``matrix`` (N, M) as CSR float32 after `count_problem`'s checks on its stored entries."""
    if not sp.issparse(matrix):
        matrix = np.asarray(matrix)
    if matrix.dtype.kind not in "biuf":
        raise DataError(f"{path}: {where} holds {matrix.dtype} values, not numbers; {fix}")
    X = sp.csr_matrix(matrix)
    problem = stored_problem(X.data)
    if problem is not None:
        kind, n, k = problem
        i = int(np.searchsorted(X.indptr, k, side="right")) - 1  # the row of stored entry k
        what = "normalized values" if kind == "non-integer" else f"{kind} values"
        raise DataError(f"{path}: {where} holds {what} ({n} entries, e.g. {float(X.data[k]):g} at cell "
                        f"{cells[i]!r}, feature {features[X.indices[k]]!r}), not raw counts; {fix}")
    return X.astype(np.float32)


# Entries per float64 temporary of `stored_problem` (32 MiB): its memory does not grow with the data.
CHECK_CHUNK = 2**22


def stored_problem(values):
    """The first reason the stored entries ``values`` (1-D) are not raw counts, as `count_problem` finds it.

    The checks of `COUNT_CHECKS` in their order, each over ``CHECK_CHUNK`` entries at a time
    (float64 temporaries of that size, not of the data's).

    Returns
    -------
    None, or ``(kind, n, k)``: ``n`` entries fail the check ``kind``, the first is entry ``k``.
    """
    if values.dtype.kind in "bu":  # booleans and unsigned integers are counts
        return None
    for kind, test in COUNT_CHECKS:
        if values.dtype.kind == "i" and kind != "negative":
            continue  # integers are finite and whole
        n, first = 0, None
        for lo in range(0, values.size, CHECK_CHUNK):
            hit = test(values[lo:lo + CHECK_CHUNK].astype(np.float64, copy=False))
            count = int(np.count_nonzero(hit))
            if count and first is None:
                first = lo + int(np.argmax(hit))
            n += count
        if n:
            return kind, n, first
    return None


def second_modality(matrix, path, where, cells, features, fix, normalized=None):
    """A second modality (N, M2) as a dense float32 array, and whether it is already normalized.

    Parameters
    ----------
    normalized : bool, optional
        True (``--mod2-normalized``): the values are taken as they are (finite numbers needed).
        None: raw counts, unless they are not (negative or non-integer values, as the CLR-normalized
        protein counts of public CITE-seq files): then read as normalized, with a `DataWarning`.
        False: raw counts required (`checked_counts`).

    Returns
    -------
    values : ndarray, shape (N, M2), float32
    normalized : bool
    """
    if normalized is False:
        return checked_counts(matrix, path, where, cells, features, fix).toarray(), False
    dense = np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix)
    if dense.dtype.kind not in "biuf" or not np.isfinite(dense).all():
        what = "values that are not numbers" if dense.dtype.kind not in "biuf" else "NaN or infinite values"
        raise DataError(f"{path}: {where} holds {what}; the second modality needs finite numbers")
    if normalized is None:
        _, problem = count_problem(pd.DataFrame({"value": dense.ravel()}))
        if problem is None:
            return dense.astype(np.float32), False
        warnings.warn(f"{path}: {where} holds {'negative' if problem[0] == 'negative' else 'non-integer'} values "
                      "(e.g. CLR-normalized protein counts): read as already normalized, its normalization skipped "
                      "(the RNA counts stay raw)", DataWarning, stacklevel=3)
    return dense.astype(np.float32), True


def drop_empty(adata, path, fix="the assignment needs the raw UMI counts: re-copy it from the course's data folder"):
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
