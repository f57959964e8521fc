"""compare.py's runs on Dask: a 2-worker LocalCluster gives the serial run's leaderboard (rows in the
serial loop's order, the same numbers), a scheduler that does not answer is one line, and neither
--help nor a serial run imports distributed."""

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

import compare
from cellembed.cli import Notice
from cellembed.datasets import demo_path
from cellembed.leaderboard import _merged
from cellembed.models import load_model
from cellembed.runner import CONNECT_TIMEOUT, _quiet_workers

ROOT = Path(__file__).resolve().parents[1]
RUNS = ["--data", demo_path(), "--models", "pca,nmf_psn:niter=5,vae:epochs=2", "--seeds", "0", "1", "--no-tsne",
        "--save-models"]
DASK_MODULES = "[m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')]"


def test_two_local_workers_give_the_serial_leaderboard(tmp_path, capfd, recwarn):
    # The serial run with one thread, each worker's (torch's CPU sums depend on the thread count), in a
    # process of its own that also checks it never imported distributed (anndata 0.12 imports dask's core).
    script = ("import sys, compare; code = compare.main(sys.argv[1:]); "
              "assert not [m for m in sys.modules if m.split('.')[0] == 'distributed'], 'distributed imported'; "
              "sys.exit(code)")
    argv = [*RUNS, "--threads", "1", "--out", tmp_path / "serial"]
    proc = subprocess.run([sys.executable, "-c", script, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    code = compare.main([str(a) for a in [*RUNS, "--workers", "2", "--out", tmp_path / "dask"]])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "6 runs on a local Dask cluster of 2 worker processes, 1 thread(s) each" in out
    # the workers' warnings are raised again in the client (the serial run's lines); no log of the shutdown
    warned = sorted(f"compare.py: warning: {w.message}" for w in recwarn if issubclass(w.category, Notice))
    assert warned == sorted(line for line in proc.stderr.splitlines() if line.startswith("compare.py: warning:"))
    assert len(warned) == 3 and "Traceback" not in err and "Worker process still alive" not in err, err
    serial, dask = tmp_path / "serial" / "pbmc3k_demo", tmp_path / "dask" / "pbmc3k_demo"
    one, two = (pd.read_csv(folder / "leaderboard.csv") for folder in (serial, dask))
    assert list(zip(two["model"], two["seed"])) == [(m, s) for m in ("pca", "nmf_psn:niter=5", "vae:epochs=2")
                                                    for s in (0, 1)]
    pd.testing.assert_frame_equal(one.drop(columns="seconds"), two.drop(columns="seconds"), check_exact=True)
    assert (serial / "leaderboard.md").read_text().split("| seconds |")[0] == \
        (dask / "leaderboard.md").read_text().split("| seconds |")[0]
    emb_one, emb_two = (anndata.read_h5ad(folder / "embeddings.h5ad") for folder in (serial, dask))
    assert set(emb_one.obsm) == set(emb_two.obsm) == {"X_pca", "X_nmf_psn_niter_5", "X_vae_epochs_2"}
    for key in emb_one.obsm:
        np.testing.assert_array_equal(emb_one.obsm[key], emb_two.obsm[key])
    # --save-models: the first seed's model, fitted in a worker, saved by the client, loads to the same latent
    demo = anndata.read_h5ad(demo_path())
    for name in ("pca", "vae_epochs_2"):
        np.testing.assert_array_equal(load_model(dask / "models" / name).get_latent(demo),
                                      load_model(serial / "models" / name).get_latent(demo))


def _worker_log_level():
    return logging.getLogger("distributed.worker").getEffectiveLevel()


def test_the_shutdown_of_our_own_workers_is_quiet_in_their_processes():
    # a heartbeat that meets the closed scheduler logs an ERROR in the worker's process, where the
    # client's log level does not reach: dask_client raises the workers' own level before closing
    from distributed import Client

    with Client(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as client:
        assert set(client.run(_worker_log_level).values()) == {logging.INFO}  # distributed's default
        _quiet_workers(client)
        assert set(client.run(_worker_log_level).values()) == {logging.CRITICAL}


def test_rows_are_written_in_the_serial_order_whatever_order_runs_finish_in():
    def rows(*keys, value=0.0):
        return pd.DataFrame([{"model": m, "seed": s, "ari": value} for m, s in keys])

    plan = {("pca", 0): 0, ("pca", 1): 1, ("vae", 0): 2, ("vae", 1): 3}
    earlier = rows(("vae", 0), ("etm", 0), ("pca", 1), value=-1.0)  # an earlier run into the same folder
    frame, finished = earlier, {}
    for key in [("vae", 1), ("pca", 1), ("vae", 0), ("pca", 0)]:  # as they came back from the workers
        finished[key] = plan[key]
        frame = _merged(frame, rows(key, value=1.0), finished)
    # the earlier row not run again first, then this run's rows as the serial loop appends them
    assert list(zip(frame["model"], frame["seed"], frame["ari"])) == [
        ("etm", 0, -1.0), ("pca", 0, 1.0), ("pca", 1, 1.0), ("vae", 0, 1.0), ("vae", 1, 1.0)]
    serial, finished = earlier, {}
    for key in plan:  # the serial loop: the order it appends in is kept
        finished[key] = plan[key]
        serial = _merged(serial, rows(key, value=1.0), finished)
    pd.testing.assert_frame_equal(frame, serial)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:{port}", "no-port-here"])
def test_a_scheduler_that_does_not_answer_is_one_line(address, tmp_path, capfd):
    address = address.format(port=free_port())  # nothing listens there
    started = time.perf_counter()
    code = compare.main(["--scheduler", address, "--models", "pca", "--out", str(tmp_path)])
    seconds = time.perf_counter() - started
    out, err = capfd.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"compare.py: error: --scheduler {address}: no Dask scheduler there (") and \
        err.endswith("e.g. tcp://node01:8786 (a SLURMCluster's scheduler_address)\n") and err.count("\n") == 1, err
    assert seconds < CONNECT_TIMEOUT + 5, seconds
    assert not list(tmp_path.iterdir())  # before the data were read: nothing written


def test_help_imports_no_dask_and_the_cluster_flags_are_checked(capsys):
    proc = subprocess.run([sys.executable, "-c", "import sys, compare\ntry:\n    compare.parse_args(['--help'])\n"
                           f"except SystemExit:\n    pass\nprint({DASK_MODULES})"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "[]", proc.stderr
    assert "--workers N" in proc.stdout and "--scheduler ADDRESS" in proc.stdout
    for argv, message in [(["--workers", "2", "--scheduler", "tcp://h:8786"], "not allowed with argument"),
                          (["--workers", "0"], "must be at least 1"),
                          (["--workers", "4", "--threads", "2"], "--threads: 2 for 4 workers; give each at least one")]:
        with pytest.raises(SystemExit) as exc:
            compare.parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
