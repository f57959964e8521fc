"""Shared fixtures: small synthetic counts (seconds) and the real Mouse Pancreas folder."""

import os
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _missing_data(msg):
    """Skip for want of the real data, or fail where it must be there (A4_REQUIRE_DATA=1, as in CI)."""
    if os.environ.get("A4_REQUIRE_DATA") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def data_root():
    """The folder of the named data sets (``A4_DATA_ROOT``, else ``../shared/data``), every one in it."""
    from cellembed.data import DATASETS

    root = Path(os.environ.get("A4_DATA_ROOT") or ROOT.parent / "shared/data")
    missing = sorted({spec.folder for spec in DATASETS.values()} - {p.name for p in root.glob("*") if p.is_dir()})
    if missing:
        _missing_data(f"named data sets not found in {root} (no {', '.join(missing)}): set A4_DATA_ROOT "
                      "to the folder holding them (e.g. ../shared/data)")
    return root


def _real_data_dir():
    candidates = [os.environ.get("COMP565_DATA_DIR"), ROOT / "data", ROOT.parent / "shared/data/mouse_pancreas"]
    for c in candidates:
        if c and (Path(c) / "MP.pickle").is_file():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def real_data_dir():
    """The course's data folder; skips (fails when A4_REQUIRE_DATA=1, as in CI) when absent."""
    path = _real_data_dir()
    if path is None:
        _missing_data("real data not found: set COMP565_DATA_DIR to the course's data folder "
                      "(e.g. ../shared/data/mouse_pancreas)")
    return path


@pytest.fixture(scope="session")
def real_adata(real_data_dir):
    from cellembed.data import load_course_data

    return load_course_data(real_data_dir)


def make_counts(n_per_type=40, n_types=3, n_genes=60, seed=0):
    """Poisson counts of cell types with distinct gene programs, as an AnnData (N x M)."""
    rng = np.random.default_rng(seed)
    rates = rng.gamma(0.6, 1.0, size=(n_types, n_genes))
    for t in range(n_types):  # each type expresses its own block strongly
        rates[t, t * (n_genes // n_types):(t + 1) * (n_genes // n_types)] += 4.0
    labels = np.repeat(np.arange(n_types), n_per_type)
    depth = rng.uniform(0.5, 1.5, size=labels.size)[:, None]
    X = rng.poisson(rates[labels] * depth)
    X[X.sum(1) == 0, 0] = 1  # no empty cells
    adata = anndata.AnnData(X=sp.csr_matrix(X.astype(np.int64)))
    adata.obs["Celltype"] = pd.Categorical([f"type{t}" for t in labels])
    adata.obs["batch"] = pd.Categorical(rng.integers(0, 2, labels.size))
    return adata


@pytest.fixture
def small_adata():
    return make_counts()


def run_compare(argv, capsys):
    """``compare.py ARGV`` in this process: (exit code, stdout, stderr)."""
    import compare

    try:
        code = compare.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
