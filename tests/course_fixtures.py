"""Small data folders for the error-path tests: a valid course layout, ways to break it, and
GEO-format count CSVs for the downloader. Everything is written under pytest's tmp_path."""

import gzip
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

CELL_TYPES = ("alpha", "beta", "delta")


def synthetic_counts(n_cells=36, n_genes=26, seed=0):
    """Poisson counts of three cell types with their own gene blocks; no empty cell or gene.

    Returns
    -------
    counts : ndarray (n_cells, n_genes) int64
    labels, ids : ndarray of str
    batch : ndarray of int (0 mouse1, 1 mouse2)
    genes : list of str
    """
    rng = np.random.default_rng(seed)
    labels = np.array(CELL_TYPES)[np.arange(n_cells) % len(CELL_TYPES)]
    rates = rng.gamma(0.6, 1.0, size=(len(CELL_TYPES), n_genes))
    block = n_genes // len(CELL_TYPES)
    for t in range(len(CELL_TYPES)):
        rates[t, t * block:(t + 1) * block] += 4.0
    counts = rng.poisson(rates[np.arange(n_cells) % len(CELL_TYPES)]).astype(np.int64)
    counts[:, 0] += 1  # every cell has a count
    counts[0] += 1  # every gene has a count
    batch = (np.arange(n_cells) >= n_cells // 2).astype(int)
    ids = np.array([f"mouse{b + 1}_lib1.final_cell_{i:04d}" for i, b in enumerate(batch)])
    genes = [f"Gene{j:03d}" for j in range(n_genes)]
    return counts, labels, ids, batch, genes


def course_parts(n_cells=36, n_genes=24, n_extra=2, seed=0):
    """The four course objects: MP.pickle's DataFrame (with ``n_extra`` genes not in the list),
    the gene Index, the cell-id tuple (shuffled, as the course's) and sample_info."""
    counts, labels, ids, batch, genes = synthetic_counts(n_cells, n_genes + n_extra, seed)
    df = pd.DataFrame(counts, columns=genes)
    df.insert(0, "Unnamed: 0", ids)
    df["batch"] = batch
    df["assigned_cluster"] = labels
    order = np.random.default_rng(seed + 1).permutation(n_cells)
    cell_ids = tuple(str(i) for i in ids[order])
    info = pd.DataFrame({"Unnamed: 0": ids[order], "batch": batch[order], "assigned_cluster": labels[order]})
    return {"MP.pickle": df, "MP_genes.pickle": pd.Index(genes[:n_genes], dtype=object),
            "cell_IDs.pkl": cell_ids, "sample_info.csv": info}


def write_course_folder(folder, parts=None):
    """Write the course layout into ``folder`` (created); ``parts`` as from `course_parts`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = course_parts() if parts is None else parts
    for name, obj in parts.items():
        if name.endswith(".csv"):
            obj.to_csv(folder / name, index=False)
        else:
            (folder / name).write_bytes(pickle.dumps(obj))
    return folder


# ------------------------------------------------------------------------ pickles that run code


class RunsCommand:
    """Unpickling this runs ``touch marker`` through ``how``: os.system, subprocess or eval."""

    def __init__(self, marker, how="os.system"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch '{self.marker}'",)
        if self.how == "subprocess":
            return subprocess.call, (["touch", self.marker],)
        if self.how == "eval":
            return eval, (f"open({self.marker!r}, 'w').close()",)
        raise ValueError(self.how)


def unsafe_pickle(marker, how="os.system"):
    """Bytes of a pickle whose loading would create ``marker``, hidden inside a DataFrame-like dict."""
    return pickle.dumps({"Unnamed: 0": ["cell"], "payload": RunsCommand(marker, how)})


# ------------------------------------------------------------------------ broken folders
# Each case: (id, function breaking a valid folder in place, file the message names, regex).


def _parts_edit(edit):
    """A breaker that rewrites the folder from edited parts."""
    def breaker(folder):
        parts = course_parts()
        edit(parts)
        write_course_folder(folder, parts)
    return breaker


def _df_set(row, col, value):
    def edit(parts):
        df = parts["MP.pickle"]
        if isinstance(value, float):
            df[col] = df[col].astype(float)
        df.loc[row, col] = value
    return edit


def _truncate(name, keep=0.5):
    def breaker(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:int(len(data) * keep)])
    return breaker


def _write(name, data):
    def breaker(folder):
        (folder / name).write_bytes(data)
    return breaker


def _info_edit(fn):
    def edit(parts):
        parts["sample_info.csv"] = fn(parts["sample_info.csv"])
    return edit


def _replace(name, value):
    def edit(parts):
        parts[name] = value
    return edit


def _remove(name):
    def breaker(folder):
        (folder / name).unlink()
    return breaker


def _zero_everything(parts):
    df = parts["MP.pickle"]
    genes = list(parts["MP_genes.pickle"])
    df[genes] = 0


def _mp_edit(fn):
    def edit(parts):
        parts["MP.pickle"] = fn(parts["MP.pickle"])
    return edit


def _ids_edit(fn):
    def edit(parts):
        parts["cell_IDs.pkl"] = fn(parts["cell_IDs.pkl"])
    return edit


def _with_na(df, column, row=3):
    df = df.copy()
    df[column] = df[column].astype(object)
    df.loc[row, column] = None
    return df


BROKEN_FOLDERS = [
    ("missing-file", _remove("cell_IDs.pkl"), "cell_IDs.pkl", r"lacks cell_IDs\.pkl; copy the course's data folder"),
    ("truncated-pickle", _truncate("MP.pickle"), "MP.pickle", r"not a readable pickle .*truncated"),
    ("not-a-pickle", _write("MP_genes.pickle", b"Gene000,Gene001\n"), "MP_genes.pickle",
     r"not a readable pickle"),
    ("empty-pickle", _write("cell_IDs.pkl", b""), "cell_IDs.pkl", r"not a readable pickle"),
    ("empty-csv", _write("sample_info.csv", b""), "sample_info.csv", r"not a readable CSV"),
    ("binary-csv", _write("sample_info.csv", b"\xff\xfe\x00\x81garbage\x00\x9f"), "sample_info.csv",
     r"not a readable CSV"),
    ("wrong-type-MP", _parts_edit(_replace("MP.pickle", ["not", "a", "frame"])), "MP.pickle",
     r"holds a list, not the cells x genes DataFrame"),
    ("no-id-column", _parts_edit(_mp_edit(lambda df: df.drop(columns="Unnamed: 0"))), "MP.pickle",
     r"no 'Unnamed: 0' column"),
    ("no-label-column", _parts_edit(_info_edit(lambda d: d.drop(columns="assigned_cluster"))),
     "sample_info.csv", r"no column 'assigned_cluster'"),
    ("no-batch-column", _parts_edit(_info_edit(lambda d: d.drop(columns="batch"))), "sample_info.csv",
     r"no column 'batch'"),
    ("empty-label", _parts_edit(_info_edit(lambda d: _with_na(d, "assigned_cluster"))), "sample_info.csv",
     r"empty 'assigned_cluster' on line 5"),
    ("empty-batch", _parts_edit(_info_edit(lambda d: _with_na(d, "batch"))), "sample_info.csv",
     r"empty 'batch' on line 5"),
    ("ids-absent", _parts_edit(_ids_edit(lambda ids: ids[:-2] + ("cell_X", "cell_Y"))), "cell_IDs.pkl",
     r"2 cell id\(s\) are not in MP\.pickle \('cell_X', 'cell_Y'\)"),
    ("duplicate-ids", _parts_edit(_ids_edit(lambda ids: ids[:-1] + (ids[0],))), "cell_IDs.pkl",
     r"duplicate cell ids"),
    ("duplicate-ids-in-MP", _parts_edit(_mp_edit(lambda df: df.assign(**{"Unnamed: 0": df["Unnamed: 0"].where(
        df.index != 5, df["Unnamed: 0"][0])}))), "MP.pickle", r"duplicate 'Unnamed: 0' cell ids"),
    ("duplicate-genes", _parts_edit(lambda p: p.update({"MP_genes.pickle": p["MP_genes.pickle"].append(
        p["MP_genes.pickle"][:1])})), "MP_genes.pickle", r"duplicate genes \('Gene000'\)"),
    ("genes-absent", _parts_edit(lambda p: p.update({"MP_genes.pickle": p["MP_genes.pickle"].append(
        pd.Index(["Gcg", "Ins1", "Sst", "Ppy"]))})), "MP_genes.pickle",
     r"4 gene\(s\) are not columns of MP\.pickle \('Gcg', 'Ins1', 'Sst' and 1 more\)"),
    ("genes-not-strings", _parts_edit(_replace("MP_genes.pickle", pd.Index([1, 2, 3]))), "MP_genes.pickle",
     r"expected gene names as strings, found int 1"),
    ("genes-empty", _parts_edit(_replace("MP_genes.pickle", pd.Index([], dtype=object))), "MP_genes.pickle",
     r"the list of gene names is empty"),
    ("ids-wrong-type", _parts_edit(_replace("cell_IDs.pkl", {"a": 1})), "cell_IDs.pkl",
     r"expected a list of cell ids \(strings\), found a dict"),
    ("row-count-mismatch", _parts_edit(_info_edit(lambda d: d.iloc[:-1])), "sample_info.csv",
     r"35 rows but cell_IDs\.pkl has 36 cells"),
    ("row-order-mismatch", _parts_edit(_info_edit(lambda d: d.iloc[[1, 0, *range(2, len(d))]])),
     "sample_info.csv", r"row 2 is cell .* but cell_IDs\.pkl lists"),
    ("negative-count", _parts_edit(_df_set(4, "Gene002", -3)), "MP.pickle", r"1 negative count\(s\)"),
    ("nan-count", _parts_edit(_df_set(4, "Gene002", np.nan)), "MP.pickle", r"1 NaN count\(s\)"),
    ("inf-count", _parts_edit(_df_set(4, "Gene002", np.inf)), "MP.pickle", r"1 infinite count\(s\)"),
    ("fractional-count", _parts_edit(_df_set(4, "Gene002", 0.5)), "MP.pickle", r"non-integer count 0\.5"),
    ("text-count", _parts_edit(_mp_edit(lambda df: df.assign(Gene003="x"))), "MP.pickle",
     r"'Gene003' are not numeric"),
    ("all-zero", _parts_edit(_zero_everything), "MP.pickle", r"fewer than 2 cells or genes have any counts"),
]


# ------------------------------------------------------------------------ GEO count CSVs


def geo_frame(mouse, n_cells=30, n_genes=40, seed=0):
    """One mouse's GEO count table: unnamed id column, barcode, assigned_cluster, genes."""
    counts, labels, _, _, genes = synthetic_counts(n_cells, n_genes, seed + mouse)
    ids = [f"mouse{mouse}_lib1.final_cell_{i:04d}" for i in range(n_cells)]
    frame = pd.DataFrame(counts, columns=genes, index=pd.Index(ids, name=""))
    frame.insert(0, "assigned_cluster", labels)
    frame.insert(0, "barcode", [f"ACGT{i:04d}-TTGA" for i in range(n_cells)])
    return frame


GEO_NAMES = {1: "GSM2230761_mouse1_umifm_counts.csv.gz", 2: "GSM2230762_mouse2_umifm_counts.csv.gz"}


def write_geo_file(path, frame):
    """Write ``frame`` as GEO does: a CSV, gzipped when the name ends in .gz."""
    text = frame.to_csv().encode()
    Path(path).write_bytes(gzip.compress(text) if str(path).endswith(".gz") else text)
    return Path(path)


def write_geo_folder(folder, n_cells=30, n_genes=40):
    """Both mice's count files in ``folder`` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for mouse, name in GEO_NAMES.items():
        write_geo_file(folder / name, geo_frame(mouse, n_cells, n_genes))
    return folder
