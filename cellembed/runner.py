"""The leaderboard's runs: a ``--models`` entry parsed into a model, and one (model, seed) run scored,
in this process or as jobs on a Dask cluster.

    specs = parse_models(["pca,vae:likelihood=nb"])        # [(label, name, options), ...]
    row, latent, model = run_one(*specs[0], adata, seed=0)  # scores of one fit
    with dask_client(workers=2) as client:                  # the same runs, two at a time
        for label, seed, row, latent, model in run_on_dask(client, jobs, adata):
            ...

Scores (`SCORES`): ``ari_louvain`` / ``nmi_louvain`` (the assignment's metric), ``ari_kmeans``
/ ``nmi_kmeans`` (k-means, k = the number of labelled classes), ``ari_own`` / ``nmi_own`` (the
model's own clusters), and with a batch ``knn_mixing`` / ``asw_batch``.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import re
import threading
import time
import warnings
from dataclasses import dataclass

from cellembed.cli import Notice
from cellembed.evaluation import N_NEIGHBORS, RESOLUTION

SCORES = ("ari_louvain", "nmi_louvain", "ari_leiden", "nmi_leiden", "ari_kmeans", "nmi_kmeans", "ari_own", "nmi_own",
          "knn_mixing", "asw_batch")
SHOWN = ("ari_louvain", "ari_leiden", "ari_kmeans", "nmi_kmeans", "ari_own")  # a run's printed line and figure


def parse_models(entries, quick=False):
    """``--models`` entries as (label, registry name, options) triples, every setting checked.

    Parameters
    ----------
    entries : list of str
        Items separated by commas or given as separate words; each ``name`` or
        ``name:field=value[:field=value...]`` (values as Python literals, else strings).
    quick : bool
        Check the settings over the models' smoke-run settings (``--quick``).

    Returns
    -------
    list of (str, str, dict)

    Raises
    ------
    ValueError
        An unknown name, a malformed setting, a setting the model lacks or a value of the wrong
        type (the message names it and the fix); raised before any data is read.
    """
    from cellembed.models import REGISTRY

    specs = []
    for item in (part for entry in entries for part in entry.split(",") if part):
        name, *settings = item.split(":")
        if name not in REGISTRY:
            raise ValueError(f"argument --models: unknown model {name!r}; choose from {', '.join(REGISTRY)}")
        options = {}
        for setting in settings:
            key, sep, text = setting.partition("=")
            if not sep or not key.isidentifier():
                raise ValueError(f"argument --models: {item!r}: settings are field=value, got {setting!r}")
            try:
                options[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                options[key] = text  # a word such as likelihood=nb
        build(name, options, quick)  # a bad setting is one line now, before the data are read
        specs.append((item, name, options))
    if not specs:
        raise ValueError("argument --models: no model given")
    labels = [label for label, _, _ in specs]
    if len(set(labels)) < len(labels):
        raise ValueError("argument --models: a model is listed twice")
    return specs


def build(name, options, quick=False, device="auto"):
    """A registered model with ``options`` set (over its ``quick`` settings with ``quick``).

    Raises
    ------
    ValueError
        A setting its config lacks or a value of the wrong type, as ``argument --models: ...``.
    """
    from cellembed.models import get_model

    cls = get_model(name)
    options = {**cls.quick, **options} if quick else options
    extra = {"device": device} if cls.uses_torch else {}
    try:
        return cls(**options, **extra)
    except ValueError as exc:
        raise ValueError(f"argument --models: {name}: {exc}") from None


def obsm_key(label):
    """``X_<label>``, the settings' punctuation as underscores (``vae:likelihood=nb`` -> ``X_vae_likelihood_nb``)."""
    return "X_" + re.sub(r"[^0-9A-Za-z]+", "_", label).strip("_")


@dataclass(frozen=True)
class Scoring:
    """How the leaderboard scores an embedding: the graph clustering (the assignment's by default)."""

    cluster: str = "louvain"
    n_neighbors: int = N_NEIGHBORS
    resolution: float = RESOLUTION

    def describe(self):
        return f"{self.cluster.capitalize()} (resolution {self.resolution:g}, {self.n_neighbors} neighbours)"


def run_one(label, name, options, adata, seed, quick=False, device="auto", n_clusters=None, scoring=Scoring()):
    """Train one model for one seed on ``adata`` (a `load_dataset` AnnData) and score it.

    Parameters
    ----------
    label, name, options :
        One entry of `parse_models`.
    adata : anndata.AnnData
        Scored against ``obs['Celltype']`` when present; without labels nothing is scored.
    seed : int
    quick : bool
        The model's smoke-run settings.
    device : str
    n_clusters : int, optional
        K of models that cluster (default: the number of labelled classes).
    scoring : Scoring

    Returns
    -------
    row : dict
        ``model``, ``seed``, ``supervised``, the scores (with labels), ``seconds`` (training and
        embedding), and ``joint`` (a dict) for two-modality data.
    latent : ndarray, shape (N, d)
    model : cellembed.models.base.Model
        The fitted model.
    """
    import numpy as np

    from cellembed.data import BATCH_KEY, LABEL_KEY, MOD2_KEY
    from cellembed.evaluation import metrics

    model = build(name, options, quick, device)
    labelled = LABEL_KEY in adata.obs
    keys = {"labels_key": LABEL_KEY if labelled else None,
            "batch_key": BATCH_KEY if BATCH_KEY in adata.obs else None}
    t0 = time.perf_counter()
    model.fit(adata, **keys, n_clusters=n_clusters if model.clusters else None, seed=seed)
    latent = np.asarray(model.get_latent(adata), dtype=np.float64)
    predicted = model.predict(adata) if model.clusters else None
    seconds = time.perf_counter() - t0
    row = {"model": label, "seed": seed, "supervised": bool(model.supervised)}
    if labelled:
        labels = adata.obs[LABEL_KEY].to_numpy()
        row.update(metrics.clustering_scores(latent, labels, seed, scoring.cluster, scoring.n_neighbors,
                                             scoring.resolution))
        if row[f"n_{scoring.cluster}"] == 1:
            warnings.warn(f"{label} seed {seed}: {scoring.describe()} found one cluster, so its ARI is 0; "
                          "rank by ari_kmeans, or pass a higher --resolution", ScoringWarning, stacklevel=2)
        if predicted is not None:
            row.update(metrics.own_scores(predicted, labels))
        if BATCH_KEY in adata.obs:
            row.update(metrics.batch_scores(latent, adata.obs[BATCH_KEY].to_numpy(), labels, seed))
        if MOD2_KEY in adata.obsm:
            from cellembed.evaluation.joint_metrics import joint_scores

            row["joint"] = joint_scores(latent, adata, seed=seed)
    row["seconds"] = seconds
    if predicted is not None:
        row["clusters"] = np.asarray(predicted)  # the model's own, for embeddings.h5ad (not a table column)
    return row, latent, model


class ScoringWarning(Notice):
    """A score that says little (e.g. a graph clustering with one cluster)."""


CONNECT_TIMEOUT = 5  # seconds a --scheduler address has to answer; a running scheduler answers in milliseconds
_ONE_JOB_AT_A_TIME = threading.Lock()  # a run sets process-wide state (torch's RNG and threads, warnings filters)


class ClusterError(Exception):
    """No Dask cluster to run on (a scheduler that does not answer), or a worker that died during a run."""


@contextlib.contextmanager
def dask_client(workers=None, scheduler=None):
    """A ``distributed.Client`` for a ``with`` block; leaving it closes the client and a cluster it started.

    Parameters
    ----------
    workers : int, optional
        Start a ``LocalCluster`` of this many worker processes, one thread each.
    scheduler : str, optional
        Instead, the address of a running Dask scheduler (``tcp://host:8786``), e.g. the
        ``scheduler_address`` of dask-jobqueue's ``SLURMCluster``.

    Raises
    ------
    ClusterError
        No scheduler answered at ``scheduler`` within `CONNECT_TIMEOUT` seconds.
    """
    from distributed import Client

    if scheduler is None:  # Client(**kwargs) starts LocalCluster(**kwargs) and shuts it down on close
        client = Client(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client.run(_ignore_interrupt)  # Ctrl-C reaches the workers too; compare.py reports it and stops them
    else:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, ValueError, TypeError) as exc:  # refused, timed out (OSError), not an address
            raise ClusterError(f"--scheduler {scheduler}: no Dask scheduler there ({exc}); pass the address a "
                               "running scheduler prints, e.g. tcp://node01:8786 (a SLURMCluster's scheduler_address)"
                               ) from None
    try:
        yield client
    finally:  # the results are in (or abandoned): the log of the shutdown (jobs cancelled, slow exits) says nothing
        log = logging.getLogger("distributed")
        level = log.level
        log.setLevel(logging.CRITICAL)
        try:
            if scheduler is None:  # our own workers log in their own processes: quiet their shutdown too
                _quiet_workers(client)
            client.close()
        finally:
            log.setLevel(level)


def _quiet_workers(client):
    """Raise the ``distributed`` log level to CRITICAL in every worker process of ``client``.

    A worker whose heartbeat meets the scheduler already closed logs an ERROR with a traceback
    (``Failed to communicate with scheduler during heartbeat``); at the shutdown of a cluster we
    started, that says nothing. Workers already gone are skipped, and a cluster that no longer
    answers leaves nothing to quiet: the closing goes on either way.
    """
    try:
        client.run(_mute_distributed, on_error="ignore")
    except Exception:  # noqa: BLE001 - only log levels were at stake; close() reports a real failure
        pass


def _mute_distributed():
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


def _ignore_interrupt():
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_on_dask(client, jobs, adata, threads=1, save_seed=None, **settings):
    """Run (model, seed) jobs on a Dask cluster and yield each one's `run_one` results as it finishes.

    Parameters
    ----------
    client : distributed.Client
    jobs : list of (str, str, dict, int)
        (label, registry name, options, seed), submitted in this order (the scheduler starts
        them in it, as far as workers are free).
    adata : anndata.AnnData
        Sent once to every worker (`Client.scatter`): the workers need no access to the file or
        the data root, and every run trains on the very cells the client loaded and checked.
    threads : int
        Torch, BLAS and OpenMP threads of each run.
    save_seed : int, optional
        The seed whose fitted models come back (``--save-models``); the others stay in the worker.
    **settings
        ``quick``, ``device``, ``n_clusters`` and ``scoring`` of `run_one`.

    Yields
    ------
    label : str
    seed : int
    row, latent, model :
        As `run_one` returns them; ``model`` is None but for ``save_seed``. The warnings the run
        raised in the worker are raised again here first, so that they print as in a serial run.

    Raises
    ------
    ClusterError
        A worker died during a run (the scheduler tried it on three workers).
    Exception
        What `run_one` raised in the worker, as it is.
    """
    from distributed import KilledWorker, as_completed

    shared = client.scatter(adata, broadcast=True, hash=False)
    futures = {client.submit(_dask_job, label, name, options, shared, seed, threads, seed == save_seed, settings,
                             pure=False): (label, seed)
               for label, name, options, seed in jobs}
    for future in as_completed(futures):
        label, seed = futures.pop(future)
        try:
            row, latent, model, caught = future.result()
        except KilledWorker:
            raise ClusterError(f"{label} seed {seed}: the Dask worker running it died (out of memory? its log says "
                               "why); give the workers more memory, or run fewer at a time") from None
        for message, category in caught:
            warnings.warn(message, category, stacklevel=2)
        yield label, seed, row, latent, model


def _dask_job(label, name, options, adata, seed, threads, keep_model, settings):
    """`run_one` in a Dask worker process: one at a time in it (even with several worker threads),
    with ``threads`` threads, its warnings recorded for the client."""
    import torch
    from threadpoolctl import threadpool_limits

    with _ONE_JOB_AT_A_TIME:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with threadpool_limits(threads), warnings.catch_warnings(record=True) as caught:
                row, latent, model = run_one(label, name, options, adata, seed, **settings)
        finally:
            torch.set_num_threads(before)
    return row, latent, model if keep_model else None, [(str(w.message), w.category) for w in caught]
