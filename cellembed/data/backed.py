"""Counts larger than memory: an AnnData opened with ``backed="r"``, read in row chunks.

    adata = anndata.read_h5ad("atlas.h5ad", backed="r")       # obs and var in memory, X on disk
    model = get_model("vae")().fit(adata, labels_key="cell_type")
    latent = model.get_latent(adata)                            # (N, d), streamed the same way

`setup_backed` is `cellembed.data.setup_anndata`'s branch for such an AnnData: it checks the
counts chunk by chunk (the checks of an in-memory matrix, with the same messages) and returns
a checked AnnData that holds ``obs`` and ``var`` but no ``X``: its counts are a `BackedCounts`,
reached through `counts` (``uns[BACKED_KEY]``). The models that stream (``pca``, ``ae``,
``vae``, ``vsc``, ``gmvae``: class flag ``streams_backed``) read `BackedCounts` where they read
a CSR matrix: rows by index (a minibatch), row chunks (a pass over the data), row and column
sums. Memory: ``obs``, ``var``, one chunk and the model's own state; never the N x M matrix.

A backed fit gives the latent of an in-memory fit of the same file (same seed), bit for bit for
the minibatch models: every value a model computes from a row depends only on that row, and a
minibatch holds the same rows in the same order (tests/test_backed.py).
"""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.sparse as sp

from cellembed.data.checks import DataError, checked_counts, few

BACKED_KEY = "backed_counts"  # uns key of a checked backed AnnData's `BackedCounts`

# Values per chunk of a pass over the data (32 MiB of float64 when densified): memory that does not
# grow with the cells. Rows per chunk: CHUNK_VALUES // M.
CHUNK_VALUES = 2**22


def chunk_rows(n_genes):
    """Rows of a chunk of ``n_genes`` columns: at most `CHUNK_VALUES` values, at least 1 row."""
    return max(1, CHUNK_VALUES // max(1, n_genes))


class BackedCounts:
    """Raw counts (N, M) read from disk a few rows at a time, handed out as CSR float32.

    Parameters
    ----------
    matrix : anndata CSR dataset or h5py.Dataset, shape (N, M_file)
        A backed AnnData's ``X`` (or a layer opened from its file); read-only.
    columns : ndarray of int, shape (M,), optional
        The file's columns in the order handed out (genes matched by name); default all.
    where : str
        How errors name the data.

    Attributes
    ----------
    shape : tuple of int
        (N, M).
    dtype : numpy.dtype
        float32, the dtype of every block handed out.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, matrix, columns=None, where="adata"):
        self.matrix, self.columns, self.where = matrix, columns, where
        n, m = matrix.shape
        self.shape = (int(n), int(m if columns is None else len(columns)))
        self._last = (None, None)  # (key, block): the "nb" models read the same rows twice per batch

    def __len__(self):
        return self.shape[0]

    def select_columns(self, columns):
        """A `BackedCounts` of the columns ``columns`` (indices into this one's), same file."""
        columns = np.asarray(columns, dtype=np.int64)
        base = columns if self.columns is None else self.columns[columns]
        return BackedCounts(self.matrix, base, self.where)

    def _read(self, rows):
        """Rows ``rows`` (a slice, or sorted unique int ndarray) of the file as CSR float32, our columns."""
        block = self.matrix[rows]
        block = sp.csr_matrix(block) if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
        if self.columns is not None:
            block = block[:, self.columns]
        block = block.astype(np.float32, copy=False)
        if not block.has_canonical_format:
            block.sum_duplicates()
        return block

    def __getitem__(self, index):
        """Rows ``index`` (a slice, an int, or int ndarray / LongTensor (B,) in any order) -> CSR float32 (B, M)."""
        if isinstance(index, tuple):  # X[rows, :] as scipy takes it
            rows, cols = index
            block = self[rows]
            return block if isinstance(cols, slice) and cols == slice(None) else block[:, cols]
        if hasattr(index, "numpy"):  # a torch LongTensor
            index = index.numpy()
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step != 1:
                return self[np.arange(start, stop, step)]
            key = ("slice", start, stop)
            if self._last[0] == key:
                return self._last[1]
            block = self._read(slice(start, stop)) if stop > start else sp.csr_matrix((0, self.shape[1]),
                                                                                        dtype=np.float32)
        else:
            index = np.atleast_1d(np.asarray(index, dtype=np.int64))
            key = ("rows", index.tobytes())
            if self._last[0] == key:
                return self._last[1]
            order = np.argsort(index, kind="stable")
            unique, inverse = np.unique(index[order], return_inverse=True)  # h5py reads increasing indices
            block = self._read(unique)[inverse]  # back to the rows asked for, in their order
            block = block[np.argsort(order, kind="stable")]
        self._last = (key, block)
        return block

    def chunks(self, rows=None):
        """``(start, block)`` for consecutive row blocks covering every cell (block: CSR float32)."""
        rows = rows or chunk_rows(self.shape[1])
        for start in range(0, self.shape[0], rows):
            yield start, self[start:start + rows]

    def to_dask(self, transform=None):
        """A lazy dask array (N, M) of CSR float32 row chunks, each read from disk when computed.

        For a library that takes dask arrays (scanpy's ``highly_variable_genes``): computed with
        dask's synchronous scheduler, it holds one chunk at a time.

        Parameters
        ----------
        transform : callable, optional
            ``CSR (B, M) -> CSR (B, M)`` float32 applied to each chunk (e.g. a row-wise
            normalization, which gives each row its value in the transform of every cell).
        """
        import dask
        import dask.array as da

        def read(start, stop):
            block = self[start:stop]
            return block if transform is None else transform(block)

        meta = sp.csr_matrix((0, 0), dtype=np.float32)
        rows = chunk_rows(self.shape[1])
        parts = [da.from_delayed(dask.delayed(read)(start, min(start + rows, self.shape[0])), meta=meta,
                                 shape=(min(rows, self.shape[0] - start), self.shape[1]), dtype=np.float32)
                 for start in range(0, self.shape[0], rows)]
        return da.concatenate(parts)

    def sum(self, axis=None):
        """Row (axis=1, (N, 1)) or column (axis=0, (1, M)) sums, float64, as a numpy matrix like scipy's."""
        if axis == 1:
            return np.concatenate([np.asarray(b.sum(axis=1), dtype=np.float64) for _, b in self.chunks()])
        if axis == 0:
            total = np.zeros((1, self.shape[1]))
            for _, block in self.chunks():
                total += block.sum(axis=0)
            return total
        return float(self.sum(axis=0).sum())


def is_backed(data):
    """Whether a checked AnnData holds its counts on disk (a `BackedCounts`)."""
    return BACKED_KEY in data.uns


def counts(data):
    """The raw counts of a checked AnnData: its CSR ``X``, or its `BackedCounts`."""
    return data.uns[BACKED_KEY] if BACKED_KEY in data.uns else data.X


def row_chunks(X, rows=None):
    """``(start, CSR block)`` over every row of a CSR matrix or a `BackedCounts`, in order."""
    if isinstance(X, BackedCounts):
        yield from X.chunks(rows)
        return
    rows = rows or chunk_rows(X.shape[1])
    for start in range(0, X.shape[0], rows):
        yield start, X[start:start + rows]


def backed_matrix(adata, layer, where, flag):
    """The counts of a backed AnnData: ``X`` on disk, or ``layers[layer]``, ``(matrix, name)``.

    anndata keeps only ``X`` on disk in backed mode (its layers are read into memory when the
    file is opened), so a file larger than memory needs its raw counts in ``X``.
    """
    if layer is None:
        if adata.X is None:
            raise DataError(f"{where}: it stores no X; pass {flag.rstrip('=')} with the layer of raw counts")
        return adata.X, "X"
    if layer == "raw":
        raise DataError(f"{where}: a backed AnnData's adata.raw is not streamed; write the raw counts to X of the "
                        ".h5ad, or open it in memory (anndata.read_h5ad without backed)")
    if layer not in adata.layers:
        sep = " " if flag.startswith("--") else ""
        raise DataError(f"{where}: no layer {layer!r} for {flag}{sep} (layers: {few(adata.layers, 8) or 'none'}); "
                        f"pass one of them, or leave {flag.rstrip('=')} out to read X")
    return adata.layers[layer], f"layers[{layer!r}]"


def check_backed_counts(X, where, name, cells, genes, fix):
    """Check every chunk of ``X`` (a `BackedCounts`) as `checked_counts` checks a matrix; cell totals (N,).

    Raises
    ------
    DataError
        The first chunk holding a value that is not a raw count (the message names the cell and
        gene, as for an in-memory matrix).
    """
    totals = np.empty(X.shape[0])
    for start, block in X.chunks():
        stop = start + block.shape[0]
        checked_counts(block, where, name, cells[start:stop], genes, fix)
        totals[start:stop] = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
    return totals


def fingerprint_backed(X, cell_names):
    """A digest of the cells' names and counts, chunk by chunk (`cellembed.models.base.fingerprint`'s kind)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(np.asarray(cell_names, dtype=str)).tobytes())
    for _, block in X.chunks():
        for part in (np.diff(block.indptr), block.indices, block.data):
            digest.update(np.ascontiguousarray(part).tobytes())
    return "backed-" + digest.hexdigest()
