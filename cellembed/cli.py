"""Command-line plumbing of ``comp565_A4.py`` and ``compare.py``: argument types, one-line errors,
the run summary. Standard library only at import time, so ``--help`` and a bad flag answer at
once, before torch or scanpy load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

SETUP = "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt -e ."


def _whole_number(minimum, words):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {words}, got {value}")
        return value
    return parse


positive_int = _whole_number(1, "at least 1")
non_negative_int = _whole_number(0, "0 or more")


def positive_number(text):
    """A finite number above 0 (``--resolution``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def device_name(text):
    """``--device``'s syntax (whether the device exists is checked once torch is loaded)."""
    from cellembed.runtime import check_device_name  # torch is imported only when a device is resolved

    try:
        return check_device_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Notice(UserWarning):
    """A warning the command lines print as one line, ``prog: warning: ...`` (bad data fixed on the
    way in, a score that says little)."""


INTERRUPT_GRACE = 3.0  # seconds the main thread gets to write its line and close files after Ctrl-C
_interrupt_reported = False


def report_interrupt(line):
    """Write the one line of an interrupted run to stderr (the watchdog then stays silent)."""
    global _interrupt_reported
    _interrupt_reported = True
    sys.stderr.write(line if line.endswith("\n") else line + "\n")
    sys.stderr.flush()


def exit_promptly_on_interrupt(prog, grace=INTERRUPT_GRACE):
    """Make Ctrl-C end this process within ``grace`` seconds, whatever the main thread is doing.

    Python raises KeyboardInterrupt only between bytecodes, so a long C call (a BLAS product, a
    numba kernel, a t-SNE) or a join on a worker can hold it up. The C-level handler writes the
    signal to a wakeup pipe at once (`signal.set_wakeup_fd`); a watchdog thread reading it gives
    the main thread ``grace`` seconds to print its line and finish its (atomic) writes, then
    ends the process with exit code 130. A KeyboardInterrupt that Python drops (raised inside a
    weakref callback or ``__del__``) is raised in the main thread again. Call it from the main
    thread of a command-line entry point only (not from a library or a test process).
    """
    import os
    import signal
    import threading

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch():
        while os.read(read_end, 1) != bytes([signal.SIGINT]):
            pass
        time.sleep(grace)
        if not _interrupt_reported:
            sys.stderr.write(f"\n{prog}: interrupted\n")
        sys.stderr.flush()
        os._exit(130)

    threading.Thread(target=watch, name="interrupt-watchdog", daemon=True).start()

    default_hook = sys.unraisablehook

    def unraisable(info):
        # Ctrl-C that lands in a weakref callback or a __del__ (a garbage collection) is "unraisable":
        # Python prints it and drops it, and the main thread would run on until the watchdog ends it
        # without its line. Deliver it to the main thread again, from another thread once the
        # callback has returned (raised here, it would be dropped as this hook's own exception).
        if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
            import _thread

            threading.Timer(0.05, _thread.interrupt_main).start()
            return
        default_hook(info)

    sys.unraisablehook = unraisable


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``prog: error: message (see --help)``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def missing_dependency(exc, prog):
    """The one line for a ModuleNotFoundError at start-up (the virtual environment is not active)."""
    return (f"{prog}: error: the package {exc.name!r} is not installed in this Python "
            f"({sys.executable}); set up the environment first: {SETUP}")


def quiet_known_warnings(prog):
    """Silence library notices that say nothing about a run's results; data notices as one line."""
    for message in (
        "Sparse CSR tensor support is in beta state",  # torch, on every CSR tensor
        "Sparse invariant checks are implicitly disabled",
        "In previous versions of scanpy, calling tsne with n_jobs",
        "Clustering large matrix with scipy",  # seaborn suggests fastcluster
        "pkg_resources is deprecated",  # the louvain package, on import
        "This package has been superseded by the `leidenalg` package",
    ):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=FutureWarning)
    default_format = getattr(warnings.formatwarning, "default_format", warnings.formatwarning)

    def one_line(message, category, *args, **kwargs):
        # imported here, not at the top: this module stays standard-library only
        if issubclass(category, Notice):
            return f"{prog}: warning: {message}\n"
        return default_format(message, category, *args, **kwargs)

    one_line.default_format = default_format  # calling this twice does not stack the hooks
    warnings.formatwarning = one_line


def stderr_is_terminal():
    """Whether the progress bars' stream (stderr) is a terminal: live bars there, else log lines."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def jsonable(obj):
    """``obj`` with numpy scalars as Python numbers and tuples as lists (for json.dumps)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:
        return obj.item()  # numpy scalar
    return obj


class Progress:
    """Which stages finished and how long each took: the body of ``summary.json``.

    Parameters
    ----------
    summary : dict
        The run's settings; ``stages_finished`` and ``wall_seconds`` are added.
    """

    def __init__(self, summary):
        self.summary = dict(summary, stages_finished=[], wall_seconds={})
        self.started = time.perf_counter()

    def stage(self, name, seconds, perf=None, label=None, objective="objective"):
        """Record a finished stage and print one line about it (to stdout, flushed at once).

        Parameters
        ----------
        name : str
            Key in ``summary.json``.
        seconds : float
        perf : ndarray (n, 3), optional
            The stage's perf table (iteration, objective, ARI): its last row is printed.
        label : str, optional
            What the line calls the stage (default ``name``).
        objective : str
            What the line calls the objective (e.g. ``MSE``).
        """
        from tqdm.auto import tqdm

        self.summary["stages_finished"].append(name)
        self.summary["wall_seconds"][name] = round(seconds, 3)
        line = f"{label or name}: {seconds:.1f} s"
        if perf is not None:
            line += (f", {int(perf[-1, 0]) + 1} iterations, {objective} {perf[-1, 1]:.5g}, "
                     f"ARI {perf[-1, 2]:.3f}")
        tqdm.write(line, file=sys.stdout)  # clears and redraws a live bar around the line
        sys.stdout.flush()  # in a log file, the line comes in order with stderr's

    def write(self, path, **extra):
        """Write the summary (with the total wall time and ``extra`` keys) to ``path``, atomically."""
        from cellembed.outputs import atomic_path

        summary = dict(self.summary, **extra)
        summary["wall_seconds"] = dict(summary["wall_seconds"],
                                       total=round(time.perf_counter() - self.started, 3))
        with atomic_path(Path(path)) as tmp:
            tmp.write_text(json.dumps(jsonable(summary), indent=2) + "\n")
        return summary


def parse_assignment_args(argv=None):
    """``comp565_A4.py``'s arguments: the assignment's iteration counts and the run's settings.

    Only the syntax is checked here (standard library only); the device, the precision and
    the core split are resolved once torch is loaded (`comp565_A4.main`).
    """
    import os

    parser = Parser(
        prog="comp565_A4.py",
        description="COMP 565 A4: NMF and the embedded topic model (ETM) on Mouse Pancreas single cells.",
        epilog="On a terminal every training loop shows a live progress bar; when the output is a "
               "file or a pipe, one line per stage (and one every 10 s of a long stage) instead. "
               "To log a run: python comp565_A4.py > run.log 2>&1",
    )
    parser.add_argument("--data-dir", metavar="DIR", default=os.environ.get("COMP565_DATA_DIR", "data"),
                        help="the course's data folder (default: $COMP565_DATA_DIR, else data, "
                             "from the current folder)")
    parser.add_argument("--figures-dir", metavar="DIR", default="figures",
                        help="where figures, tables and results go (default: figures)")
    parser.add_argument("--seed", metavar="N", type=non_negative_int, default=0,
                        help="seeds numpy (NMF initialization), torch (ETM) and Louvain (default: 0)")
    parser.add_argument("--niter-nmf", metavar="N", type=positive_int, default=100,
                        help="NMF iterations, Q1 and Q3 (default: 100)")
    parser.add_argument("--niter-etm", metavar="N", type=positive_int, default=1000,
                        help="ETM steps, Q4 (default: 1000)")
    parser.add_argument("--niter-long", metavar="N", type=positive_int, default=1000,
                        help="NMF-Poisson iterations for the comparison with the ETM, Q5 (default: 1000)")
    parser.add_argument("--eval-every", metavar="N", type=positive_int, default=1,
                        help="score the ARI every N iterations (and at the last); the perf tables "
                             "then hold the scored iterations only, for large data (default: 1)")
    parser.add_argument("--etm-batch-size", metavar="B", type=positive_int, default=None,
                        help="train the ETM on minibatches of B cells, one epoch per iteration "
                             "(default: all cells at once, as the assignment does)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 5 NMF, 20 ETM and 20 long NMF-Poisson iterations")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="torch device for the ETM: auto (CUDA when present), cpu, cuda or cuda:N "
                             "(default: auto)")
    parser.add_argument("--jobs", metavar="N", type=non_negative_int, default=None,
                        help="worker processes scoring the ARI while training goes on; 0 scores in "
                             "the main process (default: one per CPU core)")
    parser.add_argument("--threads", metavar="N", type=positive_int, default=None,
                        help="threads for training: torch, BLAS, OpenMP (default: all cores for the "
                             "ETM; for the NMFs a quarter of them, at least 1, or all with --jobs 0)")
    parser.add_argument("--download", nargs="?", const="geo", default=None, metavar="SOURCE",
                        help="first build the data folder (--data-dir) from GEO GSE84133; SOURCE: "
                             "geo (over the network, when SOURCE is left out), another base URL, or a "
                             "local folder holding the two GSM2230761/GSM2230762 count CSVs")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the ETM encoder's first layer (the one large matrix product) in "
                             "bfloat16 or float32; auto: bf16 where the hardware computes it "
                             "natively (AVX512-BF16/AMX CPUs, bf16 GPUs), else fp32 (default: auto)")
    parser.add_argument("--model", choices=("etm", "scetm"), default="etm",
                        help="the model of Q4-Q8: etm, the course's ETM, or scetm, the batch-corrected "
                             "scETM (etm.BatchETM: a gene bias per mouse, logits mixed in topic "
                             "space; its settings in its SCETMConfig) (default: etm)")
    parser.add_argument("--batch-correct", dest="model", action="store_const", const="scetm",
                        help="the same as --model scetm")
    args = parser.parse_args(argv)
    if args.model == "scetm" and args.etm_batch_size is not None:
        parser.error("argument --etm-batch-size: the batch-corrected model trains on all cells at "
                     "once; drop --etm-batch-size or --model scetm")
    if args.quick:
        args.niter_nmf, args.niter_etm, args.niter_long = 5, 20, 20
    return args
