"""How time and memory grow with the cells: every registered model, the leaderboard's scoring,
and (``--stages``) the assignment's stages per iteration.

    python bench/scaling.py [--models pca vae ...] [--sizes 10000 50000 100000 200000]
    python bench/scaling.py --million [--models pca vae gmvae]    # 1,000,000 cells from a backed .h5ad
    python bench/scaling.py --stages [--sizes 2000 10000 50000 100000]
    python bench/scaling.py --reuse --table-only --sizes ...     # the kept results' table and figure

Cells: the real 10x PBMC 4k cells (``10x_pbmc``, 2,000 genes) resampled with replacement to N,
every count thinned binomially (p = 0.9) so that copies of a cell differ (`resample`); labels
go with the cells. Each (model, N) runs in a fresh process (``--child``) at the model's default
settings (``device="cpu"``, every core), on an ``.h5ad`` of those cells written once per N
under ``--work``: ``fit`` and ``get_latent`` from memory (``--million``: from the file opened
with ``backed="r"``), then the leaderboard's scoring of that latent
(`cellembed.evaluation.metrics.clustering_scores`: kNN graph, Louvain, k-means; approximate
kNN above `cellembed.evaluation.graph.APPROX_ABOVE` cells). Columns: seconds of fit + embed,
of the scoring, and the process's peak resident memory (``VmHWM``, the data included), the
Louvain and k-means ARIs, and the epochs the fit trained (per phase for scGPCL: pre-training +
fine-tuning); a run past ``--timeout`` is cut and shown as ``>T``. The closing lines fit each model's growth
exponent (time ~ N^b over the sizes it finished; linear is b = 1) and draw
``bench/results/scaling.png``.

``--stages``: the assignment's NMF, ETM step and ``evaluate_ari``, milliseconds per iteration on
the mouse pancreas cells resampled the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # no progress bars (tqdm reads this when imported)
    os.environ.setdefault("TQDM_DISABLE", "1")

import anndata  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

import comp565_A4  # noqa: E402
from cellembed.evaluation import clustering  # noqa: E402
from cellembed.cli import quiet_known_warnings  # noqa: E402
from cellembed.evaluation.scoring import NoScorer, available_cores  # noqa: E402
from bench.timing import median_ms  # noqa: E402

MINIBATCH = 2048


def resample(adata, n_cells, seed=0):
    """``n_cells`` cells drawn with replacement, counts thinned binomially (p = 0.9).

    Labels (``Celltype``), the batch and a second modality (``obsm['mod2']``, thinned as well
    when it holds counts) go with the cells.
    """
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, adata.n_obs, n_cells)
    X = adata.X[pick].tocsr().astype(np.int64)
    X.data = rng.binomial(X.data, 0.9)
    X.eliminate_zeros()
    keep = np.asarray(X.sum(axis=1)).ravel() > 0  # a thinned cell can lose every count
    out = anndata.AnnData(X=sp.csr_matrix(X[keep]))
    for key in ("Celltype", "batch"):
        if key in adata.obs:
            out.obs[key] = adata.obs[key].to_numpy()[pick][keep]
    if "mod2" in adata.obsm:  # a second modality goes with its cells, its counts thinned too
        mod2 = np.asarray(adata.obsm["mod2"])[pick][keep]
        if not adata.uns["mod2"].get("normalized"):
            mod2 = rng.binomial(mod2.astype(np.int64), 0.9).astype(np.float32)
        out.obsm["mod2"], out.uns["mod2"] = mod2, dict(adata.uns["mod2"])
    return out


def time_size(adata, repeat):
    X = adata.X.T.tocsr().astype(np.float64)
    M, N = X.shape
    W0, H0 = comp565_A4.init_factors(M, N, seed=0)
    row = {"cells": N}
    for name, fn in (("nmf_sse", comp565_A4.nmf_sse), ("nmf_psn", comp565_A4.nmf_psn)):
        row[name] = median_ms(lambda: fn(X, W0, H0, adata, niter=repeat, scorer=NoScorer()), 2) / repeat
    counts, normalized = comp565_A4.normalized_counts(adata)
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = comp565_A4.build_etm(M)
        model.set_encoder_bf16(bf16)
        key = "etm_step_bf16" if bf16 else "etm_step"
        row[key] = median_ms(lambda: comp565_A4.train_scETM_helper(model, counts, normalized), 2)
        batch = torch.arange(min(MINIBATCH, N))
        mb_counts, mb_norm = counts.rows(batch), normalized[batch]
        row[key + "_minibatch"] = median_ms(lambda: comp565_A4.train_scETM_helper(model, mb_counts, mb_norm), 3)
    theta = comp565_A4.get_theta(model, normalized).numpy()
    truth = adata.obs["Celltype"].to_numpy()
    t0 = time.perf_counter()
    pattern = clustering.knn_graph_pattern(theta)
    t1 = time.perf_counter()
    clustering.louvain_partition(pattern)
    t2 = time.perf_counter()
    row["ari_knn_pattern"] = (t1 - t0) * 1e3
    row["ari_louvain"] = (t2 - t1) * 1e3
    row["ari_value"] = clustering.louvain_ari(theta, truth)
    return row


MODELS_DATA = "10x_pbmc"  # real PBMC cells, 2,000 genes: the "100k cells x 2,000 genes"
JOINT_DATA = "neurips_cite"  # the two-modality models' cells: 1,000 genes + 134 proteins (600 real cells)
SIZES = [10_000, 50_000, 100_000, 200_000]
MILLION = 1_000_000
STREAMING = ["pca", "vae", "gmvae"]  # the models of the 1M-cell backed run

CHILD_OPTIONS = {"gmvae": {"n_clusters": None}}  # K = the labelled classes


def write_cells(data_root, n_cells, path, seed=0):
    """``n_cells`` resampled PBMC cells (`resample`) written to ``path`` (.h5ad), in chunks of 100k.

    Chunks keep the writer's memory bounded for a million cells: the first is written by
    anndata, the others appended to its on-disk CSR matrix.
    """
    import h5py
    from anndata.io import sparse_dataset, write_elem

    from cellembed.data import load_dataset

    base = load_dataset(MODELS_DATA, data_root=data_root)
    base.X = base.X.astype(np.int64)
    step = 100_000
    labels = []
    with h5py.File(path, "w") as store:
        for i, start in enumerate(range(0, n_cells, step)):
            part = resample(base, min(step, n_cells - start), seed=seed + i)
            X = sp.csr_matrix(part.X, dtype=np.float32)
            if i == 0:
                write_elem(store, "X", X)
            else:
                sparse_dataset(store["X"]).append(X)
            labels.append(part.obs["Celltype"].to_numpy())
        labels = np.concatenate(labels)
        obs = anndata.AnnData(obs={"Celltype": labels}, var=base.var[[]]).obs
        obs.index = [f"cell{j}" for j in range(len(labels))]
        obs["Celltype"] = obs["Celltype"].astype("category")
        write_elem(store, "obs", obs)
        write_elem(store, "var", base.var[[]])
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(store, key, {})
        store.attrs["encoding-type"], store.attrs["encoding-version"] = "anndata", "0.1.0"
    return len(labels)


def write_joint_cells(data_root, n_cells, path, seed=0):
    """``n_cells`` resampled CITE-seq cells (RNA, proteins, labels, batch) written to ``path`` (.h5ad)."""
    from cellembed.data import load_dataset

    base = load_dataset(JOINT_DATA, data_root=data_root)
    base.X = base.X.astype(np.int64)
    part = resample(base, n_cells, seed=seed)
    part.X = sp.csr_matrix(part.X, dtype=np.float32)
    part.obs_names = [f"cell{j}" for j in range(part.n_obs)]
    part.var_names = base.var_names
    part.uns["mod2"]["features"] = np.asarray(part.uns["mod2"]["features"], dtype=str)
    part.write_h5ad(path)
    return part.n_obs


def child(model_name, path, backed, score=True, seed=0):
    """One (model, file) run in this process: a dict of seconds, peak memory and scores."""
    from cellembed.evaluation.metrics import clustering_scores
    from cellembed.runner import build, parse_models

    t0 = time.perf_counter()
    adata = anndata.read_h5ad(path, backed="r" if backed else None)
    load = time.perf_counter() - t0
    _, name, options = parse_models([model_name], quick=False)[0]  # compare.py's spec: name[:key=value...]
    model = build(name, options, False, "cpu")
    keys = {"labels_key": "Celltype", "batch_key": "batch" if "batch" in adata.obs else None}
    t0 = time.perf_counter()
    model.fit(adata, seed=seed, **keys)
    latent = np.asarray(model.get_latent(adata), dtype=np.float64)
    fit = time.perf_counter() - t0
    peak_fit = peak_mib()
    row = {"model": model_name, "cells": adata.n_obs, "load_s": load, "fit_s": fit, "peak_fit_mib": peak_fit,
           "backed": backed, "epochs": epochs_run(model)}
    if score:
        labels = adata.obs["Celltype"].to_numpy().astype(str)
        t0 = time.perf_counter()
        scores = clustering_scores(latent, labels, seed, "louvain")
        row.update(score_s=time.perf_counter() - t0, ari_louvain=scores["ari_louvain"],
                   ari_kmeans=scores["ari_kmeans"])
    row["peak_mib"] = peak_mib()
    return row


def epochs_run(model):
    """The epochs a fit trained, ``"48"``, or per phase ``"10+10"`` (scGPCL's pre-training, fine-tuning)."""
    phases = {}
    for entry in getattr(model, "history", None) or []:
        phase = entry.get("phase")  # scGPCL's "pretrain" / "finetune"; JAE's "phase" is its cell-cycle loss
        phase = phase if isinstance(phase, str) else None
        phases[phase] = phases.get(phase, 0) + 1
    return "+".join(str(count) for count in phases.values()) or "-"


def peak_mib():
    """This process's peak resident memory so far (VmHWM), MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(model_name, path, backed, timeout, score=True):
    """`child` in a fresh process; None when it ran past ``timeout`` seconds or failed (printed)."""
    import json
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model_name, str(path)]
    cmd += (["--backed"] if backed else []) + ([] if score else ["--no-score"])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        print(f"  {model_name} on {path.name}: failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
        return {"failed": True}
    return json.loads(out.stdout.strip().splitlines()[-1])


def growth(sizes, values):
    """The exponent b of ``value ~ N^b`` fitted by least squares on the logs (None below 2 points)."""
    pairs = [(n, v) for n, v in zip(sizes, values) if v is not None and v > 0]
    if len(pairs) < 2:
        return None
    n, v = np.log(np.array(pairs, dtype=float)).T
    return float(np.polyfit(n, v, 1)[0])


def models_table(args):
    """Every model at every size: the table, the growth exponents and the figure."""
    import json

    from cellembed.models import REGISTRY, get_model

    models = args.models or (STREAMING if args.million else list(REGISTRY))
    sizes = [MILLION] if args.million else args.sizes
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    print(f"\nScaling: fit + embed, scoring, peak memory ({MODELS_DATA} cells resampled, 2,000 genes; "
          f"{'backed .h5ad' if args.million else 'in memory'}; timeout {args.timeout} s)", flush=True)
    print("| model | cells | fit + embed s | scoring s | peak MiB | ARI Louvain | ARI k-means | epochs |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for n in sizes:
        for name in models:
            joint = get_model(name.split(":")[0]).__name__ in ("JAE", "PCAJoint")  # two modalities
            path = work / f"{'cite' if joint else 'pbmc'}_{n}.h5ad"
            kept = work / f"{name}_{n}{'_backed' if args.million else ''}.json"  # --reuse reads it back
            if args.reuse and kept.exists():
                row = json.loads(kept.read_text())
            elif args.table_only:
                print(f"| {name} | {n} | not run | | | | | |", flush=True)
                continue
            else:
                if not path.exists():  # written under another name first: a cut run leaves no half file
                    part = path.with_suffix(".part.h5ad")
                    (write_joint_cells if joint else write_cells)(args.data_root, n, part)
                    part.rename(path)
                row = run_child(name, path, args.million, args.timeout, not args.no_score)
                kept.write_text(json.dumps(row if row is not None else {"timeout": args.timeout}))
            if row is not None and row.get("timeout"):
                row = None
            results[name, n] = row
            if row is None:
                print(f"| {name} | {n} | >{args.timeout} | | | | | |", flush=True)
            elif not row.get("failed"):
                scores = (f"{row['score_s']:.1f} | {row['peak_mib']:.0f} | {row['ari_louvain']:.3f} | "
                          f"{row['ari_kmeans']:.3f}" if "score_s" in row else f"- | {row['peak_mib']:.0f} | - | -")
                print(f"| {name} | {n} | {row['fit_s']:.1f} | {scores} | {row.get('epochs', '-')} |", flush=True)
    if len(sizes) > 1:
        print("\nGrowth exponents b (time ~ N^b over the sizes each finished; 1 = linear):")
        for name in models:
            rows = [results.get((name, n)) for n in sizes]
            fit = growth(sizes, [r["fit_s"] if r and not r.get("failed") else None for r in rows])
            score = growth(sizes, [r.get("score_s") if r and not r.get("failed") else None for r in rows])
            show = [f"{x:.2f}" if x is not None else "-" for x in (fit, score)]
            print(f"  {name}: fit + embed {show[0]}, scoring {show[1]}")
        plot(results, models, sizes, Path(args.figure))
    return results


def plot(results, models, sizes, path):
    """Time and peak memory against the cells, log-log, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in models:
        rows = [(n, results.get((name, n))) for n in sizes]
        rows = [(n, r) for n, r in rows if r and not r.get("failed")]
        if not rows:
            continue
        n = [r[0] for r in rows]
        axes[0].plot(n, [r[1]["fit_s"] for r in rows], marker="o", label=name)
        axes[1].plot(n, [r[1]["peak_mib"] / 1024 for r in rows], marker="o", label=name)
    for ax, what in zip(axes, ("fit + embed (s)", "peak memory (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cells")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].axhline(600, color="grey", ls="--", lw=1)  # the 10-minute target at 100k cells
    axes[1].axhline(4, color="grey", ls="--", lw=1)  # and its 4 GB
    axes[1].legend(fontsize=8, ncol=2)
    fig.suptitle("Every model on resampled 10x PBMC cells (2,000 genes), default settings, 2 CPU cores")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"figure: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("COMP565_DATA_DIR", str(ROOT / "data")),
                        help="--stages: the course's data folder")
    parser.add_argument("--data-root", default=os.environ.get("A4_DATA_ROOT", str(ROOT.parent / "shared/data")),
                        help="the named data sets' folder (10x_pbmc)")
    parser.add_argument("--models", nargs="+", default=None, help="registry names, with settings as compare.py "
                        "takes them (name:key=value:...; default: all; --million: " + ", ".join(STREAMING) + ")")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--million", action="store_true", help="1,000,000 cells from a backed .h5ad")
    parser.add_argument("--no-score", action="store_true", help="fit and embed only (no leaderboard scoring)")
    parser.add_argument("--reuse", action="store_true",
                        help="take a (model, size) run's result from --work when an earlier run left it there")
    parser.add_argument("--table-only", action="store_true",
                        help="with --reuse: print the table, exponents and figure of the kept results only")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per (model, size) run")
    parser.add_argument("--work", default="/tmp/cellembed-scaling", help="where the resampled .h5ad files go")
    parser.add_argument("--figure", default=str(ROOT / "bench/results/scaling.png"))
    parser.add_argument("--stages", action="store_true", help="the assignment's stages per iteration")
    parser.add_argument("--repeat", type=int, default=3, help="--stages: timed NMF iterations per size")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--backed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quiet_known_warnings("scaling.py")
    if args.child:
        import json

        print(json.dumps(child(args.child[0], args.child[1], args.backed, not args.no_score)))
        return None
    if not args.stages:
        args.sizes = args.sizes or SIZES
        return models_table(args)
    return stages_table(args)


def stages_table(args):
    torch.set_num_threads(available_cores())
    base = comp565_A4.load_data(args.data_dir)
    sizes = args.sizes or [2000, 10000, 50000, 100000]
    print("\nScaling: ms per iteration (cells resampled from the real data, counts thinned p=0.9)")
    cols = {"cells": "cells", "nmf_sse": "NMF-SSE", "nmf_psn": "NMF-Psn", "etm_step": "ETM fp32",
            "etm_step_bf16": "ETM bf16", "etm_step_bf16_minibatch": f"ETM mb{MINIBATCH}",
            "ari_knn_pattern": "ARI kNN", "ari_louvain": "ARI Louvain"}
    print("| " + " | ".join(cols.values()) + " |")
    print("|" + "---:|" * len(cols))
    rows = []
    for n in sizes:
        row = time_size(resample(base, n), args.repeat)
        rows.append(row)
        print("| " + " | ".join(f"{row[c]:.0f}" for c in cols) + " |", flush=True)
    print(f"(ETM: one full-batch step; mb{MINIBATCH}: one bf16 step on {MINIBATCH} cells, an epoch is "
          f"cells / {MINIBATCH} of them; ARI: one scoring, kNN + graph pattern, then Louvain)")
    return rows


if __name__ == "__main__":
    main()
