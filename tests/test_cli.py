"""The script's bad-input paths: one line naming the file or argument and the fix, a non-zero
exit, no traceback, nothing half-written; and what a stopped run leaves behind."""

import fcntl
import functools
import json
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from course_fixtures import (
    BROKEN_FOLDERS,
    unsafe_pickle,
    write_course_folder,
    write_geo_folder,
)

import cellembed.data.download
import comp565_A4

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
    (["--model", "vae"], "argument --model: invalid choice: 'vae' (choose from "),  # quotes vary by Python
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
    one_line(err, "argument --device: device cuda asked for, but torch sees no CUDA GPU; use cpu or auto")


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
    monkeypatch.setattr(cellembed.data.download, "build_course_folder",
                        functools.partial(cellembed.data.download.build_course_folder, n_genes=20))
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
    line = one_line(err, "the objective became nan at iteration 0")
    assert line.startswith("comp565_A4.py: error: ETM: the objective became nan"), line  # the course's ETM
    summary = json.loads((figures / "summary.json").read_text())
    assert summary["stages_finished"] == ["nmf_sse", "nmf_psn"] and summary["interrupted"] is False
    assert summary["error"].startswith("ETM: the objective became nan")
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
from cellembed.evaluation.scoring import ARIScorer
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


def _drain(fd, into):
    """Read a pseudo-terminal's master side until the child closes it."""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child's side is closed
            return
        if not chunk:
            return
        into.extend(chunk)


def test_script_ctrl_c_during_the_etm_end_to_end(course_dir, tmp_path):
    """Ctrl-C while the ETM trains, with stderr on a terminal (a pseudo-terminal): its live bar."""
    figures = tmp_path / "figures"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns: tqdm draws to fit
    proc = subprocess.Popen(
        [sys.executable, "comp565_A4.py", "--data-dir", str(course_dir), "--figures-dir", str(figures),
         "--niter-nmf", "3", "--niter-etm", "100000", "--jobs", "2", "--device", "cpu"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=slave,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )
    os.close(slave)
    err = bytearray()
    reader = threading.Thread(target=_drain, args=(master, err), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while b"ETM:" not in err and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        while b"nelbo=" not in err and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # the bar shows the objective from the first step on
        assert b"ETM:" in err and b"nelbo=" in err, err.decode()  # the ETM is training, its bar live
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        started = time.monotonic()
        code = proc.wait(timeout=60)
        assert time.monotonic() - started < 20, "Ctrl-C took too long"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    os.close(master)
    assert code == 130
    shown = err.decode().replace("\r\n", "\n")  # the terminal turns every newline into CR LF
    one_line(shown, "interrupted; finished stages: nmf_sse, nmf_psn (their files are complete)")
    summary = json.loads((figures / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["stages_finished"] == ["nmf_sse", "nmf_psn"]
    assert no_temp_files(figures)


# ------------------------------------------------------------------------------ help, imports, set-up

HEAVY = ("torch", "scanpy", "anndata", "numpy", "pandas", "matplotlib")
RUN_AS_MAIN = """
import runpy, sys
sys.argv = ["comp565_A4.py", *sys.argv[1:]]
try:
    runpy.run_path("comp565_A4.py", run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = [m for m in {heavy!r} if m in sys.modules]
print("HEAVY=" + ",".join(heavy) + ";CODE=" + str(code), file=sys.stderr)
"""


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["--niter-etm", "0"], 2), (["--nmf-iters", "5"], 2),
                                        (["--model", "vae"], 2)], ids=["help", "bad-value", "typo", "bad-choice"])
def test_help_and_argument_errors_answer_before_the_heavy_imports(args, code):
    proc = subprocess.run([sys.executable, "-c", RUN_AS_MAIN.format(heavy=HEAVY), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.stderr.strip().endswith(f"HEAVY=;CODE={code}"), proc.stderr  # nothing heavy was imported
    if code == 0:
        assert proc.stdout.startswith("usage: comp565_A4.py") and "--data-dir DIR" in proc.stdout
    else:
        assert "(see --help)" in proc.stderr


def test_help_states_each_default_once():
    proc = subprocess.run([sys.executable, "comp565_A4.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    options = re.split(r"\n  (?=-)", proc.stdout.split("options:", 1)[1])  # one chunk per option
    assert len(options) > 15
    for option in options:
        assert option.count("default") <= 1 and "(default: None)" not in option, option
    assert "python comp565_A4.py > run.log 2>&1" in " ".join(proc.stdout.split())  # how to log a run


def test_a_missing_package_is_one_line_with_the_set_up_command(tmp_path):
    """Without the virtual environment's packages (``python -S``: no site-packages at all)."""
    proc = subprocess.run([sys.executable, "-S", "comp565_A4.py", "--quick", "--figures-dir", tmp_path / "f"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    line = one_line(proc.stderr, "comp565_A4.py: error: the package 'anndata' is not installed",
                    "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt -e .")
    assert line.startswith("comp565_A4.py: error:")
    assert not (tmp_path / "f").exists()


HIDE_TORCH = """
import runpy, sys


class NotInstalled:  # answers every import of torch as an environment without it would
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NotInstalled())
sys.argv = ["comp565_A4.py", *sys.argv[1:]]
runpy.run_path("comp565_A4.py", run_name="__main__")
"""


def test_missing_torch_alone_is_named(tmp_path):
    """Every other package present, torch not importable (a finder that says it is not installed)."""
    proc = subprocess.run([sys.executable, "-c", HIDE_TORCH, "--quick", "--figures-dir", str(tmp_path / "f")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert one_line(proc.stderr) == (f"comp565_A4.py: error: the package 'torch' is not installed in this Python "
                                     f"({sys.executable}); set up the environment first: {comp565_A4.cli.SETUP}")
    assert not (tmp_path / "f").exists()


# ------------------------------------------------------------------------------ where the data is


def test_relative_data_dir_is_named_by_its_absolute_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = cli(["--data-dir", "data", "--figures-dir", tmp_path / "figures"], capsys)
    assert code == 2
    one_line(err, f"data folder {tmp_path / 'data'} does not exist", "--data-dir")


def test_course_folder_one_level_down_is_pointed_at(tmp_path, capsys):
    course = write_course_folder(tmp_path / "shared" / "mouse_pancreas")
    code, err = cli(["--data-dir", tmp_path / "shared", "--figures-dir", tmp_path / "figures"], capsys)
    assert code == 2
    line = one_line(err, f"data folder {tmp_path / 'shared'} lacks MP.pickle",
                    f"the course folder is one level down at {course}: pass --data-dir {course}")
    assert line.startswith("comp565_A4.py: error: ") and not (tmp_path / "figures").exists()


# ------------------------------------------------------------------------------ what a log holds

STAGE_LINES = ["Q1-Q2 NMF-SSE: ", "Q3 NMF-Poisson: ", "Q4 ETM: ", "Q5 NMF-Poisson, 3 iterations: ",
               "Q6-Q8 figures: "]


def test_a_logged_run_has_no_carriage_returns_and_one_line_per_stage(course_dir, tmp_path):
    """``python comp565_A4.py > run.log 2>&1``: no bar updates, one line per stage, in order."""
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.run([sys.executable, "comp565_A4.py", "--data-dir", course_dir, "--figures-dir",
                               tmp_path / "figures", *FAST], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "\x1b" not in text, text
    lines = text.splitlines()
    assert len(lines) == 2 + len(STAGE_LINES), text  # the set-up line, the stages, the final ARIs
    assert lines[0].startswith("36 cells x 24 genes from ") and "Q4-Q8 with the ETM on cpu" in lines[0]
    for line, start in zip(lines[1:], STAGE_LINES):
        assert line.startswith(start), (start, line)
    assert re.fullmatch(r"final ARI: NMF-SSE [-\d.]+, NMF-Poisson [-\d.]+, ETM [-\d.]+, NMF-Poisson \(3\) "
                        r"[-\d.]+; total .*", lines[-1]), lines[-1]


def test_batch_corrected_run_names_its_model(course_dir, tmp_path, capsys):
    code = comp565_A4.main(["--data-dir", str(course_dir), "--figures-dir", str(tmp_path / "figures"), *FAST,
                            "--model", "scetm"])
    out, err = capsys.readouterr()
    assert code == 0 and err == "" and "\r" not in out  # not a terminal: no bars
    assert "Q4-Q8 with the scETM (batch-corrected) on cpu" in out
    assert "\nQ4 scETM (batch-corrected): " in out and "scETM (batch-corrected) " in out.splitlines()[-1]


class _Scorer:
    """Scores at once with a fixed ARI per iteration, as ARIScorer(n_workers=0) does."""

    def __init__(self):
        self.latest, self.latest_tag = float("nan"), None

    def submit(self, tag, embed):
        self.latest, self.latest_tag = 0.5 + tag[1] / 1000, tag

    def collect(self, tags):
        return [0.5 + t[1] / 1000 for t in tags]


def test_progress_shows_the_ari_of_its_own_iteration_never_the_previous_stage(capsys, monkeypatch):
    from cellembed.evaluation.scoring import PerfRecorder

    scorer = _Scorer()
    scorer.submit(("NMF-SSE", 99), None)  # the previous stage's last score
    monkeypatch.setattr(PerfRecorder, "log_every", 0.0)  # a line every iteration (not a terminal)
    perf = PerfRecorder("NMF-Poisson", "loglik", 3, None, scorer, start_iter=100, eval_every=2)
    assert perf.status(-0.5) == "loglik=-0.5, ari pending"  # not NMF-SSE's 0.599
    for i in perf:
        perf.record(i, -0.1 * (i + 1), None)
    out, err = capsys.readouterr()
    assert err == "" and "\r" not in out
    assert out.splitlines() == [  # iteration 100 is not scored (eval_every 2); the last one always is
        "NMF-Poisson: 101/103 iterations, 0 s, loglik=-0.1, ari pending",  # a continued run counts on
        "NMF-Poisson: 102/103 iterations, 0 s, loglik=-0.2, ari=0.601 (iteration 101)",
    ]
    np.testing.assert_allclose(perf.table(), [[101, -0.2, 0.601], [102, -0.3, 0.602]])
