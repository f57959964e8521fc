"""The leaderboard's outputs: the summary over seeds, its markdown and bar chart, the joint-metric
tables and the t-SNE panels. Nothing here trains or scores."""

from __future__ import annotations

import anndata
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cellembed.data import LABEL_KEY  # noqa: E402
from cellembed.outputs import atomic_path, save_figure, write_csv  # noqa: E402
from cellembed.runner import SCORES, SHOWN  # noqa: E402

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
    if rank_by not in table:
        return table
    return table.sort_values(rank_by, ascending=False, na_position="last")


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
    from cellembed.evaluation.joint_metrics import JOINT_METRICS, left_out

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
    scores = [s for s in SHOWN if s in summary]
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


TSNE_MAX_CELLS = 10_000  # larger data sets are drawn on a stratified subsample (the t-SNE grows ~N log N)
TSNE_QUICK_CELLS = 300  # --quick


def subsample(groups, max_cells, seed=0):
    """Row indices of at most ``max_cells`` cells, each group keeping its share (at least one cell).

    Parameters
    ----------
    groups : array-like, shape (N,)
        The strata (cell types, or clusters).

    Returns
    -------
    ndarray of int, sorted
    """
    groups = pd.Series(np.asarray(groups).astype(str))
    if len(groups) <= max_cells:
        return np.arange(len(groups))
    rng = np.random.default_rng(seed)
    keep = []
    for _, rows in groups.groupby(groups, sort=True).indices.items():
        n = max(1, int(round(len(rows) * max_cells / len(groups))))
        keep.append(rng.choice(rows, size=min(n, len(rows)), replace=False))
    return np.sort(np.concatenate(keep))


def plot_tsne(adata, panels, path, seed=0, max_cells=TSNE_MAX_CELLS):
    """One t-SNE panel per embedding, coloured by a categorical obs column.

    Parameters
    ----------
    adata : anndata.AnnData
        ``obsm`` holds the embeddings; ``obs`` the colour columns (with ``uns['<column>_colors']``
        for a shared palette and legend, as scanpy keeps them).
    panels : dict
        Panel title -> (obsm key, obs column to colour by).
    path : Path
    seed : int
    max_cells : int
        Above this, every panel is drawn on the same stratified subsample (by the first panel's
        colours).
    """
    import scanpy as sc

    first_column = next(iter(panels.values()))[1]
    rows = subsample(adata.obs[first_column], max_cells, seed)
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.8 * nrows), squeeze=False)
    for ax, (title, (key, column)) in zip(axes.flat, panels.items()):
        one = anndata.AnnData(obs=adata.obs[[column]].iloc[rows].copy(), obsm={key: adata.obsm[key][rows]})
        if f"{column}_colors" in adata.uns:
            one.uns[f"{column}_colors"] = adata.uns[f"{column}_colors"]
        sc.tl.tsne(one, use_rep=key, random_state=seed)
        sc.pl.embedding(one, basis="X_tsne", color=column, ax=ax, show=False, title=title,
                        frameon=False, legend_loc="none")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    if f"{first_column}_colors" in adata.uns and all(c == first_column for _, c in panels.values()):
        categories = adata.obs[first_column].cat.categories
        handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=n)
                   for n, c in zip(categories, adata.uns[f"{first_column}_colors"])]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                   fontsize=8, ncols=1 + len(categories) // 30)
    if len(rows) < adata.n_obs:
        fig.suptitle(f"{len(rows)} of {adata.n_obs} cells (stratified subsample)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, png_twin=False)


def set_palette(adata, column=LABEL_KEY):
    """One colour per category of ``obs[column]``, stored as ``uns['<column>_colors']`` (scanpy's convention)."""
    import scanpy as sc

    categories = adata.obs[column].cat.categories
    palette = sc.pl.palettes.default_20 if len(categories) <= 20 else sc.pl.palettes.default_102
    adata.uns[f"{column}_colors"] = list(palette[:len(categories)])
