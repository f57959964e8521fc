"""Train registered models on one data set over several seeds and rank them on one leaderboard.

    python compare.py --data pbmc3k --models pca,nmf_psn,etm --seeds 0 1 2 --out results
    python compare.py --data my_cells.h5ad --label-key cell_type --layer counts --models pca,vae
    python compare.py --data 10x_pbmc --models vae,vae:likelihood=nb,nmf_psn:niter=1000

``--data`` is a named data set (found under ``--data-root``) or a file (``.h5ad``, an
scDeepCluster ``.h5``, a MuData ``.h5mu``, or the course's data folder); see `a4.data`.
``--models`` lists registry names (`models.REGISTRY`), each optionally followed by
``:field=value`` settings of its config. Every model is trained once per seed (the seed seeds
numpy, torch, Louvain and k-means) and its embedding scored:

- ``ari_louvain`` / ``nmi_louvain``: the assignment's metric (30 neighbours, Louvain 0.15);
- ``ari_kmeans`` / ``nmi_kmeans``: k-means with k = the number of labelled classes, n_init 20;
- ``ari_own`` / ``nmi_own``: the model's own clusters, for models that cluster;
- with a batch: ``knn_mixing`` and ``asw_batch``;
- for two-modality data sets: the joint-embedding metrics of `a4.joint_metrics`.

Outputs in ``<out>/<data set>/``: ``leaderboard.csv`` (one row per model and seed),
``leaderboard.md`` (mean +- sd, best first), ``leaderboard.png``, ``embeddings.h5ad`` (every
model's first-seed embedding in ``obsm``), ``tsne.png`` (a panel per model), and with
``--classify`` the classifier study's ``classification.csv|md`` and ``confusion.png``.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import time

from a4 import cli

RANK_BY = ("ari_louvain", "ari_kmeans", "nmi_kmeans", "ari_own")


def parse_models(entries):
    """``--models`` entries as (label, registry name, options) triples.

    Parameters
    ----------
    entries : list of str
        Items separated by commas or given as separate words; each ``name`` or
        ``name:field=value[:field=value...]`` (values as Python literals, else strings).

    Returns
    -------
    list of (str, str, dict)

    Raises
    ------
    ValueError
        An unknown name or a malformed setting (the message names it and the fix).
    """
    from models import REGISTRY

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
        specs.append((item, name, options))
    if not specs:
        raise ValueError("argument --models: no model given")
    labels = [label for label, _, _ in specs]
    if len(set(labels)) < len(labels):
        raise ValueError("argument --models: a model is listed twice")
    return specs


def parse_args(argv=None):
    parser = cli.Parser(prog="compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True,
                        help="a named data set (mouse_pancreas, baron_mouse, pbmc3k, 10x_pbmc, mouse_bladder, "
                             "neurips_cite, neurips_multiome) or a .h5ad / .h5 / .h5mu file or course folder")
    parser.add_argument("--data-root", default=None,
                        help="folder holding the named data sets (default: $A4_DATA_ROOT, else data)")
    parser.add_argument("--label-key", default=None, help="obs column of the cell types in a .h5ad file "
                        "(default: the first of cell_type, celltype, Celltype, assigned_cluster, labels, label)")
    parser.add_argument("--batch-key", default=None, help="obs column of the batch in a .h5ad file "
                        "(default: batch, when present)")
    parser.add_argument("--layer", default=None, help="layer of a .h5ad file holding the raw counts (default: X)")
    parser.add_argument("--models", nargs="+", required=True,
                        help="registered models, comma-separated, each optionally with :field=value "
                             "settings of its config, e.g. pca,vae,vae:likelihood=nb")
    parser.add_argument("--seeds", type=cli.non_negative_int, nargs="+", default=[0, 1, 2],
                        help="one training run per model and seed (default: 0 1 2)")
    parser.add_argument("--out", default="results", help="output folder; files go to OUT/<data set> (default: results)")
    parser.add_argument("--rank-by", choices=RANK_BY, default="ari_louvain",
                        help="the score that orders the leaderboard (default: ari_louvain)")
    parser.add_argument("--classify", action="store_true",
                        help="also run the cell-type classifier study on raw counts, PCA and every latent space")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: every model with its few-iteration settings (Model.quick)")
    parser.add_argument("--no-tsne", action="store_true", help="skip tsne.png (slow on large data sets)")
    parser.add_argument("--threads", type=cli.positive_int, default=None,
                        help="threads for training and scoring (default: all cores)")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) < len(args.seeds):
        parser.error("argument --seeds: a seed is listed twice")
    try:
        args.specs = parse_models(args.models)
    except ValueError as exc:
        parser.error(str(exc))
    return args


if __name__ == "__main__":  # --help and a bad flag answer at once, before the heavy imports below
    ARGS = parse_args(sys.argv[1:])

try:
    import dataclasses

    import anndata
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    import torch
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm
except ModuleNotFoundError as exc:  # the virtual environment is not active
    if __name__ != "__main__":
        raise
    sys.exit(cli.missing_dependency(exc, "compare.py"))

from a4 import metrics  # noqa: E402
from a4.data import BATCH_KEY, LABEL_KEY, DataError, load_dataset  # noqa: E402
from a4.outputs import atomic_path, prepare_dir, save_figure, write_csv, write_h5ad  # noqa: E402
from a4.scoring import available_cores  # noqa: E402
from a4.training import seed_everything  # noqa: E402
from models import get_model  # noqa: E402

SCORES = ("ari_louvain", "nmi_louvain", "ari_kmeans", "nmi_kmeans", "ari_own", "nmi_own", "knn_mixing",
          "asw_batch")


def build(name, options, quick=False):
    """A registered model with ``options`` set (over its ``quick`` settings with ``quick``).

    Raises
    ------
    ValueError
        A setting its config lacks.
    """
    cls = get_model(name)
    options = {**cls.quick, **options} if quick else options
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"argument --models: {name} has no setting {unknown[0]!r}; its settings: "
                         f"{', '.join(sorted(fields))}")
    return cls(**options)


def obsm_key(label):
    """``X_<label>`` with the settings' punctuation as underscores (``vae:likelihood=nb`` -> ``X_vae_likelihood_nb``)."""
    return "X_" + re.sub(r"[^0-9A-Za-z]+", "_", label).strip("_")


def run_one(label, name, options, adata, seed, quick=False):
    """Train one model for one seed and score it.

    Returns
    -------
    row : dict
        ``model``, ``seed``, ``supervised``, the scores, ``seconds`` (training and embedding).
    latent : ndarray, shape (N, d)
    """
    model = build(name, options, quick)
    seed_everything(seed)
    t0 = time.perf_counter()
    model.fit(adata, seed=seed)
    latent = np.asarray(model.get_latent(adata), dtype=np.float64)
    predicted = model.predict(adata) if model.clusters else None
    seconds = time.perf_counter() - t0
    if latent.shape[0] != adata.n_obs or not np.isfinite(latent).all():
        raise FloatingPointError(f"{label} (seed {seed}): the embedding has NaN or infinite values or "
                                 f"the wrong shape {latent.shape}")
    labels = adata.obs[LABEL_KEY].to_numpy()
    row = {"model": label, "seed": seed, "supervised": bool(model.supervised),
           **metrics.clustering_scores(latent, labels, seed)}
    if predicted is not None:
        row.update(metrics.own_scores(predicted, labels))
    if BATCH_KEY in adata.obs:
        row.update(metrics.batch_scores(latent, adata.obs[BATCH_KEY].to_numpy(), labels))
    if "mod2" in adata.obsm:
        from a4.joint_metrics import joint_scores

        row["joint"] = joint_scores(latent, adata, seed=seed)
    row["seconds"] = seconds
    return row, latent


def summarize(frame, rank_by):
    """Mean and sd over seeds per model, best ``rank_by`` first.

    Returns
    -------
    pandas.DataFrame
        One row per model: ``seeds``, ``supervised``, ``<score>`` and ``<score>_sd`` for every
        score present, ``seconds``.
    """
    scores = [s for s in SCORES if s in frame and frame[s].notna().any()]
    grouped = frame.groupby("model", sort=False)
    table = pd.DataFrame({"seeds": grouped.size(), "supervised": grouped["supervised"].first()})
    for score in scores + ["seconds"]:
        table[score] = grouped[score].mean()
        table[f"{score}_sd"] = grouped[score].std(ddof=1).fillna(0.0)  # one seed: sd 0
    key = rank_by if rank_by in table else "ari_louvain"
    return table.sort_values(key, ascending=False, na_position="last")


def markdown(summary, title):
    """The summary as a markdown table, ``mean +- sd`` per score."""
    scores = [s for s in SCORES if s in summary]
    header = ["model", "seeds", "supervised", *scores, "seconds"]
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, row in summary.iterrows():
        cells = [model, str(row["seeds"]), "yes" if row["supervised"] else "no"]
        for score in scores:
            cells.append("–" if pd.isna(row[score]) else f"{row[score]:.3f} +- {row[f'{score}_sd']:.3f}")
        cells.append(f"{row['seconds']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_joint_tables(frame, adata, out_dir, title):
    """``joint_metrics.csv`` (one row per model and seed) and ``.md`` (mean +- sd, best mean first)."""
    from a4.joint_metrics import JOINT_METRICS, left_out

    write_csv(frame, out_dir / "joint_metrics.csv")
    columns = [c for c in (*JOINT_METRICS, "mean_score") if c in frame]
    grouped = frame.groupby("model", sort=False)
    means, sds = grouped[columns].mean(), grouped[columns].std(ddof=1).fillna(0.0)
    lines = [f"**{title}: the NeurIPS 2021 joint-embedding metrics**", "",
             "| model | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for model in means.sort_values("mean_score", ascending=False).index:
        cells = [f"{means.at[model, c]:.3f} +- {sds.at[model, c]:.3f}" for c in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- {name} left out: {why}" for name, why in left_out(adata).items())]
    with atomic_path(out_dir / "joint_metrics.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def plot_leaderboard(summary, title, path):
    """Bars of mean ARI / NMI per model with sd error bars."""
    scores = [s for s in ("ari_louvain", "ari_kmeans", "nmi_kmeans", "ari_own") if s in summary]
    models = list(summary.index)
    width = 0.8 / len(scores)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(models) + 2), 4.5))
    x = np.arange(len(models))
    for i, score in enumerate(scores):
        ax.bar(x + (i - (len(scores) - 1) / 2) * width, summary[score].fillna(0), width,
               yerr=summary[f"{score}_sd"].fillna(0), capsize=3, label=score)
    ax.set_xticks(x, models, rotation=30, ha="right")
    ax.set_ylabel("score (mean +- sd over seeds)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(ncol=len(scores), loc="upper right", fontsize=8, framealpha=1)
    fig.tight_layout()
    save_figure(fig, path, png_twin=False)


def plot_tsne(adata, keys, path, seed=0):
    """One t-SNE panel per embedding in ``adata.obsm[keys]``, coloured by cell type (one palette)."""
    import scanpy as sc

    ncols = min(3, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.8 * nrows), squeeze=False)
    for ax, (label, key) in zip(axes.flat, keys.items()):
        one = anndata.AnnData(obs=adata.obs[[LABEL_KEY]].copy(), obsm={key: adata.obsm[key]},
                              uns={f"{LABEL_KEY}_colors": adata.uns[f"{LABEL_KEY}_colors"]})
        sc.tl.tsne(one, use_rep=key, random_state=seed)
        sc.pl.embedding(one, basis="X_tsne", color=LABEL_KEY, ax=ax, show=False, title=label,
                        frameon=False, legend_loc="none")
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    categories = adata.obs[LABEL_KEY].cat.categories
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=n)
               for n, c in zip(categories, adata.uns[f"{LABEL_KEY}_colors"])]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
               fontsize=8, ncols=1 + len(categories) // 30)
    fig.tight_layout()
    save_figure(fig, path, png_twin=False)


def set_palette(adata):
    """One colour per label, stored once as ``uns['Celltype_colors']`` (scanpy's convention)."""
    import scanpy as sc

    categories = adata.obs[LABEL_KEY].cat.categories
    palette = sc.pl.palettes.default_20 if len(categories) <= 20 else sc.pl.palettes.default_102
    adata.uns[f"{LABEL_KEY}_colors"] = list(palette[:len(categories)])


def main(argv=None, args=None):
    """Run the comparison; returns the exit code (0, 1 a failed run, 2 bad input)."""
    args = args if args is not None else parse_args(argv)
    cli.quiet_known_warnings("compare.py")
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    threadpool_limits(threads)
    try:
        for label, name, options in args.specs:
            build(name, options)  # every setting checked before any training
        adata = load_dataset(args.data, data_root=args.data_root, label_key=args.label_key,
                             batch_key=args.batch_key, layer=args.layer)
    except (ValueError, DataError) as exc:
        sys.stderr.write(f"compare.py: error: {exc}\n")
        return 2
    name = adata.uns["dataset"]["name"]
    title = (f"{name}: {adata.n_obs} cells x {adata.n_vars} genes, {adata.obs[LABEL_KEY].nunique()} classes, "
             f"seeds {' '.join(map(str, args.seeds))}")
    tqdm.write(title)
    rows, latents = [], {}
    try:
        out_dir = prepare_dir(os.path.join(args.out, name), what="--out")
        for label, model_name, options in args.specs:
            for seed in args.seeds:
                row, latent = run_one(label, model_name, options, adata, seed, args.quick)
                rows.append(row)
                latents.setdefault(label, {})[seed] = latent
                shown = " ".join(f"{k} {row[k]:.3f}" for k in ("ari_louvain", "ari_kmeans", "nmi_kmeans", "ari_own")
                                 if k in row)
                tqdm.write(f"{label} seed {seed}: {shown} ({row['seconds']:.1f} s)")
    except KeyboardInterrupt:
        sys.stderr.write(f"\ninterrupted after {len(rows)} run(s); nothing written\n")
        return 130
    except (FloatingPointError, RuntimeError, ValueError, OSError) as exc:
        sys.stderr.write(f"compare.py: error: {exc}\n")
        return 1

    joint = [dict(model=r["model"], seed=r["seed"], **r.pop("joint")) for r in rows if "joint" in r]
    frame = pd.DataFrame(rows)
    summary = summarize(frame, args.rank_by)
    write_csv(frame, out_dir / "leaderboard.csv")
    text = markdown(summary, title)
    if BATCH_KEY in adata.obs:
        ideal = metrics.ideal_knn_mixing(adata.obs[LABEL_KEY].to_numpy(), adata.obs[BATCH_KEY].to_numpy())
        text += f"\nknn_mixing if the batches were mixed perfectly within every cell type: {ideal:.3f}\n"
    with atomic_path(out_dir / "leaderboard.md") as tmp:
        tmp.write_text(text)
    plot_leaderboard(summary, title, out_dir / "leaderboard.png")
    if joint:
        write_joint_tables(pd.DataFrame(joint), adata, out_dir, title)

    first = args.seeds[0]
    embeddings = anndata.AnnData(obs=adata.obs[[c for c in (LABEL_KEY, BATCH_KEY) if c in adata.obs]].copy())
    set_palette(embeddings)
    keys = {}
    for label in latents:
        keys[label] = obsm_key(label)
        embeddings.obsm[keys[label]] = latents[label][first]
    embeddings.uns["leaderboard"] = {"data": name, "seed": first, "models": list(latents)}
    write_h5ad(embeddings, out_dir / "embeddings.h5ad")
    if not args.no_tsne:
        plot_tsne(embeddings, keys, out_dir / "tsne.png", seed=first)
    if args.classify:
        from a4.classify import classification_study

        classification_study(adata, latents, args.seeds, out_dir)
    print(text)
    print(f"outputs in {out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(args=ARGS))
