"""The course folder loader: pickles that cannot run code, one clear DataError per bad folder."""

import pickle
import re

import numpy as np
import pandas as pd
import pytest

from cellembed.data import DataError, DataWarning, load_course_data, safe_load_pickle
from course_fixtures import BROKEN_FOLDERS, course_parts, unsafe_pickle, write_course_folder


@pytest.fixture
def course_dir(tmp_path):
    return write_course_folder(tmp_path / "data")


def test_valid_folder_loads_as_the_assignment_reads_it(course_dir):
    parts = course_parts()
    adata = load_course_data(course_dir)
    cells, genes = list(parts["cell_IDs.pkl"]), list(parts["MP_genes.pickle"])
    expected = parts["MP.pickle"].set_index("Unnamed: 0").loc[cells, genes].to_numpy()
    assert adata.shape == (36, 24)
    assert list(adata.obs_names) == cells and list(adata.var_names) == genes
    np.testing.assert_array_equal(adata.X.toarray(), expected)
    assert list(adata.obs["Celltype"]) == list(parts["sample_info.csv"]["assigned_cluster"])
    assert list(adata.obs["batch"]) == list(parts["sample_info.csv"]["batch"])


def test_allow_list_rebuilds_the_course_types(tmp_path):
    parts = course_parts()
    for name in ("MP.pickle", "MP_genes.pickle", "cell_IDs.pkl"):
        for protocol in (2, 4, 5):
            path = tmp_path / f"{protocol}{name}"
            path.write_bytes(pickle.dumps(parts[name], protocol=protocol))
            got = safe_load_pickle(path)
            if name == "MP.pickle":
                pd.testing.assert_frame_equal(got, parts[name])
            elif name == "MP_genes.pickle":
                pd.testing.assert_index_equal(got, parts[name])
            else:
                assert type(got) is tuple and got == parts[name]


@pytest.mark.parametrize("how, asks_for", [("os.system", "posix.system"), ("subprocess", "subprocess.call"),
                                           ("eval", "builtins.eval")])
def test_pickle_that_would_run_a_command_is_refused(course_dir, tmp_path, how, asks_for):
    armed = tmp_path / "control"
    pickle.loads(unsafe_pickle(armed, how))  # the plain unpickler runs it: the payload is real
    assert armed.exists()

    marker = tmp_path / "pwned"
    (course_dir / "MP.pickle").write_bytes(unsafe_pickle(marker, how))
    path = re.escape(str(course_dir / "MP.pickle"))
    with pytest.raises(DataError, match=rf"^{path}: refusing to unpickle it: it asks for {re.escape(asks_for)}"):
        load_course_data(course_dir)
    assert not marker.exists(), "the pickle's command ran"


def test_unreadable_pickle_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.pkl: cannot read it \(No such file or directory\)"):
        safe_load_pickle(tmp_path / "nothing.pkl")


@pytest.mark.filterwarnings("ignore:.*dropping:UserWarning")  # the all-zero case warns, then refuses
@pytest.mark.parametrize("break_folder, name, pattern", [c[1:] for c in BROKEN_FOLDERS],
                         ids=[c[0] for c in BROKEN_FOLDERS])
def test_broken_folder_is_one_data_error_naming_the_file(course_dir, break_folder, name, pattern):
    break_folder(course_dir)
    with pytest.raises(DataError, match=pattern) as info:
        load_course_data(course_dir)
    message = str(info.value)
    assert name in message and str(course_dir) in message
    assert "\n" not in message


@pytest.mark.parametrize("make", ["missing", "file"])
def test_data_dir_missing_or_a_file(tmp_path, make):
    path = tmp_path / "data"
    if make == "file":
        path.write_text("not a folder")
    what = "does not exist" if make == "missing" else "is a file, not a folder"
    with pytest.raises(DataError, match=rf"data folder .*data {what}; copy the course's data folder .*--download"):
        load_course_data(path)


def test_cells_and_genes_without_counts_are_dropped_with_a_warning(tmp_path):
    parts = course_parts()
    df, genes = parts["MP.pickle"], list(parts["MP_genes.pickle"])
    empty_cell = parts["cell_IDs.pkl"][3]
    df.loc[df["Unnamed: 0"] == empty_cell, genes] = 0
    df[genes[5]] = 0
    folder = write_course_folder(tmp_path / "data", parts)
    with pytest.warns(DataWarning, match=r"MP\.pickle: dropping 1 cell\(s\) and 1 gene\(s\) with zero total "
                                         r"counts \(of 36 cells and 24 genes\)"):
        adata = load_course_data(folder)
    assert adata.shape == (35, 23)
    assert empty_cell not in adata.obs_names and genes[5] not in adata.var_names
    X = adata.X.toarray()
    assert (X.sum(1) > 0).all() and (X.sum(0) > 0).all()  # no 0/0 in any normalization
    assert np.isfinite(X / X.sum(1, keepdims=True)).all()
