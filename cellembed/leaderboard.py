"""Train registered models on one data set over several seeds and rank them on one leaderboard.

    python compare.py --data pbmc3k --models pca,nmf_psn,etm --seeds 0 1 2 --out results
    python compare.py --data my_cells.h5ad --label-key cell_type --layer counts --models pca,vae
    python compare.py --data 10x_pbmc --models vae,vae:likelihood=nb,nmf_psn:niter=1000

(``cellembed-compare`` is the same command once the package is installed.) ``--data`` is a named
data set (found under ``--data-root``) or a file (``.h5ad``, an scDeepCluster ``.h5``, a MuData
``.h5mu``, or the course's data folder); see `cellembed.data`. ``--models`` lists registry names
(`cellembed.models.REGISTRY`), each optionally followed by ``:field=value`` settings of its
config. Every model is trained once per seed (the seed seeds numpy, torch, Louvain and k-means)
through the model API (`cellembed.models.base.Model.fit`) and its embedding scored
(`cellembed.runner.SCORES`; the NeurIPS 2021 joint-embedding metrics for two-modality data).

Without ``--data`` it runs ``pca,nmf_psn,vae`` (seed 0) on the demo set bundled with the package
(`cellembed.datasets`): a first leaderboard in about a minute, with nothing to download.

Outputs in ``<out>/<data set>/``: ``leaderboard.csv`` (one row per model and seed, appended as
each run finishes; rows of an earlier run into the same folder are kept, a model and seed run
again replaced), ``leaderboard.md`` (mean +- sd, best first), ``leaderboard.png``,
``embeddings.h5ad`` (every model's first-seed embedding in ``obsm``, the clusters in ``obs``),
``tsne.png`` (a panel per model), with ``--save-models`` a folder per model of the first seed
(``models/<model>``, `Model.load`), and with ``--classify`` the classifier study's
``classification.csv|md`` and ``confusion.png``. Data without labels get embeddings, clusters
and a t-SNE coloured by each model's clusters, and no scores.

The runs are independent jobs: ``--workers N`` runs them N at a time on a Dask ``LocalCluster``,
``--scheduler ADDRESS`` on any running Dask cluster (`cellembed.runner.run_on_dask`); the rows
are written as runs finish, in the serial loop's order, with the same numbers as a serial run
whose ``--threads`` is each run's thread count (torch's CPU sums depend on it).

Standard library only at import: ``--help`` and a bad flag answer before torch and scanpy load;
Dask is imported only with ``--workers`` or ``--scheduler``.
"""

from __future__ import annotations

import contextlib
import os
import sys

from cellembed import cli

PROG = "compare.py"


DEFAULT_MODELS = "pca,nmf_psn,vae"  # the first run's leaderboard: a baseline, the assignment's NMF, a deep model
LEADERBOARD, EMBEDDINGS = "leaderboard.csv", "embeddings.h5ad"


def parse_args(argv=None):
    from cellembed.evaluation import N_NEIGHBORS, RESOLUTION
    from cellembed.models import REGISTRY
    from cellembed.runner import SCORES, parse_models

    parser = cli.Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                        epilog=f"models: {', '.join(REGISTRY)}. Without --data: {DEFAULT_MODELS}, seed 0, "
                               "on the bundled PBMC 3k demo set.")
    parser.add_argument("--data", default=None,
                        help="a named data set (mouse_pancreas, baron_mouse, pbmc3k, 10x_pbmc, mouse_bladder, "
                             "neurips_cite, neurips_multiome), a .h5ad / .h5 / .h5mu file, a 10x mtx folder or the "
                             "course folder (default: the bundled demo set)")
    parser.add_argument("--data-root", default=None,
                        help="folder holding the named data sets (default: $A4_DATA_ROOT, else data)")
    parser.add_argument("--label-key", default=None, help="obs column of the cell types in a .h5ad file "
                        "(default: the first of cell_type, celltype, Celltype, assigned_cluster, labels, label; "
                        "none: no scores)")
    parser.add_argument("--mod2-normalized", action="store_true", default=None,
                        help="the second modality (e.g. CITE-seq proteins) is already normalized (CLR): skip its "
                             "normalization; the RNA counts stay raw (default: detected from negative or "
                             "non-integer values)")
    parser.add_argument("--labels", default=None, metavar="CSV",
                        help="cell id, label per line: the labels of a file without them (e.g. 10x)")
    parser.add_argument("--batch-key", default=None, help="obs column of the batch in a .h5ad file "
                        "(default: batch, when present)")
    parser.add_argument("--layer", default=None, help="layer of a .h5ad file holding the raw counts; raw reads "
                        "adata.raw (default: X)")
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"registered models ({', '.join(REGISTRY)}), comma-separated, each optionally with "
                             f":field=value settings of its config, e.g. pca,vae,vae:likelihood=nb "
                             f"(default: {DEFAULT_MODELS})")
    parser.add_argument("--seeds", type=cli.non_negative_int, nargs="+", default=None,
                        help="one training run per model and seed (default: 0 1 2; 0 on the demo set)")
    parser.add_argument("--out", default="results", help="output folder; files go to OUT/<data set> (default: results)")
    parser.add_argument("--rank-by", choices=SCORES, default=None,
                        help="the score that orders the leaderboard (default: ari_ of --cluster)")
    parser.add_argument("--cluster", choices=("louvain", "leiden"), default="louvain",
                        help="the graph clustering scored as ari_<cluster> (default: louvain, the assignment's)")
    parser.add_argument("--resolution", type=cli.positive_number, default=RESOLUTION,
                        help=f"its resolution (default: {RESOLUTION}, the assignment's)")
    parser.add_argument("--n-neighbors", type=cli.positive_int, default=N_NEIGHBORS,
                        help=f"neighbours of its kNN graph (default: {N_NEIGHBORS}, the assignment's)")
    parser.add_argument("--n-clusters", type=cli.positive_int, default=None,
                        help="clusters of the models that cluster (gmvae, scgpcl) (default: the number of labelled "
                             "classes; needed without labels)")
    parser.add_argument("--resume", action="store_true",
                        help="skip the (model, seed) runs already in OUT/<data set>/leaderboard.csv")
    parser.add_argument("--device", type=cli.device_name, default="auto",
                        help="torch device of the models: auto (CUDA when present), cpu, cuda or cuda:N "
                             "(default: auto)")
    parser.add_argument("--save-models", action="store_true",
                        help="keep every model of the first seed in OUT/<data set>/models/<model> "
                             "(load with cellembed.load_model)")
    parser.add_argument("--classify", action="store_true",
                        help="also run the cell-type classifier study on raw counts, PCA and every latent space")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: every model with its few-iteration settings (Model.quick), a t-SNE of "
                             "300 cells; the leaderboard says so")
    parser.add_argument("--no-tsne", action="store_true", help="skip tsne.png")
    parser.add_argument("--backed", action="store_true",
                        help="leave the counts of an .h5ad on disk (anndata's backed mode) and stream them in row "
                             "chunks: data larger than memory, for the models that stream (pca, ae, vae, vsc, "
                             "gmvae)")
    parser.add_argument("--threads", type=cli.positive_int, default=None,
                        help="threads for training and scoring (default: all cores); with --workers N, split "
                             "among the workers (--threads // N each, default 1); with --scheduler, each run's "
                             "(default 1)")
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument("--workers", type=cli.positive_int, default=None, metavar="N",
                         help="run the (model, seed) runs N at a time on a local Dask cluster of N processes "
                              "(default: one after another in this process)")
    cluster.add_argument("--scheduler", default=None, metavar="ADDRESS",
                         help="run them on the running Dask scheduler at ADDRESS, e.g. tcp://node01:8786 (a "
                              "dask-jobqueue SLURMCluster's scheduler_address)")
    args = parser.parse_args(argv)
    args.demo = args.data is None
    args.seeds = args.seeds if args.seeds is not None else [0] if args.demo else [0, 1, 2]
    args.models = args.models or [DEFAULT_MODELS]
    args.rank_by = args.rank_by or f"ari_{args.cluster}"
    if len(set(args.seeds)) < len(args.seeds):
        parser.error("argument --seeds: a seed is listed twice")
    if args.workers and args.threads and args.threads < args.workers:
        parser.error(f"argument --threads: {args.threads} for {args.workers} workers; give each at least one "
                     f"(--threads {args.workers} or more), or leave --threads out")
    try:
        args.specs = parse_models(args.models, quick=args.quick)
    except ValueError as exc:
        parser.error(str(exc))
    if args.backed:
        from cellembed.models import REGISTRY, get_model

        memory = [label for label, name, _ in args.specs if not get_model(name).streams_backed]
        if memory:
            streaming = ", ".join(name for name in REGISTRY if get_model(name).streams_backed)
            parser.error(f"argument --backed: {memory[0]} needs the counts in memory; the models that stream are "
                         f"{streaming} (or leave --backed out)")
        if args.workers or args.scheduler:
            parser.error("argument --backed: not with --workers / --scheduler (each worker would open the file); "
                         "run the seeds one after another, or leave --backed out")
        if args.classify:
            parser.error("argument --backed: --classify trains on the counts in memory; leave one of them out")
    return args


def main(argv=None, args=None):
    """Run the comparison; returns the exit code (0, 1 a failed run, 2 bad input, 130 interrupted)."""
    try:
        args = args if args is not None else parse_args(argv)
        return _run(args)
    except KeyboardInterrupt:  # during the imports or the data's loading: nothing was written
        cli.report_interrupt(f"\n{PROG}: interrupted; nothing written")
        return 130


def command():
    """The ``cellembed-compare`` console script (and ``python compare.py``): Ctrl-C ends it within seconds."""
    cli.exit_promptly_on_interrupt(PROG)
    return main()


def _run(args):
    from cellembed.runner import ClusterError, dask_client

    try:  # the cluster first: a scheduler that does not answer is one line before the data are read
        with dask_client(args.workers, args.scheduler) if args.workers or args.scheduler else \
                contextlib.nullcontext() as client:
            return _compare(args, client)  # catches its own errors, ClusterError of a run included
    except ModuleNotFoundError as exc:  # the virtual environment is not active (distributed missing)
        sys.stderr.write(cli.missing_dependency(exc, PROG) + "\n")
        return 2
    except ClusterError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2


def _compare(args, client):
    try:
        import torch
        from threadpoolctl import threadpool_limits
        from tqdm.auto import tqdm

        from cellembed.data import LABEL_KEY, DataError, load_dataset
        from cellembed.evaluation.scoring import available_cores
        from cellembed.models import get_model
        from cellembed.outputs import prepare_dir
        from cellembed.runner import SHOWN, ClusterError, Scoring, obsm_key, run_on_dask, run_one
    except ModuleNotFoundError as exc:  # the virtual environment is not active
        sys.stderr.write(cli.missing_dependency(exc, PROG) + "\n")
        return 2
    cli.quiet_known_warnings(PROG)
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    threadpool_limits(threads)
    try:
        from cellembed.runtime import resolve_device

        resolve_device(args.device)  # a missing GPU is one line now, not after the data are read
        if args.demo:
            from cellembed.datasets import demo_path

            data = demo_path()
        else:
            data = args.data
        adata = load_dataset(data, data_root=args.data_root, label_key=args.label_key, batch_key=args.batch_key,
                             layer=args.layer, labels=args.labels, mod2_normalized=args.mod2_normalized,
                             backed=args.backed)
        labelled = LABEL_KEY in adata.obs
        need_labels = [label for label, name, _ in args.specs if get_model(name).supervised]
        if not labelled and need_labels:
            raise DataError(f"{data}: {need_labels[0]} is supervised and the data have no labels; pass --label-key "
                            "or --labels, or leave it out of --models")
        if not labelled and args.n_clusters is None and any(get_model(n).clusters for _, n, _ in args.specs):
            raise DataError(f"{data}: no labels to take the number of clusters from; pass --n-clusters K")
        if not labelled and args.classify:
            raise DataError(f"{data}: --classify needs labels; pass --label-key or --labels")
        if args.n_clusters is not None and args.n_clusters > adata.n_obs:
            raise DataError(f"--n-clusters {args.n_clusters}: more than the {adata.n_obs} cells")
    except (ValueError, DataError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    name = adata.uns["dataset"]["name"]
    scoring = Scoring(args.cluster, args.n_neighbors, args.resolution)
    classes = f"{adata.obs[LABEL_KEY].nunique()} classes" if labelled else "no labels"
    title = (f"{name}: {adata.n_obs} cells x {adata.n_vars} genes, {classes}"
             + (f", {scoring.describe()}" if labelled else "") + (" (smoke run: --quick)" if args.quick else ""))
    tqdm.write(title)
    try:
        out_dir = prepare_dir(os.path.join(args.out, name), what="--out")
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    plan = [(label, seed) for label, _, _ in args.specs for seed in args.seeds]  # the serial loop's order
    board = Board(out_dir, adata, title, args.rank_by, order=plan)
    first = args.seeds[0]
    settings = dict(quick=args.quick, device=args.device, n_clusters=args.n_clusters, scoring=scoring)
    latents, done = {}, 0
    try:
        jobs = _jobs(args, board, tqdm.write)
        if client is None:
            finished = ((label, seed, *run_one(label, model_name, options, adata, seed, **settings))
                        for label, model_name, options, seed in jobs)
        else:
            jobs = list(jobs)
            each = max(1, (args.threads or 1) // (args.workers or 1))  # --threads split among local workers
            tqdm.write(f"{len(jobs)} runs on {_describe(client, args)}, {each} thread(s) each")
            finished = run_on_dask(client, jobs, adata, threads=each, save_seed=first if args.save_models else None,
                                   **settings)
        for label, seed, row, latent, model in finished:  # in the order they finish
            latents.setdefault(label, {})[seed] = latent
            clusters = row.pop("clusters", None)
            if seed == first:
                if not labelled:  # the t-SNE's colours: the model's own clusters, else its graph's
                    from cellembed.evaluation.metrics import graph_labels

                    clusters = clusters if clusters is not None else graph_labels(
                        latent, seed, scoring.cluster, scoring.n_neighbors, scoring.resolution)
                board.add_embedding(obsm_key(label), latent, clusters)
                if args.save_models:
                    model.save(out_dir / "models" / obsm_key(label)[2:], overwrite=True)
            board.add_row(row)
            done += 1
            shown = " ".join(f"{k} {row[k]:.3f}" for k in SHOWN if k in row)
            tqdm.write(f"{label} seed {seed}: {shown} ({row['seconds']:.1f} s)".replace(":  (", ": ("))
        board.finish(tsne=not args.no_tsne, seed=first, max_cells=300 if args.quick else None)
        if args.classify and latents:
            from cellembed.evaluation.classify import classification_study

            latents = {label: latents[label] for label, _, _ in args.specs if label in latents}  # --models' order
            classification_study(adata, latents, args.seeds, out_dir)
    except KeyboardInterrupt:
        cli.report_interrupt(f"\n{PROG}: interrupted after {done} finished run(s); their rows are in "
                             f"{out_dir / LEADERBOARD}")
        return 130
    except (FloatingPointError, RuntimeError, ValueError, OSError, DataError, ClusterError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    print(board.text)
    print(f"outputs in {out_dir}/")
    return 0


def _jobs(args, board, write):
    """The (label, registry name, options, seed) runs in the serial loop's order (model, then seed),
    with ``--resume`` those in the leaderboard already skipped (and said so, as the loop reaches them)."""
    for label, model_name, options in args.specs:
        for seed in args.seeds:
            if args.resume and board.has(label, seed):
                write(f"{label} seed {seed}: in {LEADERBOARD} already (--resume)")
                continue
            yield label, model_name, options, seed


def _describe(client, args):
    if args.workers:
        return f"a local Dask cluster of {args.workers} worker processes"
    return f"the Dask scheduler at {args.scheduler} ({len(client.scheduler_info()['workers'])} workers now)"


class Board:
    """The output folder of one data set: rows and embeddings merged with an earlier run's, each
    file rewritten whole (atomically) after every finished run.

    Parameters
    ----------
    out_dir : Path
    adata : anndata.AnnData
        The data set (labels, batch, cell names).
    title : str
    rank_by : str
    order : list of (str, int)
        This call's (model, seed) runs in the serial loop's order: the rows of those that finished
        follow an earlier run's rows in it, whatever order they finish in.
    """

    def __init__(self, out_dir, adata, title, rank_by, order):
        import anndata
        import pandas as pd

        from cellembed.data import BATCH_KEY, LABEL_KEY

        self.out_dir, self.adata, self.title, self.rank_by = out_dir, adata, title, rank_by
        self.order = {key: i for i, key in enumerate(order)}
        self.finished = {}  # (model, seed) -> place in `order`, of this call's finished runs
        self.text = ""
        obs = adata.obs[[c for c in (LABEL_KEY, BATCH_KEY) if c in adata.obs]].copy()
        self.frame = pd.DataFrame()
        self.joint = pd.DataFrame()
        self.embeddings = anndata.AnnData(obs=obs)
        earlier = out_dir / EMBEDDINGS
        if earlier.is_file() and (out_dir / LEADERBOARD).is_file():
            old = anndata.read_h5ad(earlier)
            if old.obs_names.equals(adata.obs_names):  # the same cells: keep the earlier models
                self.embeddings.obsm.update(old.obsm)
                for column in old.obs.columns.difference(obs.columns):
                    self.embeddings.obs[column] = old.obs[column].to_numpy()
                self.frame = pd.read_csv(out_dir / LEADERBOARD)
                if (out_dir / "joint_metrics.csv").is_file():
                    self.joint = pd.read_csv(out_dir / "joint_metrics.csv")
            else:
                import warnings

                from cellembed.data import DataWarning

                warnings.warn(f"{out_dir}: its earlier leaderboard holds other cells; starting a new one",
                              DataWarning, stacklevel=2)
        if LABEL_KEY in obs:
            from cellembed.reports import set_palette

            set_palette(self.embeddings)

    def has(self, model, seed):
        return bool(len(self.frame)) and ((self.frame["model"] == model) & (self.frame["seed"] == seed)).any()

    def add_embedding(self, key, latent, clusters=None):
        """Model ``key``'s first-seed embedding (N, d) and clusters (N,) into ``embeddings.h5ad``."""
        from cellembed.outputs import write_h5ad

        self.embeddings.obsm[key] = latent
        column = f"{key[2:]}_clusters"
        if clusters is not None:
            self.embeddings.obs[column] = pd_categorical(clusters)
        elif column in self.embeddings.obs:
            del self.embeddings.obs[column]
        self.embeddings.uns["leaderboard"] = {"data": self.adata.uns["dataset"]["name"],
                                              "models": sorted(self.embeddings.obsm)}
        write_h5ad(self.embeddings, self.out_dir / EMBEDDINGS)

    def add_row(self, row):
        """One finished run into ``leaderboard.csv`` (replacing the same model and seed) and its summaries."""
        import pandas as pd

        joint = row.pop("joint", None)
        key = (row["model"], row["seed"])
        self.finished[key] = self.order[key]
        self.frame = _merged(self.frame, pd.DataFrame([row]), self.finished)
        if joint is not None:
            self.joint = _merged(self.joint, pd.DataFrame([dict(model=row["model"], seed=row["seed"], **joint)]),
                                 self.finished)
        self.write_tables()

    def write_tables(self):
        from cellembed import reports
        from cellembed.runner import SHOWN
        from cellembed.data import BATCH_KEY, LABEL_KEY
        from cellembed.evaluation import metrics
        from cellembed.outputs import atomic_path, write_csv

        write_csv(self.frame, self.out_dir / LEADERBOARD)
        summary = reports.summarize(self.frame, self.rank_by)
        text = reports.markdown(summary, self.title)
        obs = self.adata.obs
        if BATCH_KEY in obs and LABEL_KEY in obs:
            ideal = metrics.ideal_knn_mixing(obs[LABEL_KEY].to_numpy(), obs[BATCH_KEY].to_numpy())
            text += f"\nknn_mixing if the batches were mixed perfectly within every cell type: {ideal:.3f}\n"
        with atomic_path(self.out_dir / "leaderboard.md") as tmp:
            tmp.write_text(text)
        self.text = text
        if any(score in summary for score in SHOWN):
            reports.plot_leaderboard(summary, self.title, self.out_dir / "leaderboard.png")
        else:  # no labels, no scores: no bar chart (nor one of an earlier run)
            (self.out_dir / "leaderboard.png").unlink(missing_ok=True)
        if len(self.joint):
            reports.write_joint_tables(self.joint, self.adata, self.out_dir, self.title)

    def finish(self, tsne=True, seed=0, max_cells=None):
        """The t-SNE of every model in ``embeddings.h5ad`` (or no stale one); the tables as they stand."""
        from cellembed import reports
        from cellembed.data import LABEL_KEY
        from cellembed.runner import obsm_key

        if len(self.frame):
            self.write_tables()
        path = self.out_dir / "tsne.png"
        if not tsne or not len(self.embeddings.obsm):
            path.unlink(missing_ok=True)  # a figure of an earlier run would not match this leaderboard
            return
        # the models in the leaderboard's order, each titled as in --models
        titles = {obsm_key(label): label for label in dict.fromkeys(self.frame.get("model", []))}
        labelled = LABEL_KEY in self.embeddings.obs
        panels = {}
        for key in [*titles, *sorted(set(self.embeddings.obsm) - set(titles))]:
            column = LABEL_KEY if labelled else f"{key[2:]}_clusters"
            if key in self.embeddings.obsm and column in self.embeddings.obs:
                panels[titles.get(key, key[2:])] = (key, column)
        reports.plot_tsne(self.embeddings, panels, path, seed=seed,
                          max_cells=max_cells or reports.TSNE_MAX_CELLS)


def pd_categorical(values):
    import pandas as pd

    return pd.Categorical(pd.Series(values).astype(str))


def _merged(frame, rows, places):
    """``frame`` with ``rows`` appended, earlier rows of the same model and seed dropped, and the rows
    of the (model, seed) keys in ``places`` (dict: key -> int) after the others, in that order."""
    import numpy as np
    import pandas as pd

    merged = rows.reset_index(drop=True)
    if len(frame):
        same = frame.set_index(["model", "seed"]).index.isin(rows.set_index(["model", "seed"]).index)
        merged = pd.concat([frame[~same], rows], ignore_index=True)
    place = [places.get(key, -1) for key in zip(merged["model"], merged["seed"])]
    return merged.iloc[np.argsort(place, kind="stable")].reset_index(drop=True)
