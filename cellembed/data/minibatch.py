"""Minibatches from sparse counts: memory that grows with the batch, not with the data.

`SparseRows` keeps a CSR matrix (N x M) and builds the dense rows of one batch when asked,
through a per-batch transform (log-normalized z-scores, ``log1p`` of the counts). It stands
where `cellembed.training.train` and `cellembed.training.predict` take a tensor: both read
``shape[0]`` and index rows (``t[rows]`` with a LongTensor of row indices, ``x[i:j]``), so

    data = (SparseRows(lognorm, lambda b: standardize(b, mean, sd)),)  # or (SparseRows(X, log1p_rows), ...)
    history = train(module, loss_fn, data, optimizer, epochs=..., batch_size=256)

trains on the same batches, bit for bit, as the dense (N, M) tensor of every row would, and
holds the CSR matrix plus one batch.

`ScaledSparseRows` hands out the z-scores of a batch without making them dense: every gene's
z-score of a zero count is the same number, so a batch is that offset (M,) plus a sparse matrix
with the pattern of the counts (`ScaledSparse`), which the autoencoders' first layer and loss
use as it is (`cellembed.sparse_nn`): a step costs the stored entries, not B x M.

`scaled_epochs` is the epoch budget that follows the data size (scvi-tools' rule), and
`embed_batch_size` the rows of an embedding batch, bounded in values rather than in rows.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

from cellembed.data.backed import BackedCounts
from cellembed.preprocessing import CHUNK

# torch warns once per process that its sparse CSR tensors are a beta feature; the products used
# here (CSR @ dense on the CPU and the GPU) are tested against dense autograd (tests/test_sparse_nn.py)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

# scvi-tools (scvi.model._utils.get_max_epochs_heuristic, its ``decay_at_n_obs``): the number of
# cells above which the epochs shrink as 1 / N.
EPOCHS_DECAY_CELLS = 20_000

# The most values (rows x genes) of one embedding batch: 16 MiB of float32 (4096 rows of 1,024 genes).
EMBED_BATCH_VALUES = 2**22
EMBED_BATCH_ROWS = 4096  # `cellembed.training.predict`'s default


def scaled_epochs(epochs, n_cells, decay_cells=None):
    """scvi-tools' epoch budget: ``epochs`` up to 20,000 cells, ``round(epochs * 20000 / N)`` above.

    scvi-tools' ``get_max_epochs_heuristic(n_obs, epochs_cap=400, decay_at_n_obs=20000)``
    with the source's ``epochs`` as the cap, at least 1: the number of steps (N / batch size
    per epoch) stays at most that of 20,000 cells.

    Parameters
    ----------
    epochs : int
        The source's epochs (for data of up to ``decay_cells`` cells).
    n_cells : int
        N, the training cells.
    decay_cells : int, optional
        The cells above which the epochs shrink (scvi-tools' ``decay_at_n_obs``; default
        `EPOCHS_DECAY_CELLS`); a model whose step is far dearer than an autoencoder's bounds its
        steps lower (`cellembed.models.scgpcl`).

    Returns
    -------
    int
    """
    decay_cells = EPOCHS_DECAY_CELLS if decay_cells is None else decay_cells
    if n_cells <= decay_cells:
        return epochs
    return max(1, round(epochs * decay_cells / n_cells))


def check_solver(config, solvers, what=""):
    """ValueError unless ``config.solver`` is one of ``solvers`` and ``config.batch_size`` is positive.

    The check of the full-batch / minibatch switch of the models whose source trains full-batch
    (the NMFs, the ETMs), run by their config's ``__post_init__``; ``what`` prefixes the message.
    """
    if config.solver not in solvers:
        raise ValueError(f"{what}solver={config.solver!r}; use one of {', '.join(map(repr, solvers))}")
    if config.batch_size < 1:
        raise ValueError(f"{what}batch_size={config.batch_size}; use a positive number of cells, e.g. "
                         f"{type(config).batch_size}")


def embed_batch_size(n_genes):
    """Rows per batch of `cellembed.training.predict` on `SparseRows` of ``n_genes`` columns.

    4096 (predict's default) up to 1,024 genes, fewer above, so that a batch's dense rows hold
    at most ``EMBED_BATCH_VALUES`` values (2,097 rows of 2,000 genes, 139 of 30,000). A row's
    result does not depend on the batch it is in (tests/test_memory.py checks the latents).
    """
    return max(1, min(EMBED_BATCH_ROWS, EMBED_BATCH_VALUES // n_genes))


def log1p_rows(rows):
    """``log1p`` of a batch's counts (an encoder's input) with torch's kernel, as on the full tensor.

    Parameters
    ----------
    rows : ndarray, shape (B, M), float32

    Returns
    -------
    Tensor, shape (B, M), float32
    """
    return torch.log1p(torch.from_numpy(rows))


class SparseRows:
    """A CSR matrix handed out as dense row batches: ``rows[index]`` is a Tensor (B, M).

    Parameters
    ----------
    X : scipy.sparse.csr_matrix, shape (N, M), float32, or `cellembed.data.backed.BackedCounts`
        Kept as it is (not copied); a `BackedCounts` reads each batch's rows from disk.
    transform : callable, optional
        ``ndarray (B, M) float32 -> ndarray or Tensor (B, M)``, applied to each batch's dense
        rows (it may overwrite them); none: the rows themselves.
    sparse_transform : callable, optional
        ``CSR (B, M) -> CSR (B, M)`` float32, applied to each batch's rows before they are made
        dense (e.g. `cellembed.preprocessing.log_normalize_sparse` of counts read from disk, which
        gives each row the values it has in the log-normalized matrix of every cell).

    Attributes
    ----------
    shape : tuple of int
        (N, M), as a tensor's.
    device : torch.device
        Where the batches are made: the CPU (`cellembed.training.predict`'s default device).
    """

    device = torch.device("cpu")

    def __init__(self, X, transform=None, sparse_transform=None):
        if not (sp.isspmatrix_csr(X) or isinstance(X, BackedCounts)) or X.dtype != np.float32:
            raise TypeError(f"SparseRows needs a float32 CSR matrix, got {type(X).__name__} of {X.dtype}; "
                            "convert it with scipy.sparse.csr_matrix(X, dtype=numpy.float32)")
        self.X, self.transform, self.sparse_transform, self.shape = X, transform, sparse_transform, X.shape

    def __len__(self):
        return self.shape[0]

    def _rows(self, index):
        """The CSR rows ``index`` (a slice, or integer indices: LongTensor or ndarray (B,)), transformed."""
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        rows = self.X[index]  # (B, M) CSR float32
        return rows if self.sparse_transform is None else self.sparse_transform(rows)

    def __getitem__(self, index):
        """The dense rows ``index`` (a slice, or integer indices: LongTensor or ndarray (B,)), Tensor (B, M)."""
        rows = self._rows(index).toarray()  # (B, M) float32, C-contiguous
        out = rows if self.transform is None else self.transform(rows)
        return torch.from_numpy(out) if isinstance(out, np.ndarray) else out


class ScaledSparse:
    """A batch of z-scored rows kept sparse: ``dense() = values + offset`` (B, M).

    Parameters
    ----------
    values : Tensor, sparse CSR, shape (B, M), float32
        Each stored entry's z-score minus its gene's ``offset``; the pattern of the counts.
    offset : Tensor, shape (M,), float32
        Every gene's z-score of a zero count.
    transposed : Tensor, sparse CSR, shape (M, B), float32, or callable
        The same matrix transposed (the gradients of a weight need ``values.T @ grad``, which
        a CSR matrix of the transpose computes fastest), or a function of no argument that makes
        it: then it is made on first use (`transposed`), which a pass without gradients (an
        embedding of every cell) never reaches.
    """

    def __init__(self, values, offset, transposed):
        self.values, self.offset = values, offset
        self._transposed = transposed

    @property
    def transposed(self):
        """``values`` transposed, Tensor sparse CSR (M, B), made on first use."""
        if callable(self._transposed):
            self._transposed = self._transposed()
        return self._transposed

    @property
    def shape(self):
        """(B, M), as the dense rows'."""
        return tuple(self.values.shape)

    @property
    def device(self):
        """Where the batch's tensors are."""
        return self.offset.device

    def to(self, device):
        """This batch on ``device`` (the same object where it already is; a transpose not made yet
        is made where this batch is, then moved)."""
        if torch.device(device) == self.device:
            return self
        transposed = (lambda: self.transposed.to(device)) if callable(self._transposed) else self._transposed.to(device)
        return ScaledSparse(self.values.to(device), self.offset.to(device), transposed)

    def dense(self):
        """The z-scored rows, Tensor (B, M) float32."""
        return self.values.to_dense() + self.offset


class ScaledSparseRows(SparseRows):
    """Log-normalized CSR rows handed out z-scored but sparse: ``rows[index]`` is a `ScaledSparse`.

    ``rows[index].dense()`` is ``standardize(X[index].toarray(), mean, sd, max_value)`` (to float32
    rounding: the stored entries are z-scored in float64, the offset taken off, then rounded):
    a zero's z-score ``clip(-mean / sd)`` is the gene's offset, and a stored entry keeps its
    z-score minus the offset, so the sparse matrix has the counts' pattern.

    Parameters
    ----------
    X : scipy.sparse.csr_matrix, shape (N, M), float32, or `cellembed.data.backed.BackedCounts`
        Log-normalized rows (canonical CSR), or counts on disk with ``sparse_transform``.
    mean, sd : ndarray, shape (M,), float64
        `cellembed.preprocessing.gene_scaling`'s.
    max_value : float, optional
        Clip the z-scores to +- this (`cellembed.preprocessing.standardize`'s).
    sparse_transform : callable, optional
        ``CSR (B, M) -> CSR (B, M)`` applied to each batch's rows first (`SparseRows`').
    """

    def __init__(self, X, mean, sd, max_value=None, sparse_transform=None):
        self.mean, self.sd, self.max_value = mean, sd, max_value
        self.offset64 = self._clip(-mean / sd)  # (M,) float64, a zero count's z-score
        self.offset = torch.from_numpy(self.offset64.astype(np.float32))
        if isinstance(X, BackedCounts) or sparse_transform is not None:  # per batch, as it is read
            super().__init__(X, sparse_transform=lambda rows: self._shifted(
                rows if sparse_transform is None else sparse_transform(rows)))
        else:  # in memory: every stored entry once
            super().__init__(self._shifted(X))

    def _clip(self, values):
        return values if self.max_value is None else np.clip(values, -self.max_value, self.max_value)

    def _shifted(self, rows):
        """CSR ``rows`` (log-normalized) -> the same pattern holding z-score minus offset, float32."""
        values = np.empty(rows.nnz, dtype=np.float32)
        for lo in range(0, rows.nnz, CHUNK):  # float64 temporaries of CHUNK entries
            genes, x = rows.indices[lo:lo + CHUNK], rows.data[lo:lo + CHUNK]
            values[lo:lo + CHUNK] = self._clip((x - self.mean[genes]) / self.sd[genes]) - self.offset64[genes]
        return sp.csr_matrix((values, rows.indices, rows.indptr), shape=rows.shape, copy=False)

    def __getitem__(self, index):
        """The rows ``index`` (a slice, or integer indices: LongTensor or ndarray (B,)), `ScaledSparse`."""
        rows = self._rows(index)

        def transposed():  # scipy's CSC arrays are the CSR arrays of the transpose (10x torch's conversion)
            cols = rows.tocsc()
            return csr_tensor(cols.indptr, cols.indices, cols.data, rows.shape[::-1])

        return ScaledSparse(csr_tensor(rows.indptr, rows.indices, rows.data, rows.shape), self.offset, transposed)


def csr_tensor(indptr, indices, data, shape):
    """A torch sparse CSR tensor of scipy's arrays (int32 indices; the data, and int32 indices, shared)."""
    return torch.sparse_csr_tensor(torch.from_numpy(indptr.astype(np.int32, copy=False)),
                                   torch.from_numpy(indices.astype(np.int32, copy=False)), torch.from_numpy(data),
                                   size=tuple(shape), check_invariants=False)
