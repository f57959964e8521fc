"""load_dataset: every named data set of shared/data, files of each kind written here, every error."""

import os
import re
import warnings

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellembed.data import (BATCH_KEY, DATASETS, LABEL_KEY, DataError, DataWarning, default_data_root, load_course_data,
                     load_dataset)


# name: (cells, genes, classes, batches, mod2 features, mod2 kind, the DataWarning expected or None)
EXPECTED = {
    "mouse_pancreas": (1886, 4194, 13, 2, None, None, None),
    # 17 of the 14,878 genes have no count in these 1,886 cells
    "baron_mouse": (1886, 14861, 13, 2, None, None, r"dropping 0 cell\(s\) and 17 gene\(s\)"),
    # 62 cells without a Seurat label; then 1 gene is left without counts
    "pbmc3k": (2638, 13713, 9, None, None, None, r"dropping 62 of 2700 cell\(s\) without a label"),
    "10x_pbmc": (4271, 2000, 8, None, None, None, None),
    "mouse_bladder": (2746, 2003, 16, None, None, None, None),
    "neurips_cite": (600, 1000, 41, 2, 134, "ADT", None),
    # 1 of the 600 genes has no count (5 of the 600 peaks have none either; mod2 is kept whole)
    "neurips_multiome": (500, 599, 21, 2, 600, "ATAC", r"dropping 0 cell\(s\) and 1 gene\(s\)"),
}


def _is_integer(matrix):
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    return bool(np.all(values == np.round(values)) and np.all(values >= 0))


def test_every_name_is_tested():
    assert set(EXPECTED) == set(DATASETS)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_named_data_set(name, data_root):
    n_cells, n_genes, n_classes, n_batches, n_mod2, kind, warning = EXPECTED[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        adata = load_dataset(name, data_root=data_root)
    data_warnings = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    if warning is None:
        assert data_warnings == []
    else:
        assert any(re.search(warning, m) for m in data_warnings), data_warnings

    assert adata.shape == (n_cells, n_genes)
    assert sp.isspmatrix_csr(adata.X) and _is_integer(adata.X)
    assert adata.X.dtype == (np.int64 if name == "mouse_pancreas" else np.float32)
    assert isinstance(adata.obs[LABEL_KEY].dtype, pd.CategoricalDtype)
    assert all(isinstance(c, str) for c in adata.obs[LABEL_KEY].cat.categories)
    assert adata.obs[LABEL_KEY].nunique() == len(adata.obs[LABEL_KEY].cat.categories) == n_classes
    if n_batches is None:
        assert BATCH_KEY not in adata.obs
    else:
        assert isinstance(adata.obs[BATCH_KEY].dtype, pd.CategoricalDtype)
        assert adata.obs[BATCH_KEY].nunique() == n_batches
    if n_mod2 is None:
        assert "mod2" not in adata.obsm and "mod2" not in adata.uns
    else:
        mod2 = adata.obsm["mod2"]
        assert isinstance(mod2, np.ndarray) and mod2.dtype == np.float32 and mod2.shape == (n_cells, n_mod2)
        assert _is_integer(mod2) and mod2.sum() > 0
        assert adata.uns["mod2"]["modality"] == kind and len(adata.uns["mod2"]["features"]) == n_mod2
    assert adata.uns["dataset"]["name"] == name
    assert os.path.exists(adata.uns["dataset"]["path"])


def test_scdeepcluster_names_gene_columns(data_root):
    adata = load_dataset("10x_pbmc", data_root=data_root)
    assert list(adata.var_names[:2]) == ["gene0", "gene1"] and adata.var_names[-1] == "gene1999"
    assert sorted(adata.obs[LABEL_KEY].cat.categories, key=int) == [str(i) for i in range(1, 9)]


def test_mouse_pancreas_by_name_is_the_course_loader(data_root):
    by_name = load_dataset("mouse_pancreas", data_root=data_root)
    course = load_course_data(os.path.join(data_root, "mouse_pancreas"))
    assert by_name.X.dtype == course.X.dtype == np.int64
    assert (by_name.X != course.X).nnz == 0
    pd.testing.assert_frame_equal(by_name.obs, course.obs)
    assert list(by_name.var_names) == list(course.var_names)
    # the course folder also works as a path
    by_path = load_dataset(os.path.join(data_root, "mouse_pancreas"))
    assert (by_path.X != course.X).nnz == 0 and by_path.uns["dataset"]["name"] == "mouse_pancreas"


@pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning")  # read here directly, as anndata < 0.8 wrote them
def test_neurips_cite_keeps_metric_columns_and_raw_counts(data_root):
    adata = load_dataset("neurips_cite", data_root=data_root)
    for column in ("phase", "pseudotime_order_GEX", "pseudotime_order_ADT", "is_train"):
        assert column in adata.obs
    assert "cell_type" not in adata.obs  # moved to Celltype
    folder = os.path.join(data_root, "neurips2021_bmmc_cite_subset")
    rna = anndata.read_h5ad(os.path.join(folder, "openproblems_bmmc_cite_starter.output_rna.h5ad"))
    adt = anndata.read_h5ad(os.path.join(folder, "openproblems_bmmc_cite_starter.output_mod2.h5ad"))
    np.testing.assert_array_equal(adata.X.toarray(), rna.layers["counts"].toarray())
    np.testing.assert_array_equal(adata.obsm["mod2"], adt.layers["counts"].toarray())
    assert adata.uns["mod2"]["features"] == list(adt.var_names)
    assert list(adata.obs[LABEL_KEY].astype(str)) == list(rna.obs["cell_type"].astype(str))


def test_default_data_root(monkeypatch):
    monkeypatch.delenv("A4_DATA_ROOT", raising=False)
    assert str(default_data_root()) == "data"
    monkeypatch.setenv("A4_DATA_ROOT", "/somewhere/else")
    assert str(default_data_root()) == "/somewhere/else"


# ---------------------------------------------------------------------------------------------
# files written here

def _counts(n_cells=12, n_genes=8, seed=0):
    counts = np.random.default_rng(seed).poisson(3.0, size=(n_cells, n_genes)).astype(np.int64)
    counts[:, 0] += 1  # no empty cell
    return counts


def _write_h5ad(path, counts, obs, layers_counts=False):
    """``counts`` in X, or normalized X with the counts in layers['counts']."""
    n_cells, n_genes = counts.shape
    X = counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4 if layers_counts else counts
    adata = anndata.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(n_cells)]),
                            var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    if layers_counts:
        adata.layers["counts"] = sp.csr_matrix(counts)
    adata.write_h5ad(path)
    return path


def _types(n):
    return np.array(["a", "b", "c"])[np.arange(n) % 3]


def test_h5ad_custom_keys_and_counts_layer(tmp_path):
    counts = _counts()
    counts[3] = 0  # one empty cell, dropped
    ct = pd.Series(_types(12), dtype=object)
    ct[5] = np.nan  # one unlabelled cell, dropped
    obs = {"ct": ct.to_numpy(), "donor": np.array(["d1", "d2"])[np.arange(12) % 2], "qc": np.arange(12.0)}
    path = _write_h5ad(tmp_path / "custom.h5ad", counts, obs, layers_counts=True)
    with pytest.warns(DataWarning) as caught:
        adata = load_dataset(path, label_key="ct", batch_key="donor", layer="counts")
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        "dropping 1 of 12 cell(s) without a label in --label-key 'ct'",
        "dropping 1 cell(s) and 0 gene(s) with zero total counts (of 11 cells and 8 genes)"]
    keep = [i for i in range(12) if i not in (3, 5)]
    np.testing.assert_array_equal(adata.X.toarray(), counts[keep])
    assert adata.X.dtype == np.float32 and sp.isspmatrix_csr(adata.X)
    assert list(adata.obs_names) == [f"c{i}" for i in keep]
    assert list(adata.obs[LABEL_KEY]) == list(_types(12)[keep])
    assert list(adata.obs[BATCH_KEY]) == [["d1", "d2"][i % 2] for i in keep]
    assert list(adata.obs.columns) == ["qc", LABEL_KEY, BATCH_KEY]  # ct, donor moved
    assert list(adata.var_names) == [f"g{j}" for j in range(8)]
    assert adata.uns["dataset"] == {"name": "custom", "path": str(path)}


def test_h5ad_default_keys(tmp_path):
    obs = {"cell_type": _types(12), "batch": np.arange(12) % 2, "other": np.arange(12)}
    adata = load_dataset(_write_h5ad(tmp_path / "plain.h5ad", _counts(), obs))
    assert list(adata.obs[LABEL_KEY].cat.categories) == ["a", "b", "c"]
    assert list(adata.obs[BATCH_KEY].cat.categories) == ["0", "1"]
    # a name wins only where it is one; a path string works too
    assert load_dataset(str(tmp_path / "plain.h5ad")).shape == (12, 8)


def _write_h5(path, X, Y, adt=None):
    with h5py.File(path, "w") as f:
        f["X"], f["Y"] = X, Y
        if adt is not None:
            f["ADT_X"] = adt
    return path


def test_scdeepcluster_h5_both_orientations_and_adt(tmp_path):
    counts, adt = _counts(12, 8).astype(np.float32), _counts(12, 5, seed=1).astype(np.float32)
    Y = (np.arange(12) % 3 + 1).astype(np.float64)  # codes stored as floats, as some files do
    plain = load_dataset(_write_h5(tmp_path / "plain.h5", counts, Y))
    np.testing.assert_array_equal(plain.X.toarray(), counts)
    assert list(plain.var_names) == [f"gene{j}" for j in range(8)]
    assert list(plain.obs[LABEL_KEY]) == [str(int(y)) for y in Y]
    assert "mod2" not in plain.obsm and BATCH_KEY not in plain.obs
    # genes x cells (and proteins x cells): Y's length says which side the cells are on
    cite = load_dataset(_write_h5(tmp_path / "cite.h5", counts.T, Y, adt.T))
    np.testing.assert_array_equal(cite.X.toarray(), counts)
    np.testing.assert_array_equal(cite.obsm["mod2"], adt)
    assert cite.obsm["mod2"].dtype == np.float32
    assert cite.uns["mod2"]["modality"] == "ADT"
    assert cite.uns["mod2"]["features"] == [f"adt{j}" for j in range(5)]


def test_scdeepcluster_square_x_warns(tmp_path):
    with pytest.warns(DataWarning, match=r"X is square \(6 x 6\).*reading its rows as cells"):
        adata = load_dataset(_write_h5(tmp_path / "square.h5", _counts(6, 6), np.arange(6) % 2))
    assert adata.shape == (6, 6)


def _write_h5mu(path, rna_obs, other="prot", other_obs_names=None, extra=None, shared_obs=None):
    import mudata

    cells = [f"c{i}" for i in range(12)]
    rna = anndata.AnnData(X=sp.csr_matrix(_counts(12, 8)), obs=pd.DataFrame(rna_obs, index=cells),
                          var=pd.DataFrame(index=[f"g{j}" for j in range(8)]))
    names = other_obs_names or list(rna.obs_names)
    adt = anndata.AnnData(X=_counts(len(names), 4, seed=2).astype(np.float32), obs=pd.DataFrame(index=names),
                          var=pd.DataFrame(index=[f"p{j}" for j in range(4)]))
    mods = {"rna": rna, other: adt, **(extra or {})}
    with mudata.set_options(pull_on_update=False):
        mdata = mudata.MuData(mods)
        for column, values in (shared_obs or {}).items():
            mdata.obs[column] = values
        mdata.write(path)
    return path, rna, adt


def test_h5mu_rna_and_protein(tmp_path):
    path, rna, adt = _write_h5mu(tmp_path / "cite.h5mu", {"celltype": _types(12)},
                                 shared_obs={"donor": np.array(["x", "y"])[np.arange(12) % 2]})
    adata = load_dataset(path, batch_key="donor")
    np.testing.assert_array_equal(adata.X.toarray(), rna.X.toarray())
    np.testing.assert_array_equal(adata.obsm["mod2"], adt.X)
    assert adata.uns["mod2"]["modality"] == "ADT" and adata.uns["mod2"]["features"] == ["p0", "p1", "p2", "p3"]
    assert list(adata.obs[LABEL_KEY]) == list(_types(12))
    assert list(adata.obs[BATCH_KEY].cat.categories) == ["x", "y"]
    assert adata.uns["dataset"]["name"] == "cite"


def test_h5mu_same_cells_in_another_order_are_matched(tmp_path):
    order = [f"c{i}" for i in reversed(range(12))]
    path, rna, adt = _write_h5mu(tmp_path / "shuffled.h5mu", {"celltype": _types(12)}, other="atac",
                                 other_obs_names=order)
    adata = load_dataset(path)
    np.testing.assert_array_equal(adata.obsm["mod2"], adt.X[::-1])
    assert adata.uns["mod2"]["modality"] == "ATAC"


# ---------------------------------------------------------------------------------------------
# errors: one DataError each, naming the file, key or flag and the fix

def test_unknown_name():
    with pytest.raises(DataError, match=r"unknown data set 'nope'; the names are mouse_pancreas, .*a path"):
        load_dataset("nope")


def test_name_without_its_folder(tmp_path):
    with pytest.raises(DataError, match=rf"'pbmc3k': no folder {tmp_path}/pbmc3k; pass --data-root DIR or set "
                                        r"A4_DATA_ROOT"):
        load_dataset("pbmc3k", data_root=tmp_path)


def test_course_files_in_the_root_itself(tmp_path, data_root):
    for f in ("MP.pickle", "MP_genes.pickle", "cell_IDs.pkl", "sample_info.csv"):
        (tmp_path / f).symlink_to(os.path.join(data_root, "mouse_pancreas", f))
    with pytest.raises(DataError, match=rf"no folder {tmp_path}/mouse_pancreas; .*pass the course's folder itself "
                                        rf"as a path: --data {tmp_path}"):
        load_dataset("mouse_pancreas", data_root=tmp_path)
    assert load_dataset(tmp_path).shape == (1886, 4194)


def test_name_without_its_file(tmp_path):
    (tmp_path / "pbmc3k").mkdir()
    with pytest.raises(DataError, match=r"pbmc3k_counts_seurat_labels\.h5ad: no such file"):
        load_dataset("pbmc3k", data_root=tmp_path)


@pytest.mark.parametrize("name", ["missing.h5ad", "missing.h5", "sub/missing"])
def test_missing_file(tmp_path, name):
    with pytest.raises(DataError, match=r"missing(\.h5ad|\.h5)?: no such file"):
        load_dataset(tmp_path / name)


@pytest.mark.parametrize("suffix", [".h5ad", ".h5", ".h5mu"])
def test_unreadable_file(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"not an HDF5 file at all")
    with pytest.raises(DataError, match=rf"broken\{suffix}: not a readable \{suffix} \(.*\); re-copy"):
        load_dataset(path)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "counts.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"counts\.csv: unknown file suffix '\.csv'; pass an \.h5ad"):
        load_dataset(path)


def test_missing_label_and_batch_keys(tmp_path):
    path = _write_h5ad(tmp_path / "x.h5ad", _counts(), {"cell_type": _types(12)})
    with pytest.raises(DataError, match=r"x\.h5ad: no obs column 'nope' for --label-key \(obs has 'cell_type'\)"):
        load_dataset(path, label_key="nope")
    with pytest.raises(DataError, match=r"no obs column 'donor' for --batch-key .*leave --batch-key out"):
        load_dataset(path, batch_key="donor")
    bare = _write_h5ad(tmp_path / "bare.h5ad", _counts(), {"kind": _types(12)})
    with pytest.warns(DataWarning, match=r"bare\.h5ad: no label column \(looked for cell_type, .*obs has 'kind'\): "
                                         r"embeddings and clusters without scores; pass --label-key COLUMN"):
        unlabelled = load_dataset(bare)
    assert LABEL_KEY not in unlabelled.obs and unlabelled.n_obs == 12  # no labels: every cell kept


def test_missing_layer(tmp_path):
    path = _write_h5ad(tmp_path / "x.h5ad", _counts(), {"cell_type": _types(12)}, layers_counts=True)
    with pytest.raises(DataError, match=r"no layer 'spliced' for --layer \(layers: 'counts'\)"):
        load_dataset(path, layer="spliced")
    with pytest.raises(DataError, match=r"--layer raw asks for adata.raw, but it has none \(layers: 'counts'\)"):
        load_dataset(path, layer="raw")


def test_normalized_x_says_pass_layer_counts(tmp_path):
    path = _write_h5ad(tmp_path / "x.h5ad", _counts(), {"cell_type": _types(12)}, layers_counts=True)
    with pytest.raises(DataError, match=r"x\.h5ad: X holds normalized values \(\d+ entries, e\.g\. .* at cell 'c0', "
                                        r"feature 'g\d'\), not raw counts; pass --layer counts"):
        load_dataset(path)


@pytest.mark.parametrize("bad, kind", [(-1.0, "negative"), (np.nan, "NaN"), (0.5, "normalized")])
def test_non_count_values(tmp_path, bad, kind):
    counts = _counts().astype(np.float64)
    counts[2, 3] = bad
    path = _write_h5ad(tmp_path / "x.h5ad", counts, {"cell_type": _types(12)})
    with pytest.raises(DataError, match=rf"X holds {kind} values \(1 entries, e\.g\. .* at cell 'c2', feature 'g3'\)"
                                        r", not raw counts; the models need raw counts"):
        load_dataset(path)
    h5 = _write_h5(tmp_path / "x.h5", counts, np.arange(12) % 2)
    with pytest.raises(DataError, match=rf"x\.h5: X holds {kind} values .*cell 'cell2', feature 'gene3'"):
        load_dataset(h5)


def test_one_class(tmp_path):
    path = _write_h5ad(tmp_path / "x.h5ad", _counts(), {"cell_type": ["t"] * 12})
    with pytest.raises(DataError, match=r"--label-key 'cell_type' has one class \('t'\); the metrics need at least 2"):
        load_dataset(path)
    with pytest.raises(DataError, match=r"x\.h5: Y has one class \('1'\); the metrics need at least 2"):
        load_dataset(_write_h5(tmp_path / "x.h5", _counts(), np.ones(12)))


def test_every_label_missing_and_empty_batch(tmp_path):
    path = _write_h5ad(tmp_path / "x.h5ad", _counts(), {"cell_type": pd.Categorical([np.nan] * 12, categories=["a"])})
    with pytest.raises(DataError, match=r"--label-key 'cell_type' is empty for every cell"):
        load_dataset(path)
    batch = np.array(["x", "y"] * 6, dtype=object)
    batch[4] = np.nan
    path = _write_h5ad(tmp_path / "y.h5ad", _counts(), {"cell_type": _types(12), "batch": batch})
    with pytest.raises(DataError, match=r"--batch-key 'batch' is empty for 1 cell\(s\)"):
        load_dataset(path)


def test_fewer_than_two_cells_with_counts(tmp_path):
    counts = _counts()
    counts[1:] = 0
    path = _write_h5ad(tmp_path / "x.h5ad", counts, {"cell_type": _types(12)})
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"fewer than 2 cells or genes have any counts "
                                                                  r"\(1 cells x \d genes\); the data need raw counts"):
        load_dataset(path)
    one_gene = _write_h5ad(tmp_path / "one.h5ad", _counts(12, 1), {"cell_type": _types(12)})  # nothing to drop
    with pytest.raises(DataError, match=r"fewer than 2 cells or genes have any counts \(12 cells x 1 genes\)"):
        load_dataset(one_gene)


def test_h5_layout_errors(tmp_path):
    path = tmp_path / "noy.h5"
    with h5py.File(path, "w") as f:
        f["X"] = _counts()
    with pytest.raises(DataError, match=r"noy\.h5: not the scDeepCluster layout: no dataset Y \(it has 'X'\)"):
        load_dataset(path)
    with pytest.raises(DataError, match=r"X is 12 x 8 but Y has 10 labels; neither side of X matches"):
        load_dataset(_write_h5(tmp_path / "short.h5", _counts(), np.arange(10) % 2))
    with pytest.raises(DataError, match=r"the rna and adt modalities hold different cells \(X has 12 cells, "
                                        r"ADT_X is 11 x 4\); ADT_X needs one row per cell of X"):
        load_dataset(_write_h5(tmp_path / "adt.h5", _counts(), np.arange(12) % 2, _counts(11, 4)))
    with pytest.raises(DataError, match=r"adt\.h5: --label-key, --layer cannot be used with an scDeepCluster \.h5"):
        load_dataset(tmp_path / "adt.h5", label_key="Y", layer="counts")


def test_course_folder_takes_no_flags(data_root):
    with pytest.raises(DataError, match=r"mouse_pancreas: --batch-key cannot be used with the course's data folder"):
        load_dataset("mouse_pancreas", data_root=data_root, batch_key="batch")


def test_h5mu_errors(tmp_path):
    path, _, _ = _write_h5mu(tmp_path / "bad.h5mu", {"celltype": _types(12)}, other="adt",
                             other_obs_names=[f"c{i}" for i in range(11)] + ["zz"])
    with pytest.raises(DataError, match=r"bad\.h5mu: the rna and adt modalities hold different cells \(12 vs 12; "
                                        r"first differing at row 11: 'c11' in rna, 'zz' in adt\)"):
        load_dataset(path)
    path, _, _ = _write_h5mu(tmp_path / "odd.h5mu", {"celltype": _types(12)}, other="spliced")
    with pytest.raises(DataError, match=r"cannot tell what modality 'spliced' holds"):
        load_dataset(path)
    atac = anndata.AnnData(X=_counts(12, 3, seed=3).astype(np.float32),
                           obs=pd.DataFrame(index=[f"c{i}" for i in range(12)]),
                           var=pd.DataFrame(index=["k0", "k1", "k2"]))
    path, _, _ = _write_h5mu(tmp_path / "three.h5mu", {"celltype": _types(12)}, extra={"atac": atac})
    with pytest.raises(DataError, match=r"three\.h5mu: holds 3 modalities \(rna, prot, atac\)"):
        load_dataset(path)
