"""The script's bad-input paths: one line naming the file or argument and the fix, a non-zero
exit, no traceback, nothing half-written; and what a stopped run leaves behind."""

import functools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import a4.download
import comp565_A4
from course_fixtures import BROKEN_FOLDERS, unsafe_pickle, write_course_folder, write_geo_folder

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--niter-nmf", "2", "--niter-etm", "2", "--niter-long", "3", "--jobs", "0", "--device", "cpu"]


@pytest.fixture
def course_dir(tmp_path):
    return write_course_folder(tmp_path / "data")


def cli(argv, capsys):
    """Exit code and stderr of ``comp565_A4.main(argv)`` (argparse errors exit through SystemExit)."""
    try:
        code = comp565_A4.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def one_line(err, *names):
    """The single line stderr leaves on a terminal; it names every one of ``names``.

    Progress bars (``leave=False``) redraw after a carriage return and clear themselves, so a
    terminal shows of each line only what follows its last ``\\r``.
    """
    assert "Traceback" not in err, err
    lines = [shown for line in err.split("\n") if (shown := line.rsplit("\r", 1)[-1].strip())]
    assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def no_temp_files(folder):
    return not [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------ bad data folders


@pytest.mark.filterwarnings("ignore:.*dropping:UserWarning")
@pytest.mark.parametrize("break_folder, name, pattern", [c[1:] for c in BROKEN_FOLDERS],
                         ids=[c[0] for c in BROKEN_FOLDERS])
def test_broken_data_folder(course_dir, tmp_path, capsys, break_folder, name, pattern):
    break_folder(course_dir)
    figures = tmp_path / "figures"
    code, err = cli(["--data-dir", course_dir, "--figures-dir", figures, *FAST], capsys)
    line = one_line(err, course_dir, name)
    assert code == 2 and line.startswith("comp565_A4.py: error: ")
    assert not figures.exists()


@pytest.mark.parametrize("make", ["missing", "file"])
def test_data_dir_missing_or_a_file(tmp_path, capsys, make):
    data = tmp_path / "data"
    if make == "file":
        data.write_text("x")
    code, err = cli(["--data-dir", data, "--figures-dir", tmp_path / "figures"], capsys)
    assert code == 2
    one_line(err, data, "--data-dir", "--download")
    assert not (tmp_path / "figures").exists()


def test_pickle_that_would_run_a_command_is_refused(course_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    (course_dir / "MP.pickle").write_bytes(unsafe_pickle(marker))
    code, err = cli(["--data-dir", course_dir, "--figures-dir", tmp_path / "figures", *FAST], capsys)
    assert code == 2
    one_line(err, course_dir / "MP.pickle", "refusing to unpickle it: it asks for posix.system")
    assert not marker.exists() and not (tmp_path / "figures").exists()


# ------------------------------------------------------------------------------ bad arguments


ARG_ERRORS = [
    (["--niter-etm", "0"], "argument --niter-etm: must be at least 1, got 0"),
    (["--niter-nmf", "ten"], "argument --niter-nmf: expected a whole number, got 'ten'"),
    (["--niter-long", "-5"], "argument --niter-long: must be at least 1, got -5"),
    (["--seed", "-1"], "argument --seed: must be 0 or more, got -1"),
    (["--jobs", "two"], "argument --jobs: expected a whole number, got 'two'"),
    (["--device", "tpu"], "argument --device: unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
    (["--nmf-iters", "5"], "unrecognized arguments: --nmf-iters 5"),
    (["--model", "vae"], "argument --model: invalid choice: 'vae' (choose from etm, scetm)"),
    (["--batch-correct", "--etm-batch-size", "100"],
     "argument --etm-batch-size: the batch-corrected model trains on all cells at once; "
     "drop --etm-batch-size or --model scetm"),
]


@pytest.mark.parametrize("args, message", ARG_ERRORS, ids=[a[0] for a, _ in ARG_ERRORS])
def test_bad_argument(course_dir, tmp_path, capsys, args, message):
    code, err = cli(["--data-dir", course_dir, "--figures-dir", tmp_path / "figures", *args], capsys)
    assert code == 2
    assert one_line(err, message).endswith("(see --help)")
    assert not (tmp_path / "figures").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_asked_for_without_a_gpu(course_dir, tmp_path, capsys):
    code, err = cli(["--data-dir", course_dir, "--figures-dir", tmp_path / "figures", "--device", "cuda"], capsys)
    assert code == 2
    one_line(err, "argument --device: cuda asked for, but torch sees no CUDA GPU; use --device cpu or auto")


def test_figures_dir_that_is_a_file(course_dir, tmp_path, capsys):
    figures = tmp_path / "figures.png"
    figures.write_bytes(b"keep me")
    code, err = cli(["--data-dir", course_dir, "--figures-dir", figures, *FAST], capsys)
    assert code == 1
    one_line(err, f"--figures-dir {figures} is a file, not a folder; pass another path")
    assert figures.read_bytes() == b"keep me"


def test_figures_dir_that_cannot_be_created(course_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    figures = tmp_path / "file" / "figures"
    code, err = cli(["--data-dir", course_dir, "--figures-dir", figures, *FAST], capsys)
    assert code == 1
    one_line(err, f"--figures-dir {figures} cannot be created (Not a directory); pass another path")


# ------------------------------------------------------------------------------ --download


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_download_network_failure(tmp_path, capsys):
    url = f"http://127.0.0.1:{_free_port()}"
    code, err = cli(["--download", url, "--data-dir", tmp_path / "data", "--figures-dir", tmp_path / "figures"],
                    capsys)
    assert code == 2
    one_line(err, f"{url}/GSM2230761_mouse1_umifm_counts.csv.gz: cannot connect", "--download FOLDER")
    assert not (tmp_path / "data").exists() and not (tmp_path / "figures").exists()


def test_download_of_too_small_files(tmp_path, capsys):
    src = write_geo_folder(tmp_path / "geo")  # 40 genes: not GEO's full files
    code, err = cli(["--download", src, "--data-dir", tmp_path / "data", "--figures-dir", tmp_path / "figures"],
                    capsys)
    assert code == 2
    one_line(err, "only 40 genes have any counts, fewer than the 4194 to keep")
    assert not (tmp_path / "data").exists() and no_temp_files(tmp_path)


def test_download_then_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(a4.download, "build_course_folder",
                        functools.partial(a4.download.build_course_folder, n_genes=20))
    src = write_geo_folder(tmp_path / "geo")
    figures = tmp_path / "figures"
    code = comp565_A4.main(["--download", str(src), "--data-dir", str(tmp_path / "data"), "--figures-dir",
                       str(figures), "--quick", "--jobs", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert "approximates the course's MP_genes.pickle" in out and "final ARI" in out
    assert json.loads((figures / "summary.json").read_text())["stages_finished"][-1] == "figures"


# ------------------------------------------------------------------------------ stopping early


def _bad_nelbo(*args):
    return float("nan")


def test_non_finite_etm_loss_stops_with_stage_and_iteration(course_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(comp565_A4, "train_scETM_helper", _bad_nelbo)
    figures = tmp_path / "figures"
    code, err = cli(["--data-dir", course_dir, "--figures-dir", figures, *FAST], capsys)
    assert code == 1
    one_line(err, "scETM: the objective became nan at iteration 0")
    summary = json.loads((figures / "summary.json").read_text())
    assert summary["stages_finished"] == ["nmf_sse", "nmf_psn"] and summary["interrupted"] is False
    assert "scETM: the objective became nan" in summary["error"]
    assert not (figures / "perf_scETM.csv").exists() and no_temp_files(figures)


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_during_training(course_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(comp565_A4, "train_scETM", _interrupt)
    figures = tmp_path / "figures"
    code, err = cli(["--data-dir", course_dir, "--figures-dir", figures, *FAST], capsys)
    assert code == 130
    one_line(err, "interrupted; finished stages: nmf_sse, nmf_psn (their files are complete)")
    summary = json.loads((figures / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["stages_finished"] == ["nmf_sse", "nmf_psn"]
    assert no_temp_files(figures)
    for name in ("nmf_sse", "nmf_psn", "nmf_sse_vs_psn"):
        assert (figures / f"{name}.eps").stat().st_size > 0 and (figures / f"{name}.png").stat().st_size > 0
    assert len(pd.read_csv(figures / "perf_nmf_psn.csv")) == 2
    assert not (figures / "perf_scETM.csv").exists()


def test_ctrl_c_while_a_figure_is_written_leaves_no_partial_file(course_dir, tmp_path, capsys, monkeypatch):
    def half_written(fig, fname, **kwargs):
        Path(fname).write_bytes(b"%!PS-Adobe half a figure")
        raise KeyboardInterrupt

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", half_written)
    figures = tmp_path / "figures"
    code, err = cli(["--data-dir", course_dir, "--figures-dir", figures, *FAST], capsys)
    assert code == 130 and "interrupted" in one_line(err)
    assert not (figures / "nmf_sse.eps").exists() and no_temp_files(figures)
    assert len(pd.read_csv(figures / "perf_nmf_sse.csv")) == 2  # written before the figure: complete


# ------------------------------------------------------------------------------ as a user runs it


def _script(*args):
    return subprocess.run([sys.executable, "comp565_A4.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_script_refuses_an_unsafe_pickle_end_to_end(course_dir, tmp_path):
    marker = tmp_path / "pwned"
    (course_dir / "MP.pickle").write_bytes(unsafe_pickle(marker, "subprocess"))
    proc = _script("--data-dir", course_dir, "--figures-dir", tmp_path / "figures")
    assert proc.returncode == 2
    one_line(proc.stderr, f"comp565_A4.py: error: {course_dir / 'MP.pickle'}: refusing to unpickle it")
    assert not marker.exists() and not (tmp_path / "figures").exists()


def test_script_bad_iteration_count_end_to_end(tmp_path):
    proc = _script("--niter-etm", "0", "--figures-dir", tmp_path / "figures")
    assert proc.returncode == 2 and proc.stdout == ""
    one_line(proc.stderr, "comp565_A4.py: error: argument --niter-etm: must be at least 1, got 0 (see --help)")


BACKLOG = """
import numpy as np
from a4.scoring import ARIScorer
labels = np.repeat(np.arange(8), 236)
rng = np.random.default_rng(0)
try:
    with ARIScorer(labels, n_workers=2) as scorer:
        for i in range(40):  # 10 MB of embeddings waiting for the workers: more than a pipe holds
            scorer.submit(i, rng.random((labels.size, 16)))
        raise KeyboardInterrupt
except KeyboardInterrupt:
    print("interrupted")
"""


def test_ctrl_c_with_scorings_still_queued_exits_promptly():
    proc = subprocess.run([sys.executable, "-c", BACKLOG], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "interrupted", proc.stderr


def _drain(stream, into):
    while chunk := stream.read1(4096):
        into.extend(chunk)


def test_script_ctrl_c_during_the_etm_end_to_end(course_dir, tmp_path):
    figures = tmp_path / "figures"
    proc = subprocess.Popen(
        [sys.executable, "comp565_A4.py", "--data-dir", str(course_dir), "--figures-dir", str(figures),
         "--niter-nmf", "3", "--niter-etm", "100000", "--jobs", "2", "--device", "cpu"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )
    err = bytearray()
    reader = threading.Thread(target=_drain, args=(proc.stderr, err), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while b"nelbo=" not in err and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b"nelbo=" in err, err.decode()  # the ETM is training
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        started = time.monotonic()
        code = proc.wait(timeout=60)
        assert time.monotonic() - started < 20, "Ctrl-C took too long"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    assert code == 130
    one_line(err.decode(), "interrupted; finished stages: nmf_sse, nmf_psn (their files are complete)")
    summary = json.loads((figures / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["stages_finished"] == ["nmf_sse", "nmf_psn"]
    assert no_temp_files(figures)
