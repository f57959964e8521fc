"""COMP 565 assignment 4: unsupervised learning of single-cell transcriptomes with NMF and the ETM.

Data: Mouse Pancreas (Baron et al. 2016, GEO GSE84133), 1886 cells x 4194 genes of raw UMI
counts, 13 cell types, two mice. Every model turns the counts into a K = 16 dimensional
embedding of the cells, and every iteration is scored by `evaluate_ari`: Louvain clusters of
the embedding against the annotated cell types.

    Q1  nmf_sse       NMF minimizing ||X - WH||^2 by multiplicative updates
    Q2  monitor_perf  objective and ARI against iteration
    Q3  nmf_psn       NMF maximizing the Poisson log-likelihood
    Q4  train_scETM   the embedded topic model (etm.py), trained on all cells at once
    Q5  NMF-Poisson for 1000 iterations against the ETM
    Q6  t-SNE of the ETM's theta and of NMF-Poisson's H, side by side
    Q7  cells x topics heatmap (seaborn.clustermap)
    Q8  top 5 genes of every topic (seaborn.heatmap)

Run ``python comp565_A4.py --help`` for the options; the figures, tables and an AnnData with
every embedding land in ``figures/``. ``--model scetm`` answers Q4-Q8 with scETM's
batch-corrected decoder (``etm.BatchETM``) instead of the course ETM.
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

from cellembed import cli

if __name__ == "__main__":  # --help and a bad flag answer at once, before the heavy imports below
    ARGS = cli.parse_assignment_args(sys.argv[1:])
    cli.exit_promptly_on_interrupt("comp565_A4.py")  # Ctrl-C ends the run within seconds, from here on
    cli.quiet_known_warnings("comp565_A4.py")  # before the imports: scanpy's louvain warns on import

try:
    import anndata
    import matplotlib

    matplotlib.use("Agg")  # figures go to files; no display needed
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    import scanpy as sc
    import scipy.sparse as sp
    import seaborn as sns
    import torch
    import torch.nn.functional as F
    from matplotlib.patches import Patch
    from threadpoolctl import threadpool_limits
    from torch import optim

    from cellembed.data import LABEL_KEY, DataError, load_course_data
    from cellembed.evaluation.clustering import louvain_ari
    from cellembed.evaluation.scoring import ARIScorer, PerfRecorder, available_cores, split_cores
    from cellembed.likelihoods import CSRCounts
    from cellembed.outputs import prepare_dir, save_figure, write_csv, write_h5ad
    from cellembed.runtime import resolve_device, use_bf16
    from cellembed.sparse import sampled_product, with_values
    from cellembed.training import linear_warmup, seed_everything
    from etm import ETM, BatchETM, SCETMConfig, batch_codes
except ModuleNotFoundError as exc:  # the virtual environment is not active
    if __name__ != "__main__":
        raise
    sys.exit(cli.missing_dependency(exc, "comp565_A4.py"))
except KeyboardInterrupt:  # Ctrl-C while torch and scanpy load
    if __name__ != "__main__":
        raise
    cli.report_interrupt("\ncomp565_A4.py: interrupted while starting; nothing written")
    sys.exit(130)

K = 16  # topics / NMF rank
# Guards the multiplicative updates' divisions: W'WH, W'1, H1' and WH are 0 only when a whole
# factor row or column has underflowed to 0; EPS keeps the ratio finite (the row stays 0).
EPS = 1e-12


def load_data(data_dir):
    """The course's data folder as an AnnData (see `cellembed.data.load_course_data`).

    Returns
    -------
    anndata.AnnData, shape (N cells, M genes)
        ``X`` raw counts (sparse), ``obs['Celltype']``, ``obs['batch']``.
    """
    return load_course_data(data_dir)


def evaluate_ari(cell_embed, adata, seed=0):
    """ARI of the Louvain clusters of an embedding against ``adata.obs['Celltype']``.

    Same partition as the assignment's scanpy version,
    ``sc.pp.neighbors(adata, use_rep='cell_embed', n_neighbors=30)`` then
    ``sc.tl.louvain(adata, resolution=0.15, random_state=seed)``, computed without the
    AnnData round trips (see `cellembed.evaluation.clustering`).

    Parameters
    ----------
    cell_embed : array-like, shape (N, K)
        One row per cell.
    adata : anndata.AnnData
        Cells with ``obs['Celltype']``; the embedding is stored in ``obsm['cell_embed']``.
    seed : int
        Louvain's random seed.

    Returns
    -------
    float
        Adjusted Rand index.
    """
    cell_embed = np.asarray(cell_embed)
    adata.obsm["cell_embed"] = cell_embed
    return louvain_ari(cell_embed, adata.obs[LABEL_KEY].to_numpy(), seed=seed)


# ------------------------------------------------------------------------------ Question 1


def init_factors(n_genes, n_cells, seed=0, k=K):
    """The NMF starting point: W, H uniform on [0, 1) from ``numpy.random.default_rng(seed)``.

    Returns
    -------
    W : ndarray, shape (n_genes, k)
    H : ndarray, shape (k, n_cells)
    """
    rng = np.random.default_rng(seed)
    return rng.random((n_genes, k)), rng.random((k, n_cells))


def nmf_sse(X, W, H, adata, niter=100, scorer=None, start_iter=0, eval_every=1):
    """NMF minimizing the squared error by multiplicative updates (Lee & Seung 2001, Thm 1).

    ``H <- H * (W'X) / (W'W H)``, then ``W <- W * (X H') / (W H H')``. The objective comes
    from quantities the updates already have, never from the M x N residual:
    ``||X - WH||^2 = ||X||^2 - 2 <W, X H'> + <W'W, H H'>``.

    Parameters
    ----------
    X : scipy.sparse matrix or ndarray, shape (M genes, N cells)
        Counts.
    W : ndarray, shape (M, K)
        Initial gene loadings (not modified).
    H : ndarray, shape (K, N)
        Initial cell factors (not modified).
    adata : anndata.AnnData
        The N cells, with ``obs['Celltype']``, for the ARI.
    niter : int
        Iterations.
    scorer : cellembed.evaluation.scoring.ARIScorer, optional
        Scores ``H.T`` every iteration; default: `evaluate_ari` at once, in this process.
    start_iter : int
        Number of the first iteration in ``perf`` (to continue an earlier run).
    eval_every : int
        Score the ARI every this many iterations (and at the last); 1: every iteration.

    Returns
    -------
    W : ndarray, shape (M, K)
    H : ndarray, shape (K, N)
    perf : ndarray, shape (niter, 3)
        One row per scored iteration: iteration, MSE ``||X - WH||^2 / (N M)``, ARI of ``H.T``.
    """
    X = _as_csr(X)
    W, H = W.astype(np.float64, copy=True), H.astype(np.float64, copy=True)
    M, N = X.shape
    X_sq = float(X.multiply(X).sum())  # ||X||^2
    perf = PerfRecorder("NMF-SSE", "mse", niter, _labels(adata), scorer, start_iter, eval_every)
    for i in perf:
        H *= (X.T @ W).T / ((W.T @ W) @ H + EPS)  # (K, N)
        XHt = X @ H.T  # (M, K)
        HHt = H @ H.T  # (K, K)
        W *= XHt / (W @ HHt + EPS)  # (M, K)
        sse = X_sq - 2 * np.sum(W * XHt) + np.sum((W.T @ W) * HHt)
        mse = max(sse, 0.0) / (N * M)  # rounding can push a near-zero residual below 0
        perf.record(i, mse, H.T)
    return W, H, perf.table()


def _as_csr(X):
    """X as a float64 CSR matrix (the NMF updates only read its non-zeros)."""
    return sp.csr_matrix(X, dtype=np.float64)


def _labels(adata):
    """The cell types the ARI is computed against, shape (N,); None for unlabelled cells (the
    registry's adapters train without scoring)."""
    return adata.obs[LABEL_KEY].to_numpy() if LABEL_KEY in adata.obs else None


# ------------------------------------------------------------------------------ Question 2


def monitor_perf(perf, objective, path, title=None):
    """Objective (top) and ARI (bottom) against iteration; saved to ``path`` and a PNG twin.

    When the first iterations' values squash the objective's axis (after the first 5% of the
    iterations the curve spans less than a fifth of the axis), an inset redraws the rest of
    the curve on its own scale, so that its later fall or rise can be read.

    Parameters
    ----------
    perf : ndarray, shape (niter, 3)
        Iteration, objective, ARI.
    objective : str
        Name of the objective (y label of the top panel).
    path : str or Path
        Output file, e.g. ``figures/nmf_sse.eps``.
    title : str, optional
        Above the top panel, e.g. the model's name.
    """
    fig, (ax_obj, ax_ari) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    it, values = perf[:, 0], perf[:, 1]
    ax_obj.plot(it, values, color="tab:blue")
    ax_obj.set_ylabel(objective)
    start = _squashed_from(values)
    if start is not None:
        rising = values[-1] > values[0]  # the empty corner: lower right if rising, upper right if falling
        inset = ax_obj.inset_axes([0.42, 0.1 if rising else 0.38, 0.55, 0.5])
        inset.plot(it[start:], values[start:], color="tab:blue")
        inset.set_title(f"from iteration {int(it[start])}, zoomed", fontsize=8)
        inset.tick_params(labelsize=7)
        inset.ticklabel_format(axis="y", useOffset=False)
    if title:
        ax_obj.set_title(title)
    ax_ari.plot(it, perf[:, 2], color="tab:red")
    ax_ari.set_ylabel("ARI")
    ax_ari.set_xlabel("Iteration")
    fig.tight_layout()
    save_figure(fig, path)


def _squashed_from(values, skip=0.05, span=0.2):
    """Index after the first ``skip`` of ``values`` when the rest spans under ``span`` of the whole range, else None."""
    start = max(1, int(len(values) * skip))
    whole = np.ptp(values)
    if len(values) < 20 or whole == 0 or np.ptp(values[start:]) >= span * whole:
        return None
    return start


# ------------------------------------------------------------------------------ Question 3


def nmf_psn(X, W, H, adata, niter=100, scorer=None, start_iter=0, eval_every=1):
    """NMF maximizing the Poisson log-likelihood by multiplicative updates (Lee & Seung 2001).

    With ``Q = X / (WH)``: ``H <- H * (W'Q) / (W'1)``, then ``W <- W * (Q H') / (1 H')``.
    Q is needed only where X != 0 (`cellembed.sparse.sampled_product`), ``W'1`` and ``1 H'`` are
    column and row sums, and ``sum(WH) = <W'1, H1>``, so nothing M x N is ever formed.

    Parameters
    ----------
    X : scipy.sparse matrix or ndarray, shape (M genes, N cells)
        Counts.
    W : ndarray, shape (M, K)
        Initial gene loadings (not modified).
    H : ndarray, shape (K, N)
        Initial cell factors (not modified).
    adata : anndata.AnnData
        The N cells, with ``obs['Celltype']``, for the ARI.
    niter : int
        Iterations.
    scorer : cellembed.evaluation.scoring.ARIScorer, optional
        Scores ``H.T`` every iteration; default: `evaluate_ari` at once, in this process.
    start_iter : int
        Number of the first iteration in ``perf`` (to continue an earlier run).
    eval_every : int
        Score the ARI every this many iterations (and at the last); 1: every iteration.

    Returns
    -------
    W : ndarray, shape (M, K)
    H : ndarray, shape (K, N)
    perf : ndarray, shape (niter, 3)
        One row per scored iteration: iteration, mean Poisson log-likelihood ``sum(X log WH - WH) / (N M)`` (without the
        constant log X!), ARI of ``H.T``.
    """
    X = _as_csr(X)
    W, H = W.astype(np.float64, copy=True), H.astype(np.float64, copy=True)
    M, N = X.shape
    perf = PerfRecorder("NMF-Poisson", "loglik", niter, _labels(adata), scorer, start_iter, eval_every)
    WH = np.maximum(sampled_product(X, W, H), EPS)  # (nnz,): WH where X != 0
    for i in perf:
        Q = with_values(X, X.data / WH)  # X / WH, (M, N) sparse
        H *= (Q.T @ W).T / (W.sum(axis=0)[:, None] + EPS)  # (K, N)
        WH = np.maximum(sampled_product(X, W, H), EPS)
        Q = with_values(X, X.data / WH)
        W *= (Q @ H.T) / (H.sum(axis=1)[None, :] + EPS)  # (M, K)
        WH = np.maximum(sampled_product(X, W, H), EPS)  # reused by the next H update
        loglik = (X.data @ np.log(WH) - W.sum(axis=0) @ H.sum(axis=1)) / (N * M)
        perf.record(i, loglik, H.T)
    return W, H, perf.table()


# ------------------------------------------------------------------------------ Question 4


def build_etm(vocab_size, device="cpu"):
    """The assignment's ETM: K = 16 topics, hidden 256, rho 256, relu, dropout 0.5."""
    return ETM(num_topics=K, vocab_size=vocab_size, t_hidden_size=256, rho_size=256, theta_act="relu",
               embeddings=None, train_embeddings=True, enc_drop=0.5).to(device)


# The course's notebook keeps one global Adam for its model; here, one per model, made on first use.
_OPTIMIZERS = weakref.WeakKeyDictionary()


def assignment_optimizer(model):
    """The assignment's Adam for ``model`` (lr 1e-3, weight decay 1.2e-6), made once per model.

    ``fused=True`` runs the same update as one kernel per parameter group (4x faster on CPU).
    """
    if model not in _OPTIMIZERS:
        _OPTIMIZERS[model] = optim.Adam(model.parameters(), lr=1e-3, weight_decay=1.2e-6, fused=True)
    return _OPTIMIZERS[model]


def train_scETM_helper(model, X_tensor, X_tensor_normalized, optimizer=None, kl_weight=1.0):
    """One full-batch step of Adam on the negative ELBO (provided by the assignment).

    Parameters
    ----------
    model : etm.ETM
    X_tensor : Tensor (N, M) or cellembed.likelihoods.CSRCounts
        Raw counts.
    X_tensor_normalized : Tensor, shape (N, M)
        Counts divided by each cell's total.
    optimizer : torch.optim.Optimizer, optional
        Default: the assignment's Adam (`assignment_optimizer`).
    kl_weight : float
        Weight of the KL term (1: the ELBO; below 1 during a KL warm-up).

    Returns
    -------
    float
        The (weighted) negative ELBO before the step.
    """
    optimizer = optimizer if optimizer is not None else assignment_optimizer(model)
    model.train()
    optimizer.zero_grad()
    model.zero_grad()

    nll, kl_theta = model(X_tensor, X_tensor_normalized)
    loss = nll + kl_weight * kl_theta
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)  # clip gradients to norm 2
    optimizer.step()
    return torch.sum(loss).item()


def get_theta(model, input_x):
    """Topic proportions from the encoder mean, softmax(mu(x)), shape (N, K) (provided)."""
    model.eval()
    with torch.no_grad():
        q_theta = model.q_theta(input_x)
        mu_theta = model.mu_q_theta(q_theta)
        theta = F.softmax(mu_theta, dim=-1)
        return theta


def train_scETM(model, X_tensor, X_tensor_normalized, adata, niter=1000, scorer=None, eval_every=1,
                batch_size=None, optimizer=None, kl_weight=None, desc="ETM"):
    """Train the ETM for ``niter`` full-batch steps, scoring theta after every step.

    Parameters
    ----------
    model : etm.ETM
    X_tensor : Tensor (N, M) or cellembed.likelihoods.CSRCounts
        Raw counts.
    X_tensor_normalized : Tensor, shape (N, M)
        Counts divided by each cell's total.
    adata : anndata.AnnData
        The N cells, with ``obs['Celltype']``, for the ARI.
    niter : int
        Steps.
    scorer : cellembed.evaluation.scoring.ARIScorer, optional
        Scores theta every step; default: `evaluate_ari` at once, in this process.
    eval_every : int
        Score the ARI every this many steps (and at the last); 1: every step.
    batch_size : int, optional
        None (the assignment): every iteration is one step on all cells. Otherwise every
        iteration is one epoch: a step on each of the shuffled minibatches of this many cells
        (for data sets too large for full-batch steps); the NELBO is then the epoch's mean.
    optimizer : torch.optim.Optimizer, optional
        Default: the assignment's Adam (`assignment_optimizer`).
    kl_weight : callable, optional
        ``iteration -> weight`` of the KL term (a warm-up, `cellembed.training.linear_warmup`);
        default 1 throughout, the assignment's ELBO.
    desc : str
        Name on the progress bar and in error messages: ``ETM`` (the course's model) or
        ``scETM (batch-corrected)``.

    Returns
    -------
    model : etm.ETM
    perf : ndarray, shape (niter, 3)
        One row per scored step: iteration, negative ELBO, ARI of theta.
    """
    perf = PerfRecorder(desc, "nelbo", niter, _labels(adata), scorer, eval_every=eval_every)
    n_cells = X_tensor_normalized.shape[0]
    for i in perf:
        weight = 1.0 if kl_weight is None else kl_weight(i)
        if batch_size is None or batch_size >= n_cells:
            nelbo = train_scETM_helper(model, X_tensor, X_tensor_normalized, optimizer, weight)
        else:
            batches = torch.randperm(n_cells).split(batch_size)
            nelbo = float(np.mean([train_scETM_helper(model, _rows(X_tensor, b), X_tensor_normalized[b],
                                                      optimizer, weight) for b in batches]))
        theta = get_theta(model, X_tensor_normalized)  # (N, K)
        perf.record(i, nelbo, theta.cpu().numpy())
    return model, perf.table()


def _rows(counts, index):
    """Rows ``index`` of a dense count tensor or of `CSRCounts`."""
    return counts.rows(index) if isinstance(counts, CSRCounts) else counts[index]


def normalized_counts(adata, device="cpu"):
    """Raw counts and each cell's counts divided by its total, as the ETM takes them.

    Returns
    -------
    X_tensor : cellembed.likelihoods.CSRCounts, shape (N, M)
    X_tensor_normalized : Tensor, shape (N, M), float32, rows summing to 1
    """
    X_tensor = CSRCounts(adata.X, device=device)
    totals = X_tensor.row_sums()  # (N,), > 0: empty cells were dropped at loading
    values = X_tensor.values / totals.repeat_interleave(X_tensor.crow.diff())
    return X_tensor, X_tensor.csr(values).to_dense()


# ------------------------------------------------------------------------------ Question 5


def plot_ari_curves(curves, path, title=None):
    """ARI against iteration for several models on one axis.

    Long curves (200 iterations or more) are drawn twice: every iteration in a light tone,
    and over it a centred rolling mean of ``len / 40`` iterations in the full colour, so that
    a noisy curve does not hide the others (EPS has no transparency: the light tone is the
    colour mixed with white).

    Parameters
    ----------
    curves : dict of str -> ndarray (niter, 3)
        Model name -> perf table.
    path : str or Path
    title : str, optional
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    longest = max(len(perf) for perf in curves.values())
    window = longest // 40 if longest >= 200 else 1
    colors = dict(zip(curves, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    if window > 1:
        for name, perf in curves.items():  # first every raw curve, then every mean above them all
            light = 0.35 * np.asarray(mcolors.to_rgb(colors[name])) + 0.65  # 35% colour, 65% white
            ax.plot(perf[:, 0], perf[:, 2], color=light, linewidth=0.8)
    for name, perf in curves.items():
        ari = pd.Series(perf[:, 2]).rolling(window, center=True, min_periods=1).mean() if window > 1 else perf[:, 2]
        ax.plot(perf[:, 0], ari, color=colors[name], label=name, linewidth=1.6 if window > 1 else 1.5)
    ax.set_xlabel("Iteration")
    ax.set_ylabel("ARI")
    if title:
        ax.set_title(title)
    legend_title = (f"light: every iteration; dark: mean of {window}" if window > 1 else None)
    ax.legend(framealpha=1, title=legend_title, title_fontsize=8)  # EPS has no transparency
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------ Question 6


def celltype_palette(adata, key=LABEL_KEY):
    """One colour per cell type, kept once in ``adata.uns[key + '_colors']`` for every figure.

    scanpy's convention: the list follows ``adata.obs[key].cat.categories``, and
    ``sc.pl.embedding`` reads it from there. Made once (scanpy's default palette for that many
    categories) when absent or of the wrong length.

    Returns
    -------
    dict of str -> str
        Cell type -> hex colour (the values of ``adata.uns[key + '_colors']``).
    """
    if not isinstance(adata.obs[key].dtype, pd.CategoricalDtype):
        adata.obs[key] = adata.obs[key].astype("category")
    names = list(adata.obs[key].cat.categories)
    colors = adata.uns.get(f"{key}_colors")
    if colors is None or len(colors) != len(names):
        adata.uns[f"{key}_colors"] = list(_default_colors(len(names)))
    return dict(zip(names, adata.uns[f"{key}_colors"]))


def _default_colors(n):
    """scanpy's default palette for ``n`` categories (what ``sc.pl`` would pick by itself)."""
    palettes = sc.pl.palettes
    return (palettes.default_20 if n <= 20 else palettes.default_28 if n <= 28 else palettes.default_102)[:n]


def plot_tsne(adata, reps, path, seed=0):
    """t-SNE (``sc.tl.tsne``) of several embeddings, side by side, coloured by cell type.

    The colours are ``adata.uns['Celltype_colors']`` (`celltype_palette`), the clustermap's.

    Parameters
    ----------
    adata : anndata.AnnData
        With the embeddings in ``obsm`` and ``obs['Celltype']``; each t-SNE is stored as
        ``obsm['X_tsne_<rep>']``.
    reps : dict of str -> str
        ``obsm`` key -> panel title.
    path : str or Path
    seed : int
        t-SNE random state.
    """
    def tsne(rep):
        one = anndata.AnnData(X=np.zeros((adata.n_obs, 0), dtype=np.float32), obsm={rep: adata.obsm[rep]})
        sc.tl.tsne(one, use_rep=rep, random_state=seed, n_jobs=1)
        return one.obsm["X_tsne"]  # (N, 2)

    # one t-SNE per core, each single-threaded: sklearn's gradient releases the GIL, and
    # single-threaded OpenMP never waits on a core that another process holds
    with ThreadPoolExecutor(max_workers=min(len(reps), available_cores())) as pool:
        layouts = dict(zip(reps, pool.map(tsne, reps)))
    celltype_palette(adata)  # the one palette, in adata.uns['Celltype_colors']
    fig, axes = plt.subplots(1, len(reps), figsize=(6.5 * len(reps), 5.5))
    axes = np.atleast_1d(axes)
    for ax, (rep, title) in zip(axes, reps.items()):
        basis = f"X_tsne_{rep.removeprefix('X_')}"
        adata.obsm[basis] = layouts[rep]
        sc.pl.embedding(adata, basis=basis, color=LABEL_KEY, ax=ax, show=False, title=title, frameon=False)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------ Question 7


def plot_cells_topics(theta, cell_types, path, palette=None, title="ETM theta"):
    """Cells x topics heatmap of theta, clustered, rows coloured by cell type.

    The heatmap's cells and the row colours are rasterized inside the vector figure (one
    image instead of N x K rectangles); axes, labels and dendrograms stay vector.

    Parameters
    ----------
    theta : ndarray, shape (N, K)
    cell_types : array-like, shape (N,)
    path : str or Path
    palette : dict of str -> colour, optional
        Cell type -> colour: the t-SNE's, ``celltype_palette(adata)``. Default: scanpy's default
        palette over the sorted cell types, which is what `celltype_palette` makes.
    title : str
        What theta is called in the title (the model's name).
    """
    cell_types = pd.Series(np.asarray(cell_types), name="cell type")
    names = sorted(cell_types.unique())
    if palette is None:
        palette = dict(zip(names, _default_colors(len(names))))
    frame = pd.DataFrame(theta, columns=[f"topic {k}" for k in range(theta.shape[1])])
    grid = sns.clustermap(frame, cmap="Reds", row_colors=cell_types.map(palette).to_numpy(),
                          yticklabels=False, figsize=(8, 9), cbar_kws={"label": "theta"})
    for ax in (grid.ax_heatmap, grid.ax_row_colors):
        _mesh_as_image(ax)
    grid.ax_heatmap.set_ylabel("")
    grid.ax_col_dendrogram.set_title(f"{title}: {frame.shape[0]} cells x {frame.shape[1]} topics")
    grid.figure.legend(handles=[Patch(facecolor=palette[n], label=n) for n in names],
                       title="cell type", loc="center left", bbox_to_anchor=(0.98, 0.5), frameon=False)
    save_figure(grid.figure, path)


def _mesh_as_image(ax):
    """Redraw ``ax``'s heatmap (a QuadMesh of rows x columns rectangles) as one embedded image.

    With ``interpolation='none'`` a vector backend embeds the image at its own resolution, one
    pixel per cell (1886 x 16 for theta): the EPS holds the same cells in a small fraction of
    the bytes of 30,000 rectangles, and the colour bar, still tied to the hidden mesh, is unchanged.
    """
    mesh = ax.collections[0]
    rows, cols = (n - 1 for n in mesh.get_coordinates().shape[:2])  # corners: (rows + 1, cols + 1, 2)
    values = np.asarray(mesh.get_array()).reshape(rows, cols)
    ax.imshow(values, cmap=mesh.get_cmap(), norm=mesh.norm, aspect="auto", interpolation="none",
              extent=(0, cols, rows, 0))
    mesh.set_visible(False)


# ------------------------------------------------------------------------------ Question 8


def top_genes(beta, genes, n_top=5):
    """The ``n_top`` most probable genes of every topic.

    Parameters
    ----------
    beta : ndarray, shape (K, M)
    genes : sequence of str, length M

    Returns
    -------
    list of list of str
        ``K`` lists of ``n_top`` gene names, most probable first.
    """
    order = np.argsort(-beta, axis=1)[:, :n_top]
    return [[genes[j] for j in row] for row in order]


def plot_top_genes(beta, genes, path, n_top=5, title="ETM"):
    """Heatmap of beta for the top ``n_top`` genes of every topic (rows), topics (columns).

    The colours stop at the assignment's ``vmax=0.2``; the colour bar's arrow marks that
    larger values (Gcg reaches about 0.6) are drawn in the top colour.

    Parameters
    ----------
    beta : ndarray, shape (K, M)
    genes : sequence of str, length M
    path : str or Path
    title : str
        The model's name, in the title.
    """
    gene_index = {g: j for j, g in enumerate(genes)}
    rows = list(dict.fromkeys(g for topic in top_genes(beta, genes, n_top) for g in topic))
    frame = pd.DataFrame(beta[:, [gene_index[g] for g in rows]].T, index=rows,
                         columns=[str(k) for k in range(beta.shape[0])])
    fig, ax = plt.subplots(figsize=(7, max(6, 0.16 * len(rows))))
    sns.heatmap(frame, vmax=0.2, cmap="Reds", ax=ax, yticklabels=True,
                cbar_kws={"label": "beta (topic-gene probability)", "extend": "max"})
    ax.set_title(f"{title}: top {n_top} genes of each topic", fontsize=10)
    ax.set_xlabel("topic")
    ax.set_ylabel(f"top {n_top} genes of each topic")
    ax.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def alpha_topic(theta, cell_types, beta, genes, n_top=5):
    """The topic most specific to alpha cells and its top genes (the assignment expects Gcg).

    Returns
    -------
    dict
        ``topic``, ``top_genes``, ``gcg_in_top_genes``.
    """
    is_alpha = np.asarray(cell_types) == "alpha"
    if not is_alpha.any():
        return {"topic": None, "top_genes": [], "gcg_in_top_genes": False}
    # mean theta in alpha cells over mean theta elsewhere; 1e-12 guards an all-zero topic
    enrichment = theta[is_alpha].mean(0) / (theta[~is_alpha].mean(0) + 1e-12)
    k = int(np.argmax(enrichment))
    genes_k = top_genes(beta, genes, n_top)[k]
    return {"topic": k, "top_genes": genes_k, "gcg_in_top_genes": "Gcg" in genes_k}


# ------------------------------------------------------------------------------ main


# What the figures, progress bars and printed lines call the model of Q4-Q8 (``--model``).
MODEL_NAMES = {"etm": "ETM", "scetm": "scETM (batch-corrected)"}
PSN_OBJECTIVE = "mean of x log(WH) - WH\n(Poisson log-likelihood without -log x!)"


def perf_frame(perf, objective):
    return pd.DataFrame({"iter": perf[:, 0].astype(int), objective: perf[:, 1], "ari": perf[:, 2]})


def make_etm_model(args, adata):
    """The model of Q4-Q8 (``--model``), with its optimizer and KL-weight schedule.

    Returns
    -------
    model : etm.ETM or etm.BatchETM
    optimizer : torch.optim.Optimizer or None
        None: the assignment's Adam.
    kl_weight : callable or None
        None: the ELBO's weight 1 throughout.
    """
    if args.model == "etm":
        return build_etm(adata.n_vars, args.device), None, None
    cfg = SCETMConfig()
    model = BatchETM(adata.n_vars, batch_codes(adata.obs["batch"]), num_topics=cfg.num_topics).to(args.device)
    optimizer = optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, optimizer, linear_warmup(cfg.kl_warmup)


def run(args, progress):
    """The eight questions in order; ``progress`` records finished stages and timings."""
    if args.download is not None:
        from cellembed.data.download import build_course_folder

        build_course_folder(args.data_dir, source=args.download)
    adata = load_data(args.data_dir)
    fig_dir = prepare_dir(args.figures_dir)
    print(f"{adata.n_obs} cells x {adata.n_vars} genes from {os.path.abspath(args.data_dir)}; Q4-Q8 with the "
          f"{MODEL_NAMES[args.model]} on {args.device} ({args.precision} encoder); {args.jobs} ARI worker(s), "
          f"training threads: {args.training_threads['nmf']} NMF, {args.training_threads['etm']} ETM; outputs in "
          f"{fig_dir.absolute()}", flush=True)
    seed_everything(args.seed)
    # Training shares the cores with the scoring workers (`split_cores`: the NMF stages keep
    # a share, the ETM takes every core).
    set_training_threads(args.training_threads["nmf"])
    genes = adata.var_names.to_list()
    cell_types = adata.obs[LABEL_KEY].to_numpy()
    M, N = adata.n_vars, adata.n_obs
    X = adata.X.T.tocsr().astype(np.float64)  # genes x cells, as the assignment writes X
    name = MODEL_NAMES[args.model]
    palette = celltype_palette(adata)  # one colour per cell type, in adata.uns, for every figure

    # workers first: they fork before torch has started any thread pool
    with ARIScorer(cell_types, seed=args.seed, n_workers=args.jobs) as scorer:
        W_init, H_init = init_factors(M, N, args.seed)

        # Q1 + Q2
        t0 = time.perf_counter()
        every = args.eval_every
        W_sse, H_sse, perf_sse = nmf_sse(X, W_init, H_init, adata, args.niter_nmf, scorer, eval_every=every)
        seconds = time.perf_counter() - t0
        write_csv(perf_frame(perf_sse, "mse"), fig_dir / "perf_nmf_sse.csv")
        monitor_perf(perf_sse, "MSE", fig_dir / "nmf_sse.eps", title="NMF-SSE")
        progress.stage("nmf_sse", seconds, perf_sse, "Q1-Q2 NMF-SSE", "MSE")  # finished = files written

        # Q3
        t0 = time.perf_counter()
        W_psn, H_psn, perf_psn = nmf_psn(X, W_init, H_init, adata, args.niter_nmf, scorer, eval_every=every)
        seconds = time.perf_counter() - t0
        write_csv(perf_frame(perf_psn, "poisson_loglik"), fig_dir / "perf_nmf_psn.csv")
        monitor_perf(perf_psn, PSN_OBJECTIVE, fig_dir / "nmf_psn.eps", title="NMF-Poisson")
        plot_ari_curves({"NMF-SSE": perf_sse, "NMF-Poisson": perf_psn}, fig_dir / "nmf_sse_vs_psn.eps",
                        title="NMF-SSE and NMF-Poisson")
        progress.stage("nmf_psn", seconds, perf_psn, "Q3 NMF-Poisson", "log-likelihood")

        # Q4
        t0 = time.perf_counter()
        set_training_threads(args.training_threads["etm"])
        X_tensor, X_tensor_normalized = normalized_counts(adata, args.device)
        model, optimizer, kl_weight = make_etm_model(args, adata)
        model.set_encoder_bf16(args.precision == "bf16")
        model, perf_etm = train_scETM(model, X_tensor, X_tensor_normalized, adata, args.niter_etm, scorer,
                                      eval_every=every, batch_size=args.etm_batch_size,
                                      optimizer=optimizer, kl_weight=kl_weight, desc=name)
        seconds = time.perf_counter() - t0
        write_csv(perf_frame(perf_etm, "nelbo"), fig_dir / "perf_scETM.csv")
        monitor_perf(perf_etm, "NELBO", fig_dir / "scETM_train.eps", title=f"{name} ({args.precision} encoder)")
        progress.stage("etm", seconds, perf_etm, f"Q4 {name}", "NELBO")

        # Q5: the long run continues the 100-iteration run: the updates are deterministic,
        # so its first iterations are exactly Q3's.
        set_training_threads(args.training_threads["nmf"])
        t0 = time.perf_counter()
        if args.niter_long > args.niter_nmf:
            W_long, H_long, perf_more = nmf_psn(X, W_psn, H_psn, adata, args.niter_long - args.niter_nmf,
                                                scorer, start_iter=args.niter_nmf, eval_every=every)
            perf_long = np.vstack([perf_psn, perf_more])
        else:
            W_long, H_long, perf_long = nmf_psn(X, W_init, H_init, adata, args.niter_long, scorer,
                                                eval_every=every)
        seconds_long = time.perf_counter() - t0
    progress.summary["ari_scoring"] = dict(scorer.stats(), workers=args.jobs,
                                         training_threads=args.training_threads)
    write_csv(perf_frame(perf_long, "poisson_loglik"), fig_dir / "perf_nmf_psn_1000.csv")
    monitor_perf(perf_long, PSN_OBJECTIVE, fig_dir / "nmf_psn_1000.eps",
                 title=f"NMF-Poisson, {args.niter_long} iterations")
    plot_ari_curves({"NMF-Poisson": perf_long, name: perf_etm}, fig_dir / "nmf_psn_vs_scETM.eps",
                    title=f"NMF-Poisson and {name}")
    progress.stage("nmf_psn_1000", seconds_long, perf_long, f"Q5 NMF-Poisson, {args.niter_long} iterations",
                   "log-likelihood")

    # Q6-Q8
    t0 = time.perf_counter()
    theta = get_theta(model, X_tensor_normalized).cpu().numpy()
    beta = model.get_beta().detach().cpu().numpy()  # (K, M)
    adata.obsm["X_nmf_sse"] = H_sse.T
    adata.obsm["X_nmf_psn"] = H_psn.T
    adata.obsm["X_etm"] = theta
    adata.obsm["X_nmf_psn_1000"] = H_long.T
    adata.obsm.pop("cell_embed", None)
    plot_tsne(adata, {"X_etm": f"{name} theta", "X_nmf_psn_1000": f"NMF-Poisson H ({args.niter_long} iterations)"},
              fig_dir / "tsne_scETM_vs_nmf.eps", seed=args.seed)
    plot_cells_topics(theta, cell_types, fig_dir / "cells_topics_heatmap.eps", palette, title=f"{name} theta")
    plot_top_genes(beta, genes, fig_dir / "topics_top_genes_heatmap.eps", title=f"{name} beta")
    progress.stage("figures", time.perf_counter() - t0, label="Q6-Q8 figures")

    adata.varm["etm_beta"] = beta.T
    adata.varm["W_nmf_sse"] = W_sse
    adata.varm["W_nmf_psn"] = W_psn
    adata.varm["W_nmf_psn_1000"] = W_long
    progress.summary.update({
        "final_ari": {"nmf_sse": perf_sse[-1, 2], "nmf_psn": perf_psn[-1, 2],
                      "etm": perf_etm[-1, 2], "nmf_psn_1000": perf_long[-1, 2]},
        "alpha_topic": alpha_topic(theta, cell_types, beta, genes),
    })
    adata.uns["summary"] = cli.jsonable({k: v for k, v in progress.summary.items() if k != "alpha_topic"})
    write_h5ad(adata, fig_dir / "mp_results.h5ad")
    return progress.summary


def set_training_threads(n):
    """Threads for torch and for BLAS/OpenMP (numpy, scipy) in this process."""
    torch.set_num_threads(n)
    threadpool_limits(n)


def _scetm_summary():
    from dataclasses import asdict

    return {"name": "scETM, batch-corrected", **asdict(SCETMConfig())}


def main(argv=None, args=None):
    """Run the assignment; returns the exit code (0, 1 numerical or output error, 2 bad input, 130 Ctrl-C)."""
    args = args if args is not None else cli.parse_assignment_args(argv)
    cli.quiet_known_warnings("comp565_A4.py")
    sc.settings.verbosity = 0
    try:
        args.device = resolve_device(args.device)
    except ValueError as exc:
        sys.stderr.write(f"comp565_A4.py: error: argument --device: {exc} (see --help)\n")
        return 2
    args.precision = "bf16" if use_bf16(args.precision, args.device) else "fp32"
    default_jobs, nmf_threads, etm_threads = split_cores()
    args.jobs = default_jobs if args.jobs is None else args.jobs
    if args.threads is not None:  # the user's count, for every stage
        nmf_threads = etm_threads = args.threads
    elif args.jobs == 0:
        nmf_threads = etm_threads = available_cores()
    args.training_threads = {"nmf": nmf_threads, "etm": etm_threads}  # args.threads stays the flag
    progress = cli.Progress({
        "seed": args.seed,
        "iterations": {"nmf_sse": args.niter_nmf, "nmf_psn": args.niter_nmf,
                       "etm": args.niter_etm, "nmf_psn_1000": args.niter_long},
        "eval_every": args.eval_every,
        "device": str(args.device),
        "precision": args.precision,
        "etm_model": {"name": "ETM (course)"} if args.model == "etm" else _scetm_summary(),
    })
    summary_path = os.path.join(args.figures_dir, "summary.json")
    try:
        summary = run(args, progress)
    except KeyboardInterrupt:
        done = ", ".join(progress.summary["stages_finished"]) or "none"
        if os.path.isdir(args.figures_dir):
            progress.write(summary_path, interrupted=True)
        cli.report_interrupt(f"\ninterrupted; finished stages: {done} (their files are complete)")
        return 130
    except (DataError, OSError, FloatingPointError, RuntimeError) as exc:  # NotADirectoryError is an OSError
        if progress.summary["stages_finished"]:
            progress.write(summary_path, interrupted=False, error=str(exc))
        sys.stderr.write(f"comp565_A4.py: error: {exc}\n")
        return 1 if not isinstance(exc, DataError) else 2
    summary = progress.write(summary_path)
    ari = summary["final_ari"]
    names = {"nmf_sse": "NMF-SSE", "nmf_psn": "NMF-Poisson", "etm": MODEL_NAMES[args.model],
             "nmf_psn_1000": f"NMF-Poisson ({args.niter_long})"}
    print("final ARI: " + ", ".join(f"{names[k]} {v:.3f}" for k, v in ari.items())
          + f"; total {summary['wall_seconds']['total']:.1f} s; outputs in {args.figures_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(args=ARGS))
