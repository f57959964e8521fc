"""compare.py for a user's first hour: the demo run with no arguments, data without labels, the
clustering options (as scanpy's), rows kept through Ctrl-C, --resume and merged reruns, counts in
adata.raw and 10x folders with --labels, and Ctrl-C at any moment of either command."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.io
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from conftest import run_compare as run
from cellembed.data import DataWarning
from cellembed.datasets import demo_path
from cellembed.evaluation.metrics import graph_labels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    return anndata.read_h5ad(demo_path())


def test_no_arguments_runs_the_demo_leaderboard(tmp_path):
    """``python compare.py`` after set-up: pca, nmf_psn and vae, seed 0, on the bundled real cells."""
    proc = subprocess.run([sys.executable, str(ROOT / "compare.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    board = pd.read_csv(tmp_path / "results" / "pbmc3k_demo" / "leaderboard.csv")
    assert list(board["model"]) == ["pca", "nmf_psn", "vae"] and set(board["seed"]) == {0}
    assert (board.loc[board["model"] == "pca", "ari_kmeans"] > 0.5).all()  # ~0.73: real structure
    assert (tmp_path / "results" / "pbmc3k_demo" / "tsne.png").stat().st_size > 10_000


def test_data_without_labels_gives_embeddings_and_clusters(demo, tmp_path, capsys):
    unlabelled = demo.copy()
    del unlabelled.obs["cell_type"]
    path = tmp_path / "cells.h5ad"
    unlabelled.write_h5ad(path)
    with pytest.warns(DataWarning, match="no label column .*: embeddings and clusters without scores"):
        code, out, err = run(["--data", path, "--models", "pca,gmvae:epochs=2", "--n-clusters", "5", "--seeds",
                              "0", "--quick", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    folder = tmp_path / "out" / "cells"
    emb = anndata.read_h5ad(folder / "embeddings.h5ad")
    assert emb.obsm["X_pca"].shape == (demo.n_obs, 16)
    assert emb.obs["gmvae_epochs_2_clusters"].nunique() <= 5  # its own clusters, K = --n-clusters
    assert emb.obs["pca_clusters"].nunique() >= 1  # PCA's Louvain clusters colour its panel
    board = pd.read_csv(folder / "leaderboard.csv")
    assert not {"ari_louvain", "ari_kmeans", "ari_own"} & set(board.columns)
    assert (folder / "tsne.png").is_file() and "smoke run" in (folder / "leaderboard.md").read_text()
    code, _, err = run(["--data", path, "--models", "gmvae", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "pass --n-clusters K" in err


def test_leiden_and_the_resolution_partition_as_scanpy_does(demo):
    z = sc.pp.pca(np.log1p(demo.X.toarray()), n_comps=10, random_state=0)
    for cluster in ("louvain", "leiden"):
        for resolution in (0.15, 1.0):
            ours = graph_labels(z, seed=0, cluster=cluster, n_neighbors=15, resolution=resolution)
            one = anndata.AnnData(obsm={"X_z": z})
            sc.pp.neighbors(one, n_neighbors=15, use_rep="X_z")
            if cluster == "louvain":
                sc.tl.louvain(one, resolution=resolution, random_state=0)
            else:
                sc.tl.leiden(one, resolution=resolution, random_state=0, flavor="igraph", n_iterations=2,
                             directed=False)
            assert adjusted_rand_score(one.obs[cluster], ours) == 1.0, (cluster, resolution)
    coarse = graph_labels(z, cluster="leiden", resolution=0.15)
    fine = graph_labels(z, cluster="leiden", resolution=1.0)
    assert np.unique(fine).size > np.unique(coarse).size  # the resolution moves the partition


def test_compare_scores_the_partition_it_is_asked_for(demo, tmp_path, capsys):
    code, _, err = run(["--data", demo_path(), "--models", "pca", "--seeds", "0", "--cluster", "leiden",
                        "--resolution", "1.0", "--n-neighbors", "15", "--no-tsne", "--out", tmp_path], capsys)
    assert code == 0, err
    folder = tmp_path / "pbmc3k_demo"
    row = pd.read_csv(folder / "leaderboard.csv").iloc[0]
    z = anndata.read_h5ad(folder / "embeddings.h5ad").obsm["X_pca"]
    one = anndata.AnnData(obsm={"X_z": z})
    sc.pp.neighbors(one, n_neighbors=15, use_rep="X_z")
    sc.tl.leiden(one, resolution=1.0, random_state=0, flavor="igraph", n_iterations=2, directed=False)
    labels = anndata.read_h5ad(demo_path()).obs["cell_type"].astype(str)
    assert row["ari_leiden"] == pytest.approx(adjusted_rand_score(labels, one.obs["leiden"]), abs=1e-12)
    assert "ari_louvain" not in row.index and "Leiden (resolution 1" in (folder / "leaderboard.md").read_text()


def test_one_cluster_is_a_warning_line(tmp_path, capsys):
    argv = ["--data", demo_path(), "--models", "pca", "--seeds", "0", "--resolution", "0.001", "--no-tsne",
            "--out", tmp_path]
    proc = subprocess.run([sys.executable, "compare.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0
    assert ("compare.py: warning: pca seed 0: Louvain (resolution 0.001, 30 neighbours) found one cluster, so its "
            "ARI is 0; rank by ari_kmeans, or pass a higher --resolution\n") in proc.stderr


def test_reruns_merge_and_resume_skips(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--data", demo_path(), "--seeds", "0", "1", "--no-tsne", "--out", out]
    assert run([*base, "--models", "pca,nmf_sse:niter=3"], capsys)[0] == 0
    board = pd.read_csv(out / "pbmc3k_demo" / "leaderboard.csv")
    code, out_text, _ = run([*base, "--models", "pca,nmf_psn:niter=3", "--resume"], capsys)
    assert code == 0 and "pca seed 0: in leaderboard.csv already (--resume)" in out_text
    merged = pd.read_csv(out / "pbmc3k_demo" / "leaderboard.csv")
    assert sorted(set(merged["model"])) == ["nmf_psn:niter=3", "nmf_sse:niter=3", "pca"] and len(merged) == 6
    pd.testing.assert_frame_equal(merged[merged["model"] == "pca"].reset_index(drop=True),
                                  board[board["model"] == "pca"].reset_index(drop=True))  # skipped: kept as it was
    emb = anndata.read_h5ad(out / "pbmc3k_demo" / "embeddings.h5ad")
    assert set(emb.obsm) == {"X_pca", "X_nmf_sse_niter_3", "X_nmf_psn_niter_3"}
    assert run([*base, "--models", "pca"], capsys)[0] == 0  # without --resume: the same rows replaced
    again = pd.read_csv(out / "pbmc3k_demo" / "leaderboard.csv")
    assert len(again) == 6 and list(again["model"][-2:]) == ["pca", "pca"]


def board_with_labels(data, demo, tmp_path, capsys):
    """``compare.py --data DATA --labels CSV`` (the demo's cell types by barcode) for pca: its leaderboard."""
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"cell": demo.obs_names, "type": demo.obs["cell_type"].astype(str)}).to_csv(labels, index=False)
    code, _, err = run(["--data", data, "--labels", labels, "--models", "pca", "--seeds", "0", "--no-tsne",
                        "--out", tmp_path], capsys)
    assert code == 0, err
    return pd.read_csv(tmp_path / data.stem / "leaderboard.csv")


def test_counts_in_adata_raw_and_a_10x_folder_with_labels(demo, tmp_path, capsys):
    lognorm = demo.copy()
    lognorm.raw = demo.copy()
    sc.pp.normalize_total(lognorm)
    sc.pp.log1p(lognorm)
    path = tmp_path / "raw.h5ad"
    lognorm.write_h5ad(path)
    code, _, err = run(["--data", path, "--models", "pca", "--seeds", "0", "--no-tsne", "--out", tmp_path], capsys)
    assert code == 2 and "not raw counts; pass --layer raw to read adata.raw" in err
    code, _, err = run(["--data", path, "--layer", "raw", "--models", "pca", "--seeds", "0", "--no-tsne",
                        "--out", tmp_path], capsys)
    assert code == 0, err
    from_raw = pd.read_csv(tmp_path / "raw" / "leaderboard.csv")

    folder = tmp_path / "filtered_feature_bc_matrix"
    folder.mkdir()
    scipy.io.mmwrite(folder / "matrix.mtx", sp.csr_matrix(demo.X.T.astype(np.int64)))  # genes x cells, as 10x
    pd.DataFrame({"id": [f"ENSG{i:05d}" for i in range(demo.n_vars)], "name": demo.var_names,
                  "kind": "Gene Expression"}).to_csv(folder / "features.tsv", sep="\t", header=False, index=False)
    pd.Series(demo.obs_names).to_csv(folder / "barcodes.tsv", header=False, index=False)
    for name in ("matrix.mtx", "features.tsv", "barcodes.tsv"):
        subprocess.run(["gzip", str(folder / name)], check=True)
    from_10x = board_with_labels(folder, demo, tmp_path, capsys)
    scores = ["ari_louvain", "ari_kmeans", "nmi_kmeans"]
    np.testing.assert_allclose(from_10x[scores].to_numpy(), from_raw[scores].to_numpy(), atol=1e-6)


def test_a_bad_setting_is_one_line_before_the_data_are_read(tmp_path, capsys):
    code, _, err = run(["--data", tmp_path / "missing.h5ad", "--models", "vae:epochs=abc"], capsys)
    assert code == 2
    assert err.strip() == ("compare.py: error: argument --models: vae: VAE: epochs='abc' must be a whole number "
                           "(see --help)")


def test_help_lists_the_models():
    proc = subprocess.run([sys.executable, "compare.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "models: pca, nmf_sse, nmf_psn, etm, scetm" in " ".join(proc.stdout.split())


def group_alive(pgid):
    """The command lines of the live (not zombie) processes of process group ``pgid``."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append((stat.parent / "cmdline").read_text().replace("\0", " ").strip())
        except (OSError, IndexError, ValueError):  # a process that ended while being read
            continue
    return alive


def interrupt(argv, wait_for, cwd, timeout=300):
    """Start a command, send SIGINT once ``wait_for`` appears in its output (stdout and stderr
    together; None: after a second, in the middle of the imports), and return (exit code,
    output, seconds from SIGINT to exit).

    Nothing here can block the suite: the output is read by a thread, every wait has a deadline,
    and the command runs in a process group of its own that is killed whole at the end (a worker
    it started must not outlive it, nor hold the output pipe open). The command starts with
    SIGINT's default action whatever this process inherited: a suite started in the background
    by a shell without job control (``bash -c '... &'``) runs with SIGINT ignored, which a child
    inherits and Python then keeps, so no Ctrl-C would reach it.
    """
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + (timeout if wait_for is not None else 1.0)
        while time.monotonic() < deadline and proc.poll() is None:
            if wait_for is not None and wait_for in "".join(lines):
                break
            time.sleep(0.05)
        output = "".join(lines)
        assert proc.poll() is None and (wait_for is None or wait_for in output), \
            f"{wait_for!r} never came (exit code {proc.returncode}):\n{output}"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running 60 s after SIGINT; its output:\n{''.join(lines)}") from None
        seconds = time.monotonic() - sent
        # a worker of the command's still alive 10 s after it ended would be an orphan
        deadline = time.monotonic() + 10
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_alive(proc.pid), f"processes of the command outlived it by 10 s: {group_alive(proc.pid)}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the command and whatever it started
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
        reader.join(timeout=10)
    return code, "".join(lines), seconds


DROPPED_INTERRUPT = """
import time, weakref
from cellembed import cli
cli.exit_promptly_on_interrupt("probe")

class Box:
    pass

hit = []


def slow(_ref):  # a weakref callback that holds the interpreter: Ctrl-C lands in one
    try:
        start = time.monotonic()
        while time.monotonic() - start < 0.2:
            pass
    except KeyboardInterrupt:
        hit.append(True)  # from now on the main thread runs plain code
        raise


print("go", flush=True)
try:
    while True:
        if hit:
            time.sleep(0.001)  # work of the main thread's own
            continue
        box = Box()
        ref = weakref.ref(box, slow)
        del box  # the callback runs here
except KeyboardInterrupt:
    cli.report_interrupt("probe: interrupted in the main thread")
    raise SystemExit(130)
"""


def test_ctrl_c_inside_a_weakref_callback_still_reaches_the_main_thread(tmp_path):
    """Python drops a KeyboardInterrupt raised in a weakref callback (as during a garbage collection);
    the command-line handler raises it in the main thread again, which then says what it stopped."""
    script = tmp_path / "probe.py"
    script.write_text(DROPPED_INTERRUPT)
    code, output, seconds = interrupt([script], "go", ROOT)
    assert code == 130 and seconds < 2, (code, seconds, output)
    assert "probe: interrupted in the main thread" in output and "Exception ignored" not in output, output


def test_ctrl_c_keeps_the_finished_runs_and_resume_skips_them(tmp_path):
    argv = [ROOT / "compare.py", "--data", demo_path(), "--models", "pca,vae:epochs=100000", "--seeds", "0",
            "--no-tsne", "--out", tmp_path / "out"]
    code, output, seconds = interrupt(argv, "pca seed 0:", tmp_path)
    assert code == 130 and seconds < 10, (code, seconds, output)
    assert "interrupted after 1 finished run(s); their rows are in" in output and "Traceback" not in output
    board = pd.read_csv(tmp_path / "out" / "pbmc3k_demo" / "leaderboard.csv")
    assert list(board["model"]) == ["pca"]
    assert not list((tmp_path / "out" / "pbmc3k_demo").glob(".*.tmp"))  # no half-written file
    code, output, _ = interrupt([ROOT / "compare.py", *argv[1:], "--resume"], "in leaderboard.csv already",
                                tmp_path)
    assert code == 130 and "pca seed 0: in leaderboard.csv already (--resume)" in output


@pytest.mark.parametrize("moment", [None, "NMF-SSE"])
def test_ctrl_c_ends_the_assignment_within_seconds(real_data_dir, tmp_path, moment):
    """While torch and scanpy import, and while training runs beside the scoring workers."""
    argv = [ROOT / "comp565_A4.py", "--data-dir", real_data_dir, "--figures-dir", tmp_path / "f", "--jobs", "2",
            "--niter-nmf", "100000"]
    code, output, seconds = interrupt(argv, moment, tmp_path)
    assert code == 130 and seconds < 10, (code, seconds, output)
    assert "Traceback" not in output and "interrupted" in output.splitlines()[-1]


def write_cell_ranger_h5(path, counts, barcodes, genes):
    """A Cell Ranger v3 ``filtered_feature_bc_matrix.h5``: the matrix group, genes x cells CSC."""
    import h5py

    csc = sp.csc_matrix(counts.T.astype(np.int32))  # (genes, cells), stored by cell
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"], m["indices"], m["indptr"] = csc.data, csc.indices, csc.indptr
        m["shape"] = np.array(csc.shape, dtype=np.int32)
        feats = m.create_group("features")
        feats["id"] = np.array([f"ENSG{i:05d}" for i in range(len(genes))], dtype="S")
        feats["name"] = np.array(genes, dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        feats["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
        feats["_all_tag_keys"] = np.array([b"genome"])


def test_a_cell_ranger_h5_with_labels(demo, tmp_path, capsys):
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    write_cell_ranger_h5(path, demo.X, demo.obs_names, demo.var_names)
    from_h5 = board_with_labels(path, demo, tmp_path, capsys)
    code, _, err = run(["--data", demo_path(), "--models", "pca", "--seeds", "0", "--no-tsne", "--out", tmp_path],
                       capsys)
    demo_board = pd.read_csv(tmp_path / "pbmc3k_demo" / "leaderboard.csv")
    scores = ["ari_louvain", "ari_kmeans", "nmi_kmeans"]
    np.testing.assert_allclose(from_h5[scores].to_numpy(), demo_board[scores].to_numpy(), atol=1e-6)
    half = tmp_path / "half.csv"
    pd.DataFrame({"cell": ["nobody"], "type": ["T"]}).to_csv(half, index=False)
    code, _, err = run(["--data", path, "--labels", half, "--models", "pca", "--out", tmp_path], capsys)
    assert code == 2 and "none of its 1 cell ids ('nobody') is a cell of the data set" in err
