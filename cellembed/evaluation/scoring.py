"""Scoring embeddings with the assignment's metric while training goes on.

Every iteration of every model is scored by `cellembed.evaluation.clustering.louvain_ari` (kNN + Louvain, about
two thirds of a run's CPU work). `ARIScorer` hands the embeddings to worker processes, one per
core, so training never waits for a score; `NoScorer` scores nothing (training alone); `PerfRecorder`
keeps a loop's perf table.
The metric itself lives in `cellembed.evaluation.clustering`; this module only schedules it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import traceback

import numpy as np

from cellembed.evaluation.clustering import louvain_ari



_STATS = "__stats__"  # a worker's last message: how many embeddings it scored


def _worker(tasks, results, true_labels, seed):
    """Score embeddings from ``tasks`` until a None arrives, then report the count."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # one core per worker: the workers and training share the machine
    scored = 0
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent was killed without closing us
                return
            continue
        if task is None:
            results.put((_STATS, {"scored": scored}, None))
            return
        tag, embed = task
        try:
            results.put((tag, louvain_ari(embed, true_labels, seed=seed), None))
            scored += 1
        except Exception as exc:  # sent back and raised in the parent with its context
            results.put((tag, float("nan"), f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class ARIScorer:
    """Scores embeddings with `louvain_ari`, synchronously or in worker processes.

    ``submit(tag, embed)`` queues one scoring; ``collect(tags)`` waits for them and returns
    their ARIs in order; ``latest`` is the newest finished one (for a progress bar). With
    ``n_workers=0`` every submit scores at once in this process.

    Parameters
    ----------
    true_labels : array-like, shape (N,)
        Reference cell types.
    seed : int
        Louvain's random seed.
    n_workers : int
        Worker processes; 0 scores in the calling process.
    """

    def __init__(self, true_labels, seed=0, n_workers=0):
        self.true_labels = np.asarray(true_labels)
        self.seed = int(seed)
        self.n_workers = int(n_workers)
        self.latest = float("nan")
        self.latest_tag = None  # the tag ``latest`` belongs to
        self._done = {}
        self._pending = set()
        self._procs = []
        self._scored_here = 0  # scorings in this process (n_workers=0)
        self._stats = []
        if self.n_workers > 0:
            # fork (Linux) starts a worker in milliseconds; spawn, elsewhere, re-imports the
            # main script. Create the scorer before training starts any torch thread pool.
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self._tasks = ctx.Queue()
            self._results = ctx.Queue()
            for _ in range(self.n_workers):
                proc = ctx.Process(
                    target=_worker,
                    args=(self._tasks, self._results, self.true_labels, self.seed),
                    daemon=True,
                )
                proc.start()
                self._procs.append(proc)

    def submit(self, tag, embed):
        """Queue the ARI of ``embed`` (N x K) under the hashable ``tag``."""
        embed = np.array(embed, copy=True)  # the caller keeps updating its array in place
        if self.n_workers == 0:
            self._store(tag, louvain_ari(embed, self.true_labels, seed=self.seed), None)
            self._scored_here += 1
            return
        self._pending.add(tag)
        self._tasks.put((tag, embed))
        self.poll()

    def poll(self):
        """Take in whatever the workers have finished, without waiting."""
        while self._pending:
            try:
                self._store(*self._results.get_nowait())
            except queue.Empty:
                return

    def collect(self, tags):
        """Wait for the scorings of ``tags`` and return their ARIs, in order.

        Raises
        ------
        RuntimeError
            A worker failed on one of them, or died.
        """
        tags = list(tags)
        while any(t in self._pending for t in tags):
            try:
                self._store(*self._results.get(timeout=1.0))
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(
                        f"an ARI worker process died (exit code {dead[0].exitcode}); "
                        "rerun with --jobs 0 to score in the main process"
                    ) from None
        return np.array([self._done.pop(t) for t in tags])

    def _store(self, tag, ari, error):
        if tag == _STATS:
            self._stats.append(ari)
            return
        self._pending.discard(tag)
        if error is not None:
            raise RuntimeError(f"scoring {tag} failed in a worker: {error}")
        self._done[tag] = ari
        self.latest, self.latest_tag = ari, tag

    def stats(self):
        """Embeddings scored, summed over workers (after `close`)."""
        if not self.n_workers:
            return {"scored": self._scored_here}
        return {"scored": sum(part["scored"] for part in self._stats)}

    def close(self, wait=True):
        """Stop the workers; with ``wait``, let them report their counts first (5 s at most)."""
        if wait and self._procs:
            for _ in self._procs:
                self._tasks.put(None)
            deadline = time.monotonic() + 5.0
            while len(self._stats) < len(self._procs) and time.monotonic() < deadline:
                try:
                    self._store(*self._results.get(timeout=0.5))
                except queue.Empty:
                    pass
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=5)
        if self._procs:
            # Embeddings still buffered for the stopped workers must not hold up the exit: the
            # queue's feeder thread would block on the full pipe and the interpreter wait on it.
            self._tasks.cancel_join_thread()
        self._procs = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(wait=exc_type is None)  # on an error or Ctrl-C: stop at once


class NoScorer:
    """A scorer that scores nothing: training alone (the registry's adapters, timings, tests).

    ``collect`` returns zeros; the perf tables it yields have no ARI.
    """

    latest = float("nan")
    latest_tag = None

    def submit(self, tag, embed):
        pass

    def collect(self, tags):
        return np.zeros(len(list(tags)))


def available_cores():
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def split_cores(cores=None):
    """Default (scoring workers, NMF threads, ETM threads) for a machine with ``cores`` cores.

    Every core gets a scoring worker (kNN + Louvain of one embedding, single-threaded; idle
    workers block on their queue and cost nothing). An NMF iteration (~20 ms on one core) is
    cheaper than scoring it (~40 ms), so the NMF stages keep a quarter of the cores (at least
    one thread) and leave the rest to the workers. An ETM step costs more than its scoring,
    so the ETM trains on every core and the workers take what is left: on 2 cores this made
    the fp32 ETM stage 1.2x and the bf16 one 1.25x faster than one training thread
    (300 iterations, `python comp565_A4.py --jobs 2 --threads 1|2`).
    """
    cores = available_cores() if cores is None else cores
    return cores, max(1, cores // 4), cores


class PerfRecorder:
    """The ``perf`` table of a training loop: iteration, objective and ARI of the embedding.

    The objective is kept every iteration; the embedding is scored with the assignment's
    clustering every ``eval_every`` iterations and at the last one (by default every one),
    and ``table()`` returns the scored rows. A non-finite objective stops training with an
    error naming the stage and the iteration.

    Progress: on a terminal (stderr a tty) a live tqdm bar showing the objective and the newest
    ARI of this loop with the iteration it belongs to (scores arrive from the workers a few
    iterations late); elsewhere (a log file, a pipe: tqdm's ``disable=None`` convention) no
    carriage-return updates, only a plain line on stdout every ``log_every`` seconds of a long
    loop; the caller prints the stage's final line.

    Parameters
    ----------
    stage : str
        Name in messages and on the progress bar.
    objective : str
        Name of the objective on the progress bar.
    niter : int
        Iterations of this run.
    true_labels : array-like, shape (N,)
        Cell types, for the default scorer.
    scorer : ARIScorer or NoScorer, optional
        Default: scoring at once, in this process (Louvain seed 0).
    start_iter : int
        Number of the first iteration (a continued run).
    eval_every : int
        Score every this many iterations.
    """

    log_every = 10.0  # seconds between two progress lines when the output is not a terminal

    def __init__(self, stage, objective, niter, true_labels, scorer=None, start_iter=0, eval_every=1):
        from tqdm.auto import tqdm

        from cellembed.cli import stderr_is_terminal

        self.stage, self.objective = stage, objective
        self.scorer = scorer if scorer is not None else ARIScorer(true_labels)
        self.start_iter, self.eval_every, self.niter = start_iter, eval_every, niter
        self.rows = []  # (iteration, objective) of the scored iterations
        self.shown = None  # (iteration, ARI): the newest score of this loop
        self.live = stderr_is_terminal()
        self.started = self.last_line = time.monotonic()
        self.bar = tqdm(range(niter), desc=stage, leave=False, dynamic_ncols=True, disable=not self.live,
                        initial=start_iter, total=start_iter + niter)  # a continued run counts on

    def __iter__(self):
        return iter(self.bar)

    def record(self, i, objective, embed):
        """Store iteration ``i``'s objective; score ``embed`` (N x K) if due."""
        iteration = self.start_iter + i
        if not np.isfinite(objective):
            raise FloatingPointError(
                f"{self.stage}: the objective became {objective} at iteration {iteration}; "
                "check the data for extreme values or rerun with another --seed"
            )
        if (iteration + 1) % self.eval_every == 0 or i == self.niter - 1:
            self.rows.append((iteration, objective))
            self.scorer.submit((self.stage, iteration), embed)
        self._show(i, objective)

    def status(self, objective):
        """``objective=..., ari=... (iteration j)``: the newest ARI of this loop, never another's."""
        tag = self.scorer.latest_tag
        ours = isinstance(tag, tuple) and len(tag) == 2 and tag[0] == self.stage
        if ours and (self.shown is None or tag[1] > self.shown[0]):  # workers may finish out of order
            self.shown = (tag[1], self.scorer.latest)
        text = f"{self.objective}={objective:.5g}"
        if self.shown is not None:
            text += f", ari={self.shown[1]:.3f} (iteration {self.shown[0]})"
        elif not isinstance(self.scorer, NoScorer):
            text += ", ari pending"
        return text

    def _show(self, i, objective):
        if self.live:
            self.bar.set_postfix_str(self.status(objective), refresh=False)  # drawn at tqdm's pace
            return
        now = time.monotonic()
        if now - self.last_line >= self.log_every and i < self.niter - 1:
            self.last_line = now
            print(f"{self.stage}: {self.start_iter + i + 1}/{self.start_iter + self.niter} iterations, "
                  f"{now - self.started:.0f} s, {self.status(objective)}", flush=True)

    def table(self):
        """ndarray (scored iterations, 3): iteration, objective, ARI (waits for the scores)."""
        perf = np.zeros((len(self.rows), 3))
        perf[:, :2] = self.rows
        perf[:, 2] = self.scorer.collect([(self.stage, int(it)) for it, _ in self.rows])
        return perf
