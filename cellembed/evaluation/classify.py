"""The cell-type classifier study (``compare.py --classify``): how well a small feed-forward
network predicts the labelled types from (a) the raw counts, (b) PCA of the standardized counts
with k = 10, 25, 50, 100 components, (c) the latent space of every model in the run.

The source (``../shared/references/scvae_gmvae_classifier.txt``, Bolos et al., table 2): one
hidden layer of 516 ReLU units, softmax output, Xavier (Glorot) initialization, Adam 1e-4,
batch 10, 100 epochs, cross-entropy; a random 80 / 10 / 10 split (ours stratified by type, drawn
by the seed). The source trains the full 100 epochs and reports overfitting (its figure 3);
we keep the parameters of the epoch with the lowest validation loss and stop once it has not
improved for ``patience`` epochs (early stopping on the validation split; ``patience=None``
gives the source's fixed 100 epochs). Scores on the test split: accuracy, balanced accuracy,
macro F1.

Memory grows with the batch, not with the cells: the raw counts stay CSR and each minibatch's
dense rows are built when it is drawn (`cellembed.data.minibatch.SparseRows`; the validation
loss and the test predictions in row chunks), and the PCA inputs come from the sparse counts
scaled per gene, centred implicitly by ARPACK (no dense N x M array, unlike the source's
StandardScaler on a dense matrix; the components are the same to the solver's tolerance).
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

from cellembed.data.checks import LABEL_KEY
from cellembed.data.minibatch import SparseRows, embed_batch_size
from cellembed.outputs import atomic_path, prepare_dir, save_figure, write_csv
from cellembed.training import predict, seed_everything, train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PCA_KS = (10, 25, 50, 100)  # the source's k (and its latent dimensions), section 2.3
HIDDEN = 516  # the source's table 2
EPOCHS = 100  # table 2
BATCH_SIZE = 10  # table 2
LR = 1e-4  # table 2, Adam
PATIENCE = 10  # epochs without a lower validation loss before stopping (ours; see the docstring)


def split_indices(labels, seed, fractions=(0.8, 0.1, 0.1)):
    """Stratified train / validation / test row indices of ``labels`` (N,), drawn by ``seed``.

    Types with too few cells to stratify (fewer than 2 per split) are split at random.
    """
    labels = np.asarray(labels)
    rows = np.arange(labels.size)
    counts = pd.Series(labels).value_counts()
    strat = labels if counts.min() >= 10 else None
    train_rows, rest = train_test_split(rows, train_size=fractions[0], random_state=seed, stratify=strat)
    rest_strat = labels[rest] if strat is not None else None
    valid_rows, test_rows = train_test_split(rest, test_size=fractions[2] / (fractions[1] + fractions[2]),
                                             random_state=seed, stratify=rest_strat)
    return train_rows, valid_rows, test_rows


def classifier(n_in, n_classes, hidden=HIDDEN):
    """One hidden ReLU layer, Xavier-initialized weights, zero biases; outputs logits (softmax in the loss)."""
    net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
    for layer in (net[0], net[2]):
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return net


def _cross_entropy(module, batch, kl_weight):
    x, y = batch
    loss = nn.functional.cross_entropy(module(x), y)
    return loss, {}


def fit_classifier(x, y, split, seed, *, epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, patience=PATIENCE,
                   hidden=HIDDEN):
    """Train the source's classifier on ``x[train]`` and score it on ``x[test]``.

    Parameters
    ----------
    x : ndarray, shape (N, D), or scipy.sparse.csr_matrix (N, D)
        Sparse rows (the raw counts) are made dense one minibatch at a time.
    y : ndarray of int, shape (N,)
        Class codes 0..C-1.
    split : tuple of 3 int ndarrays
        Train, validation, test rows.
    seed : int
    patience : int or None
        Early stopping on the validation loss (restoring the best epoch); None: all epochs.

    Returns
    -------
    dict
        ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``epochs`` (trained), ``predicted``
        (test predictions, int ndarray).
    """
    train_rows, valid_rows, test_rows = split
    seed_everything(seed)
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)

        def rows(index):  # (n, D) rows built per batch
            return SparseRows(x[index])
        chunk = embed_batch_size(x.shape[1])
    else:
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))

        def rows(index):
            return x[index]
        chunk = None
    y = torch.as_tensor(np.asarray(y, dtype=np.int64))
    net = classifier(x.shape[1], int(y.max()) + 1, hidden)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    history = train(net, _cross_entropy, (rows(train_rows), y[train_rows]), optimizer, epochs=epochs,
                    batch_size=batch_size, seed=seed, valid_data=(rows(valid_rows), y[valid_rows]),
                    valid_batch_size=chunk, patience=patience, desc="classifier")
    test = rows(test_rows)
    predicted = predict(net, test, **({} if chunk is None else {"batch_size": chunk})).argmax(1)
    truth = y[test_rows].numpy()
    return {"accuracy": float(accuracy_score(truth, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
            "macro_f1": float(f1_score(truth, predicted, average="macro")),
            "epochs": len(history), "predicted": predicted}


def pca_inputs(X, ks=PCA_KS, seed=0):
    """PCA of the standardized counts (the source's StandardScaler), the first k components for each k.

    The counts stay sparse: each gene is divided by its standard deviation (StandardScaler's,
    ddof 0; 1 for a constant gene) and ARPACK centres them implicitly.

    Parameters
    ----------
    X : scipy.sparse matrix or ndarray, shape (N, M)
        Raw counts.
    seed : int
        ARPACK's starting vector.

    Returns
    -------
    dict
        k -> ndarray (N, k) float64; k above min(N, M) - 1 is left out.
    """
    X = sp.csr_matrix(X, dtype=np.float64)  # (N, M); float64 as StandardScaler's output
    scaled = X @ sp.diags(1.0 / StandardScaler(with_mean=False).fit(X).scale_)  # (N, M) CSR
    k_max = min(max(ks), min(X.shape) - 1)
    scores = PCA(n_components=k_max, svd_solver="arpack", random_state=seed).fit_transform(scaled)
    return {k: scores[:, :k] for k in ks if k <= k_max}


def classification_study(adata, latents, seeds, out_dir, **options):
    """Train and score the classifier on raw counts, PCA-k and every model's latent, per seed.

    Parameters
    ----------
    adata : AnnData
        Raw counts ``X`` (N x M), labels ``obs['Celltype']``.
    latents : dict
        Model label -> {seed: ndarray (N, d)}, the latent of that model's fit with that seed.
    seeds : iterable of int
        Each seed draws a split and the classifier's initialization.
    out_dir : path
        Gets ``classification.csv`` (one row per input and seed), ``classification.md`` (mean +- sd)
        and ``confusion.png`` (the test confusion matrix of the input with the best mean accuracy,
        first seed).
    **options
        Passed to `fit_classifier` (``epochs``, ``batch_size``, ``lr``, ``patience``, ``hidden``).

    Returns
    -------
    pandas.DataFrame
        Columns ``input`` (raw, pca, latent), ``variant`` (k or the model label), ``seed``,
        ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``epochs``.
    """
    out_dir = prepare_dir(out_dir, "classification output folder")
    seeds = list(seeds)
    names = adata.obs[LABEL_KEY].astype("category")
    y = names.cat.codes.to_numpy()
    classes = list(names.cat.categories)
    inputs = [("raw", "counts", sp.csr_matrix(adata.X, dtype=np.float32))]
    inputs += [("pca", str(k), z) for k, z in pca_inputs(adata.X).items()]
    rows, predictions = [], {}
    for seed in seeds:
        split = split_indices(y, seed)
        per_seed = inputs + [("latent", label, np.asarray(by_seed[seed]))
                             for label, by_seed in latents.items() if seed in by_seed]
        for kind, variant, x in per_seed:
            values = x.data if sp.issparse(x) else x
            assert x.shape[0] == y.size and np.isfinite(values).all(), f"{kind} {variant}: bad input of shape {x.shape}"
            result = fit_classifier(x, y, split, seed, **options)
            predictions.setdefault((kind, variant), (y[split[2]], result.pop("predicted")))
            rows.append({"input": kind, "variant": variant, "seed": seed, **result})
    table = pd.DataFrame(rows)
    write_csv(table, out_dir / "classification.csv")
    summary = summarize(table)
    with atomic_path(out_dir / "classification.md") as tmp:
        tmp.write_text(summary + "\n")
    best = table.groupby(["input", "variant"], sort=False)["accuracy"].mean().idxmax()
    plot_confusion(*predictions[best], classes, f"{best[0]} {best[1]} (seed {seeds[0]}, test split)",
                   out_dir / "confusion.png")
    return table


def summarize(table):
    """A markdown table of mean +- sd over seeds per input."""
    metrics = ["accuracy", "balanced_accuracy", "macro_f1", "epochs"]
    lines = ["| input | k / model | seeds | " + " | ".join(metrics) + " |", "|---" * (3 + len(metrics)) + "|"]
    for (kind, variant), group in table.groupby(["input", "variant"], sort=False):
        cells = []
        for m in metrics:
            sd = group[m].std(ddof=1) if len(group) > 1 else 0.0
            cells.append(f"{group[m].mean():.3f} +- {sd:.3f}" if m != "epochs" else f"{group[m].mean():.0f}")
        lines.append(f"| {kind} | {variant} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_confusion(truth, predicted, classes, title, path):
    """Row-normalized confusion matrix (true type x predicted type) saved to ``path``."""
    matrix = confusion_matrix(truth, predicted, labels=np.arange(len(classes))).astype(float)
    # rows of types absent from the test split stay 0 (max(1, .) guards the division)
    matrix /= np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.5 * len(classes) + 3, 0.5 * len(classes) + 2.5))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted type")
    ax.set_ylabel("true type")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    save_figure(fig, path, png_twin=False)
