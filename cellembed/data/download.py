"""Rebuild the course's data folder from GEO GSE84133 when it is missing (``--download``).

The course's data are the two mouse samples of Baron et al. 2016: GSM2230761 (mouse1) and
GSM2230762 (mouse2), each a gzipped CSV of inDrop UMI counts, one row per cell:

    ,barcode,assigned_cluster,0610007C21Rik,0610007L01Rik,...
    mouse1_lib1.final_cell_0001,AGAAAGGAAGTC-GAATCAAG,beta,0,1,...

`build_course_folder` fetches both (from GEO, another base URL, or a local folder), checks
what arrived (size, gzip, header, whole non-negative counts), and writes the four files of
the course's layout (``MP.pickle``, ``MP_genes.pickle``, ``cell_IDs.pkl``,
``sample_info.csv``), all-or-nothing.

Two things differ from the course's own folder, because the course's files are not public:

- genes: the course kept 4,194 of the 14,878 genes by an unpublished rule. This module keeps
  the 4,194 most highly variable genes by scanpy's ``highly_variable_genes(flavor="seurat",
  n_top_genes=4194, batch_key="batch")`` on log-normalized counts (``normalize_total`` to the
  median cell total, then ``log1p``), ranked within each mouse. On the same 1,886 cells this
  recovers 3,148 of the course's 4,194 genes (75%); ``flavor="seurat_v3"`` recovers fewer
  (2,373-2,425) and needs the extra scikit-misc package. The list *approximates* the course's.
- cell order: ``cell_IDs.pkl`` lists the cells in GEO order (mouse1, then mouse2); the
  course's file lists them in its own shuffled order.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
import pickle
import shutil
import signal
import socket
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from cellembed.data.checks import DataError, count_problem, few
from cellembed.data.course import BATCH_COLUMN, COURSE_FILES, ID_COLUMN, LABEL_COLUMN

# (GEO sample, file name, batch): batch 0 is mouse1, 1 is mouse2, as in the course's files.
SAMPLES = (
    ("GSM2230761", "GSM2230761_mouse1_umifm_counts.csv.gz", 0),
    ("GSM2230762", "GSM2230762_mouse2_umifm_counts.csv.gz", 1),
)
GEO_URL = "https://www.ncbi.nlm.nih.gov/geo/download/?acc={acc}&format=file&file={file}"
N_GENES = 4194  # the size of the course's gene list
TIMEOUT_S = 60  # seconds without an answer before a download is given up
MIN_BYTES = 200  # a header and a few rows; anything shorter was cut short
MAX_BYTES = 512 * 2**20  # each real file is a few MB; stop a wrong URL from filling the disk
HEADER = ("barcode", LABEL_COLUMN)  # the 2nd and 3rd columns of a GEO count CSV
GENE_RULE = (
    "the {n} most highly variable genes by scanpy's highly_variable_genes(flavor='seurat', "
    "batch_key='batch') on log-normalized counts"
)
HOW_BY_HAND = (
    "download GSM2230761_mouse1_umifm_counts.csv.gz and GSM2230762_mouse2_umifm_counts.csv.gz "
    "from https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE84133 into a folder and pass "
    "--download FOLDER"
)


class DownloadError(DataError):
    """A download failed or a downloaded file is wrong; the message names the URL or file."""


def build_course_folder(dest, source="geo", n_genes=N_GENES, timeout=TIMEOUT_S):
    """Build the course's data folder in ``dest`` from the two GSE84133 mouse count CSVs.

    Parameters
    ----------
    dest : str or Path
        The data folder to create (``--data-dir``). It may exist and hold other files (such
        as a README); if it already holds all four course files they are kept as they are
        and nothing is fetched (delete them to rebuild); if it holds only some, it is refused.
    source : str
        ``"geo"`` (the GEO download service), another ``http(s)://`` or ``file://`` base URL
        (files fetched from ``<base>/<file name>``), or a local folder holding the two files
        (gzipped or not).
    n_genes : int
        Genes kept (4,194, the size of the course's list); see the module docstring for the rule.
    timeout : float
        Seconds to wait for a server before giving up.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    DownloadError
        A network failure, an HTTP error, a timeout, or a file that is not a GEO count CSV;
        ``dest`` is left as it was.
    """
    dest = Path(dest)
    if _holds_course_folder(dest):
        print(f"--download: {dest} already holds the four course files; keeping them "
              "(delete them to rebuild from GEO)")
        return dest
    staging = _staging_dir(dest)
    try:
        samples = []
        for acc, name, batch in SAMPLES:
            path = _obtain(acc, name, source, staging, timeout)
            samples.append(read_geo_counts(path, batch))
        frame, genes = assemble(samples, n_genes)
        _write_course_files(frame, genes, staging / "course")
        _move_into_place(staging / "course", dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    n_all = sum(1 for c in samples[0].columns if c not in (ID_COLUMN, BATCH_COLUMN, LABEL_COLUMN))
    print(f"--download: built {dest} from GEO GSE84133: {len(frame)} cells x {len(genes)} genes "
          f"(of {n_all}), cells in GEO order. The gene list approximates the course's "
          f"MP_genes.pickle, which is not public: it is {GENE_RULE.format(n=len(genes))} "
          "(on the course's 1,886 cells this rule shares 3,148 of its 4,194 genes).")
    return dest


# ----------------------------------------------------------------------------- the folder


def _holds_course_folder(dest):
    """True if ``dest`` holds all four course files; DownloadError if it cannot take them."""
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"--data-dir {dest} is a file, not a folder; pass another --data-dir")
    present = [name for name in COURSE_FILES if (dest / name).exists()]
    if len(present) == len(COURSE_FILES):
        return True
    if present:
        raise DownloadError(
            f"--download: {dest} already holds {', '.join(present)} but not the other course files; "
            "move those away (or pass another --data-dir) so the new folder is not a mix of two"
        )
    return False


def _staging_dir(dest):
    """A fresh hidden folder beside ``dest`` (same file system, so the final rename is atomic)."""
    staging = dest.parent / f".{dest.name}.download.{os.getpid()}.tmp"
    try:
        if staging.exists():
            shutil.rmtree(staging)
        (staging / "course").mkdir(parents=True)
    except OSError as exc:
        raise DownloadError(f"--data-dir {dest}: cannot create {staging} ({exc.strerror}); "
                            "pass a --data-dir in a folder you can write to") from None
    return staging


def _write_course_files(frame, genes, folder):
    """The four files of the course's layout, as the assignment reads them."""
    ids = tuple(frame[ID_COLUMN])
    with open(folder / "MP.pickle", "wb") as fh:
        pickle.dump(frame, fh)
    with open(folder / "MP_genes.pickle", "wb") as fh:
        pickle.dump(pd.Index(genes, dtype=object), fh)
    with open(folder / "cell_IDs.pkl", "wb") as fh:
        pickle.dump(ids, fh)
    frame[[ID_COLUMN, BATCH_COLUMN, LABEL_COLUMN]].to_csv(folder / "sample_info.csv", index=False)


def _move_into_place(built, dest):
    """Rename the finished files into ``dest``: the whole folder at once when it is new."""
    try:
        if not dest.exists():
            os.replace(built, dest)
            return
        with _sigint_deferred():  # a Ctrl-C here waits until all four are in place
            for name in COURSE_FILES:
                os.replace(built / name, dest / name)
    except OSError as exc:
        raise DownloadError(f"--data-dir {dest}: cannot move the built files there ({exc.strerror}); "
                            "pass a --data-dir you can write to") from None


@contextlib.contextmanager
def _sigint_deferred():
    """Hold SIGINT (Ctrl-C) back until the block ends, where the platform allows it."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: the renames are not interruptible anyway
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ----------------------------------------------------------------------------- fetching


def _obtain(acc, name, source, staging, timeout):
    """The local path of sample file ``name``: fetched into ``staging`` or found in a folder."""
    if source == "geo":
        url = GEO_URL.format(acc=acc, file=urllib.parse.quote(name))
    elif source.startswith(("http://", "https://", "file://")):
        url = f"{source.rstrip('/')}/{urllib.parse.quote(name)}"
    else:
        return _local_file(Path(source), name)
    target = staging / name
    fetch(url, target, timeout)
    return target


def _local_file(folder, name):
    if not folder.is_dir():
        raise DownloadError(f"--download {folder}: not 'geo', an http(s):// URL or an existing folder; "
                            f"pass one of those (or {HOW_BY_HAND})")
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise DownloadError(f"--download {folder}: no {name} (or {name.removesuffix('.gz')}) in it; "
                        f"{HOW_BY_HAND}")


def fetch(url, target, timeout=TIMEOUT_S):
    """Download ``url`` to ``target`` with urllib; DownloadError with the fix on any failure.

    Returns
    -------
    int
        Bytes written.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "comp565-a4-download"})
    print(f"--download: fetching {url}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(target, "wb") as out:
            size = _copy(response, out, url)
            expected = response.headers.get("Content-Length")
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL, or {HOW_BY_HAND}") from None
    except urllib.error.URLError as exc:
        raise DownloadError(_network_message(url, exc.reason, timeout)) from None
    except (TimeoutError, socket.timeout) as exc:
        raise DownloadError(_network_message(url, exc, timeout)) from None
    except OSError as exc:  # a connection reset mid-file, or the disk is full
        raise DownloadError(f"{url}: the download failed ({type(exc).__name__}: {exc}); try again, "
                            f"or {HOW_BY_HAND}") from None
    if expected is not None and expected.isdigit() and int(expected) != size:
        raise DownloadError(f"{url}: got {size} of {expected} bytes, the download was cut short; "
                            f"try again, or {HOW_BY_HAND}")
    return size


def _copy(response, out, url, chunk=1 << 20):
    size = 0
    while block := response.read(chunk):
        size += len(block)
        if size > MAX_BYTES:
            raise DownloadError(f"{url}: more than {MAX_BYTES >> 20} MB, not a GEO count file; "
                                f"check the URL, or {HOW_BY_HAND}")
        out.write(block)
    return size


def _network_message(url, reason, timeout):
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"{url}: no answer within {timeout:g} s; check the network connection and retry, or {HOW_BY_HAND}"
    return (f"{url}: cannot connect ({reason}); check the network connection (or the URL) "
            f"and retry, or {HOW_BY_HAND}")


# ----------------------------------------------------------------------------- checking


def read_geo_counts(path, batch):
    """Read and check one GEO count CSV (``.csv`` or ``.csv.gz``).

    Parameters
    ----------
    path : Path
        The file.
    batch : int
        Its mouse (0 or 1), stored in the ``batch`` column.

    Returns
    -------
    pandas.DataFrame
        ``Unnamed: 0`` (cell id), ``batch``, ``assigned_cluster``, then one int64 column per gene.

    Raises
    ------
    DownloadError
        Too small, not gzip, a wrong header, missing or duplicate cells, or counts that are
        not whole non-negative numbers.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < MIN_BYTES:
        raise DownloadError(f"{path}: only {size} bytes, not a GEO count file (cut short?); "
                            f"delete it and download again, or {HOW_BY_HAND}")
    header = _read_header(path)
    _check_header(header, path)
    try:
        frame = pd.read_csv(path, compression="gzip" if _is_gzip(path) else None, low_memory=False)
    except (EOFError, OSError, zlib.error, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DownloadError(f"{path}: unreadable ({type(exc).__name__}: {exc}); the file is damaged or "
                            f"cut short: delete it and download again, or {HOW_BY_HAND}") from None
    frame = frame.rename(columns={frame.columns[0]: ID_COLUMN}).drop(columns="barcode")
    genes = header[3:]
    _check_cells(frame, path)
    counts = _check_counts(frame[genes], path)
    out = pd.concat([frame[[ID_COLUMN]], counts], axis=1)
    out.insert(1, BATCH_COLUMN, batch)
    out.insert(2, LABEL_COLUMN, frame[LABEL_COLUMN].astype(str))
    return out


def _is_gzip(path):
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _read_header(path):
    """The CSV's first line, split into fields."""
    opener = gzip.open if _is_gzip(path) else open
    if path.name.endswith(".gz") and opener is open:
        with open(path, "rb") as fh:
            start = fh.read(40)
        raise DownloadError(f"{path}: not gzip data (it starts with {start!r}; an error page?); "
                            f"delete it and download again, or {HOW_BY_HAND}")
    try:
        with opener(path, "rt", newline="", encoding="utf-8") as fh:
            return next(csv.reader(io.StringIO(fh.readline())), [])
    except (EOFError, OSError, zlib.error, UnicodeDecodeError) as exc:
        raise DownloadError(f"{path}: unreadable ({type(exc).__name__}: {exc}); delete it and download "
                            f"again, or {HOW_BY_HAND}") from None


def _check_header(header, path):
    if tuple(header[1:3]) != HEADER or len(header) < 4:
        raise DownloadError(
            f"{path}: header starts {few(header[:4], 4)}, expected a cell id column, 'barcode', "
            f"'assigned_cluster', then the genes: not a GSE84133 count CSV; {HOW_BY_HAND}"
        )
    genes = pd.Index(header[3:])
    if not genes.is_unique or (genes == "").any():
        bad = genes[genes.duplicated() | (genes == "")].unique()
        raise DownloadError(f"{path}: duplicate or empty gene names in the header ({few(bad)}); "
                            f"not a GSE84133 count CSV; {HOW_BY_HAND}")


def _check_cells(frame, path):
    ids, labels = frame[ID_COLUMN], frame[LABEL_COLUMN]
    if len(frame) == 0:
        raise DownloadError(f"{path}: a header but no cells; delete it and download again, or {HOW_BY_HAND}")
    for values, what in ((ids, "cell id"), (labels, LABEL_COLUMN)):
        if values.isna().any():
            line = int(np.flatnonzero(values.isna())[0]) + 2
            raise DownloadError(f"{path}: empty {what} on line {line}; the file is damaged: download it again")
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise DownloadError(f"{path}: duplicate cell ids ({few(dup)}); the file is damaged: download it again")


def _check_counts(counts, path):
    """The gene columns as int64, refusing anything but whole non-negative numbers."""
    values, problem = count_problem(counts)
    if problem is None:
        return pd.DataFrame(values.astype(np.int64), columns=counts.columns, index=counts.index)
    if problem[0] == "text":
        raise DownloadError(f"{path}: gene column(s) {few(problem[1])} hold text, not UMI counts; "
                            f"the file is damaged: download it again")
    kind, n, i, j = problem
    what = "missing (the file is cut short?)" if kind == "NaN" else kind
    raise DownloadError(f"{path}: {n} {what} count(s), e.g. line {i + 2}, gene "
                        f"{counts.columns[j]!r}; GEO's files hold raw UMI counts: download it again")


# ----------------------------------------------------------------------------- assembling


def assemble(samples, n_genes=N_GENES):
    """Join the two mice and keep ``n_genes`` genes, as the course's ``MP.pickle``.

    Parameters
    ----------
    samples : list of pandas.DataFrame
        `read_geo_counts` of each mouse, in batch order.
    n_genes : int

    Returns
    -------
    frame : pandas.DataFrame
        ``Unnamed: 0``, the kept genes (GEO column order), ``batch``, ``assigned_cluster``;
        cells in GEO order.
    genes : list of str
    """
    first = samples[0]
    for other in samples[1:]:
        if set(other.columns) != set(first.columns):
            diff = set(other.columns) ^ set(first.columns)
            raise DownloadError(f"the two GEO files list different genes ({few(sorted(diff))}); "
                                f"they are not GSE84133's mouse files: {HOW_BY_HAND}")
    frame = pd.concat([s[first.columns] for s in samples], ignore_index=True)
    dup = frame[ID_COLUMN][frame[ID_COLUMN].duplicated()].unique()
    if len(dup):
        raise DownloadError(f"the two GEO files share cell ids ({few(dup)}); they are the same mouse "
                            f"twice: {HOW_BY_HAND}")
    all_genes = [c for c in first.columns if c not in (ID_COLUMN, BATCH_COLUMN, LABEL_COLUMN)]
    genes = select_genes(frame[all_genes].to_numpy(), frame[BATCH_COLUMN].to_numpy(), all_genes, n_genes)
    return frame[[ID_COLUMN, *genes, BATCH_COLUMN, LABEL_COLUMN]].reset_index(drop=True), genes


def select_genes(counts, batch, genes, n_genes=N_GENES):
    """The ``n_genes`` most highly variable genes (scanpy's ``flavor="seurat"``, per batch).

    Counts are scaled to the median cell total and log1p-transformed; genes are ranked by
    the number of batches in which they are highly variable, then by normalized dispersion.

    Parameters
    ----------
    counts : ndarray, shape (N cells, M genes)
    batch : array-like, shape (N,)
    genes : sequence of str, length M
    n_genes : int

    Returns
    -------
    list of str
        The kept genes, in their original order.
    """
    import anndata
    import scanpy as sc
    import scipy.sparse as sp

    expressed = np.asarray(counts.sum(axis=0)).ravel() > 0
    if expressed.sum() < n_genes:
        raise DownloadError(f"only {int(expressed.sum())} genes have any counts, fewer than the {n_genes} "
                            f"to keep; these are not GSE84133's full mouse files: {HOW_BY_HAND}")
    adata = anndata.AnnData(
        X=sp.csr_matrix(counts[:, expressed], dtype=np.float32),
        obs=pd.DataFrame({"batch": pd.Categorical(np.asarray(batch))}, index=[str(i) for i in range(len(batch))]),
        var=pd.DataFrame(index=np.asarray(genes, dtype=object)[expressed]),
    )
    sc.pp.normalize_total(adata)  # to the median cell total
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n_genes, batch_key="batch")
    keep = set(adata.var_names[adata.var["highly_variable"].to_numpy()])
    return [g for g in genes if g in keep]
