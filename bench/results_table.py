"""Results table: every model of the assignment, and the batch-corrected scETM, over several seeds.

For each seed and model it trains from scratch (with the assignment's own functions), scores the
final embedding with the assignment's metric (`a4.clustering.louvain_ari`: 30 neighbours,
Louvain resolution 0.15, the seed as Louvain's seed, exactly `comp565_A4.evaluate_ari`), and
prints mean +- sd over seeds of

- ARI and NMI of the Louvain clusters against the annotated cell types;
- kNN mixing: the fraction of each cell's 30 nearest neighbours that come from the other mouse,
  averaged over cells (higher is better mixed; the last row gives the value if the two mice
  were mixed perfectly within every cell type, the most a correction that keeps the biology
  can reach, since the mice hold the cell types in different proportions);
- ASW batch: scib's batch silhouette, ``mean over cell types of mean(1 - |s_batch|)`` over
  that type's cells (1: mice indistinguishable inside every cell type).

Models: ``pca`` (16 principal components of log-normalized counts), ``nmf_sse`` (100
iterations), ``nmf_psn`` (100), ``nmf_psn_1000`` (1000), ``etm`` (the plain assignment ETM,
K = 16, 1000 steps, built exactly as `comp565_A4.run` builds it) and ``scetm`` (the
batch-corrected `models.BatchETM` with its default options, 1000 steps, trained by the same
`comp565_A4.train_scETM`).

    python bench/results_table.py --seeds 0 1 2 3 4 --jobs 2 --out results.md

Only each run's final iteration is scored (``eval_every`` = the iteration count, the assignment's
scorer with the seed as Louvain's seed): the table reports final ARIs. The ``--scetm-*`` options
set the batch-corrected model's options, so one command compares a configuration over seeds:

    python bench/results_table.py --models scetm --scetm-lr 1e-2 --scetm-anneal 1000 --jobs 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # no bars from the workers (tqdm reads this when imported; tests import us)
    os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import comp565_A4  # noqa: E402
from a4.clustering import N_NEIGHBORS, ARIScorer, knn, louvain_ari, louvain_labels  # noqa: E402
from models import batch_codes, make_scetm  # noqa: E402
from models.scetm import DEFAULT_ANNEAL, DEFAULT_KL_WARMUP, DEFAULT_LR, DEFAULT_NUM_TOPICS  # noqa: E402

MODELS = ("pca", "nmf_sse", "nmf_psn", "nmf_psn_1000", "etm", "scetm")
LABELS = {
    "pca": "PCA, 16 PCs of log-normalized counts",
    "nmf_sse": "NMF-SSE",
    "nmf_psn": "NMF-Poisson",
    "nmf_psn_1000": "NMF-Poisson, long run",
    "etm": "ETM (assignment)",
    "scetm": "batch-corrected scETM",
}
N_PCS = 16


def knn_mixing(embed, batch, n_neighbors=N_NEIGHBORS):
    """Mean over cells of the fraction of their nearest neighbours from another batch.

    Parameters
    ----------
    embed : ndarray, shape (N, K)
    batch : array-like, shape (N,)
    n_neighbors : int
        Neighbours per cell, the cell itself excluded.

    Returns
    -------
    float
    """
    batch = np.asarray(batch)
    indices, _ = knn(np.asarray(embed), n_neighbors + 1)  # (N, n + 1), the cell itself among them
    others = indices != np.arange(len(batch))[:, None]
    other_batch = (batch[indices] != batch[:, None]) & others
    return float((other_batch.sum(1) / others.sum(1)).mean())


def ideal_knn_mixing(labels, batch):
    """`knn_mixing` of perfect mixing within cell types: each cell's other-batch share of its type."""
    frame = pd.DataFrame({"label": np.asarray(labels), "batch": np.asarray(batch)})
    size = frame.groupby("label")["batch"].transform("size").to_numpy()
    same = frame.groupby(["label", "batch"])["batch"].transform("size").to_numpy()
    return float(((size - same) / np.maximum(size - 1, 1)).mean())


def asw_batch(embed, batch, labels):
    """scib's batch silhouette: mean over cell types of mean(1 - |silhouette by batch|).

    Cell types found in one batch only are skipped, as in scib.

    Parameters
    ----------
    embed : ndarray, shape (N, K)
    batch, labels : array-like, shape (N,)

    Returns
    -------
    float
    """
    from sklearn.metrics import silhouette_samples

    batch, labels = np.asarray(batch), np.asarray(labels)
    scores = []
    for label in np.unique(labels):
        cells = labels == label
        if np.unique(batch[cells]).size < 2 or cells.sum() < 3:
            continue
        s = silhouette_samples(embed[cells], batch[cells])
        scores.append(np.mean(1 - np.abs(s)))
    return float(np.mean(scores))


def pca_embedding(adata, n_pcs=N_PCS, seed=0):
    """16 principal components of log1p(1e4 x / total) (scanpy's standard pipeline), (N, n_pcs)."""
    import scanpy as sc

    lognorm = adata.copy()
    lognorm.X = lognorm.X.astype(np.float32)
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    sc.pp.pca(lognorm, n_comps=n_pcs, random_state=seed)
    return lognorm.obsm["X_pca"]


def run_model(name, adata, seed, niter, scetm_options):
    """Train one model from scratch for one seed; returns its final embedding (N, K)."""
    cell_types = adata.obs["Celltype"].to_numpy()
    scorer = ARIScorer(cell_types, seed=seed)  # scores in this process; only the last iteration
    comp565_A4.seed_everything(seed)
    if name == "pca":
        return pca_embedding(adata, seed=seed)
    if name.startswith("nmf"):
        M, N = adata.n_vars, adata.n_obs
        X = adata.X.T.tocsr().astype(np.float64)  # genes x cells, as comp565_A4.run
        rng = np.random.default_rng(seed)
        W_init, H_init = rng.random((M, comp565_A4.K)), rng.random((comp565_A4.K, N))
        fit = comp565_A4.nmf_sse if name == "nmf_sse" else comp565_A4.nmf_psn
        _, H, _ = fit(X, W_init, H_init, adata, niter[name], scorer, eval_every=niter[name])
        return H.T
    X_tensor, X_tensor_normalized = comp565_A4.normalized_counts(adata)
    if name == "etm":  # exactly as comp565_A4.run builds it
        model = comp565_A4.ETM(num_topics=comp565_A4.K, vocab_size=adata.n_vars, t_hidden_size=256, rho_size=256,
                       theta_act="relu", embeddings=None, train_embeddings=True, enc_drop=0.5)
    elif name == "scetm":
        model = make_scetm(adata.n_vars, batch_codes(adata.obs["batch"]), **scetm_options)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model.set_encoder_bf16(comp565_A4.native_bf16(torch.device("cpu")))  # as `comp565_A4 --precision auto`
    model, _ = comp565_A4.train_scETM(model, X_tensor, X_tensor_normalized, adata, niter[name], scorer,
                              eval_every=niter[name])
    return comp565_A4.get_theta(model, X_tensor_normalized).cpu().numpy()


def score(embed, adata, seed):
    """ARI (the assignment's metric), NMI of the same clusters, and the two batch-mixing scores."""
    from sklearn.metrics import normalized_mutual_info_score

    cell_types = adata.obs["Celltype"].to_numpy()
    batch = adata.obs["batch"].to_numpy()
    ari = louvain_ari(embed, cell_types, seed=seed)
    clusters = louvain_labels(embed, seed=seed)  # cached: the partition the ARI was computed on
    return {
        "ari": ari,
        "nmi": float(normalized_mutual_info_score(cell_types, clusters)),
        "n_clusters": int(np.unique(clusters).size),
        "knn_mixing": knn_mixing(embed, batch),
        "asw_batch": asw_batch(embed, batch, cell_types),
    }


def _task(job):
    name, seed, data_dir, niter, scetm_options = job
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    adata = comp565_A4.load_data(data_dir)
    t0 = time.perf_counter()
    embed = run_model(name, adata, seed, niter, scetm_options)
    seconds = time.perf_counter() - t0
    options = scetm_options if name == "scetm" else {}
    return dict(model=name, seed=seed, seconds=seconds, options=_options_text(options, niter.get(name)),
                **score(embed, adata, seed))


def _options_text(options, niter):
    words = [f"{k}={v}" for k, v in options.items()] + ([] if niter is None else [f"niter={niter}"])
    return " ".join(words)


def summarize(runs, adata):
    """Mean +- sd over seeds per model, as a markdown table (and the frame)."""
    frame = pd.DataFrame(runs)
    rows = []
    frame["options"] = frame["options"].fillna("")
    for name in [m for m in MODELS if m in set(frame["model"])]:
        for options, sub in frame[frame["model"] == name].groupby("options", sort=False):
            label = f"{LABELS[name]} ({options})" if options else LABELS[name]
            row = {"model": label, "seeds": len(sub)}
            for col in ("ari", "nmi", "knn_mixing", "asw_batch"):
                sd = sub[col].std(ddof=1) if len(sub) > 1 else 0.0
                row[col] = f"{sub[col].mean():.3f} +- {sd:.3f}"
            row["min-max ARI"] = f"{sub['ari'].min():.3f}-{sub['ari'].max():.3f}"
            row["seconds"] = f"{sub['seconds'].mean():.0f}"
            rows.append(row)
    ideal = ideal_knn_mixing(adata.obs["Celltype"].to_numpy(), adata.obs["batch"].to_numpy())
    rows.append({"model": "reference: mice mixed perfectly within cell types", "seeds": "",
                 "ari": "", "nmi": "", "knn_mixing": f"{ideal:.3f}", "asw_batch": "1",
                 "min-max ARI": "", "seconds": ""})
    table = pd.DataFrame(rows).rename(columns={
        "ari": "ARI", "nmi": "NMI", "knn_mixing": "kNN mixing", "asw_batch": "ASW batch"})
    return markdown_table(table), frame


def markdown_table(frame):
    """A DataFrame as a GitHub markdown table (strings as they are)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * frame.shape[1]]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("COMP565_DATA_DIR", "data"),
                        help="the course's data folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs in parallel (worker processes, one thread each)")
    parser.add_argument("--niter-nmf", type=int, default=100, help="NMF-SSE and NMF-Poisson iterations")
    parser.add_argument("--niter-long", type=int, default=1000, help="NMF-Poisson iterations of nmf_psn_1000")
    parser.add_argument("--niter-etm", type=int, default=1000, help="steps of the assignment ETM")
    parser.add_argument("--niter-scetm", type=int, default=1000, help="steps of the batch-corrected scETM")
    parser.add_argument("--scetm-topics", type=int, default=DEFAULT_NUM_TOPICS, help="scETM topics K")
    parser.add_argument("--scetm-lr", type=float, default=DEFAULT_LR, help="scETM Adam learning rate")
    parser.add_argument("--scetm-anneal", type=int, default=DEFAULT_ANNEAL,
                        help="cosine-anneal the scETM learning rate to 0 over this many steps")
    parser.add_argument("--scetm-kl-warmup", type=int, default=DEFAULT_KL_WARMUP,
                        help="steps over which the scETM KL weight rises from 0 to 1")
    parser.add_argument("--scetm-log1p-input", type=float, default=None,
                        help="encoder input log1p(S * x / total) instead of x / total")
    parser.add_argument("--scetm-normed-loss", type=float, default=None,
                        help="reconstruct the counts rescaled to S per cell instead of the raw counts")
    parser.add_argument("--scetm-log-loss", action="store_true", help="reconstruct log1p of those counts")
    parser.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="CSV",
                        help="train nothing: print the table of the runs in these --out CSV files")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the table: .md (markdown) or .csv (one row per run)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    comp565_A4.quiet_known_warnings()
    adata = comp565_A4.load_data(args.data_dir)
    if args.summarize is not None:
        frame = pd.concat([pd.read_csv(path) for path in args.summarize], ignore_index=True)
        print(summarize(frame.to_dict("records"), adata)[0])
        return 0
    niter = {"nmf_sse": args.niter_nmf, "nmf_psn": args.niter_nmf, "nmf_psn_1000": args.niter_long,
             "etm": args.niter_etm, "scetm": args.niter_scetm}
    scetm_options = dict(num_topics=args.scetm_topics, lr=args.scetm_lr, anneal_steps=args.scetm_anneal,
                         kl_warmup=args.scetm_kl_warmup, log1p_scale=args.scetm_log1p_input,
                         normed_loss=args.scetm_normed_loss, log_loss=args.scetm_log_loss)
    jobs = [(name, seed, args.data_dir, niter, scetm_options) for name in args.models for seed in args.seeds]
    runs = []
    if args.jobs == 1:
        for job in jobs:
            runs.append(_task(job))
            print(_line(runs[-1]), flush=True)
    else:
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
            for run in pool.imap_unordered(_task, jobs):
                runs.append(run)
                print(_line(run), flush=True)
    table, frame = summarize(runs, adata)
    print()
    print(table)
    if args.out is not None:
        if args.out.suffix == ".csv":  # appended to: one file collects every configuration tried
            frame.to_csv(args.out, index=False, mode="a", header=not args.out.exists())
        else:
            args.out.write_text(table + "\n")
    return 0


def _line(run):
    return (f"{run['model']:>13} seed {run['seed']}: ARI {run['ari']:.3f} NMI {run['nmi']:.3f} "
            f"kNN mixing {run['knn_mixing']:.3f} ASW batch {run['asw_batch']:.3f} "
            f"({run['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
