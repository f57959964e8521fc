"""compare.py: the leaderboard on real data, its files, and one clear line for every bad input."""

import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import compare
from conftest import run_compare as run
from cellembed.evaluation import metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pancreas_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    code = compare.main(["--data", "mouse_pancreas", "--data-root", str(data_root), "--models",
                         "pca,nmf_psn:niter=20", "--seeds", "0", "1", "--out", str(out)])
    return code, out / "mouse_pancreas"


def test_leaderboard_files_on_the_real_data(pancreas_run):
    code, out = pancreas_run
    assert code == 0
    for name in ("leaderboard.csv", "leaderboard.md", "leaderboard.png", "embeddings.h5ad", "tsne.png"):
        assert (out / name).stat().st_size > 0, name
    board = pd.read_csv(out / "leaderboard.csv")
    assert list(board["model"]) == ["pca", "pca", "nmf_psn:niter=20", "nmf_psn:niter=20"]
    assert list(board["seed"]) == [0, 1, 0, 1] and not board["supervised"].any()
    scores = ["ari_louvain", "nmi_louvain", "ari_kmeans", "nmi_kmeans", "knn_mixing", "asw_batch"]
    assert board[scores].notna().all().all() and ((board[scores] >= -1) & (board[scores] <= 1)).all().all()
    pca = board[board["model"] == "pca"]
    assert (pca["ari_louvain"] > 0.5).all(), pca  # PCA of log-normalized counts: ~0.61 on this data
    md = (out / "leaderboard.md").read_text()
    assert "| pca | 2 | no |" in md and "knn_mixing if the batches were mixed perfectly" in md


def test_leaderboard_kmeans_recomputed_from_the_embeddings(pancreas_run):
    _, out = pancreas_run
    board = pd.read_csv(out / "leaderboard.csv")
    emb = anndata.read_h5ad(out / "embeddings.h5ad")
    assert set(emb.obsm) == {"X_pca", "X_nmf_psn_niter_20"}
    labels = emb.obs["Celltype"].to_numpy()
    assert len(emb.uns["Celltype_colors"]) == emb.obs["Celltype"].nunique()
    for model, key in (("pca", "X_pca"), ("nmf_psn:niter=20", "X_nmf_psn_niter_20")):
        row = board[(board["model"] == model) & (board["seed"] == 0)].iloc[0]
        again = metrics.clustering_scores(emb.obsm[key], labels, seed=0)
        assert again["ari_kmeans"] == pytest.approx(row["ari_kmeans"], abs=1e-12)
        assert again["ari_louvain"] == pytest.approx(row["ari_louvain"], abs=1e-12)


def test_same_seed_same_numbers(data_root, tmp_path, capsys):
    boards = []
    for out in ("a", "b"):
        code, _, _ = run(["--data", "10x_pbmc", "--data-root", data_root, "--models", "nmf_psn:niter=5",
                          "--seeds", "3", "--out", tmp_path / out, "--no-tsne"], capsys)
        assert code == 0
        boards.append(pd.read_csv(tmp_path / out / "10x_pbmc" / "leaderboard.csv").drop(columns="seconds"))
    pd.testing.assert_frame_equal(boards[0], boards[1])


def write_h5ad(path, labels, X=None):
    n = len(labels)
    X = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, size=(n, 30)).astype(np.float32)) if X is None else X
    adata = anndata.AnnData(X=X)
    adata.obs["kind"] = pd.Categorical(labels)
    adata.write_h5ad(path)
    return path


BAD = [
    (["--data", "nowhere_set"], 2, "unknown data set 'nowhere_set'"),
    (["--models", "pca,nope"], 2, "argument --models: unknown model 'nope'; choose from pca"),
    (["--models", "nmf_psn:niters=5"], 2, "argument --models: nmf_psn: NMFPoisson has no setting 'niters'"),
    (["--models", "pca:5"], 2, "argument --models: 'pca:5': settings are field=value"),
    (["--seeds", "0", "0"], 2, "argument --seeds: a seed is listed twice"),
]


@pytest.mark.parametrize("extra, code, message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_arguments_are_one_line(tmp_path, capsys, extra, code, message):
    path = write_h5ad(tmp_path / "cells.h5ad", ["a", "b"] * 20)
    argv = ["--data", path, "--label-key", "kind", "--models", "pca", "--out", tmp_path / "out"]
    if extra[0] in argv:  # the bad value replaces the good one
        i = argv.index(extra[0])
        del argv[i:i + 2]
    got, _, err = run(argv + extra, capsys)
    assert got == code
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_bad_data_files_are_one_line(tmp_path, capsys):
    cases = {
        "missing key": (write_h5ad(tmp_path / "a.h5ad", ["a", "b"] * 20), ["--label-key", "cell_type"],
                        "cell_type"),
        "one class": (write_h5ad(tmp_path / "b.h5ad", ["a"] * 40), ["--label-key", "kind"], "one class"),
        "not counts": (write_h5ad(tmp_path / "c.h5ad", ["a", "b"] * 20, X=sp.csr_matrix(np.full((40, 30), 0.5))),
                       ["--label-key", "kind"], "X holds normalized values"),
    }
    for name, (path, keys, message) in cases.items():
        code, _, err = run(["--data", path, *keys, "--models", "pca", "--out", tmp_path / "out"], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], (name, err)
    assert not (tmp_path / "out").exists()


def test_help_answers_without_importing_torch_or_scanpy():
    code = ("import sys, runpy; sys.argv = ['compare.py', '--help']\n"
            "try:\n    runpy.run_path('compare.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'scanpy' not in sys.modules, 'heavy import before --help'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--models" in proc.stdout
