"""JAE, the joint-embedding autoencoder of RNA + protein or RNA + chromatin (registry ``jae``),
and the competition organisers' PCA baseline of the concatenated modalities (``pca_joint``).

Source: Liu, Zeng & Xu (team Amateur), first in the joint-embedding task of the NeurIPS 2021
multimodal single-cell competition (``../shared/references/jae_multimodal_autoencoder.txt``; code
in openproblems-bio/neurips2021_multimodal_topmethods, ``src/joint_embedding/methods/jae``:
``train/script.py`` and ``resources/utils.py``, cited below as "train" and "utils"). Our defaults:

- input (train ``preprocess``): per modality, each cell L1-normalized, x 1e4, ``log10(1 + x)``;
  TruncatedSVD to 100 dimensions (``random_state=123``) for RNA and ATAC, proteins unreduced;
  the two blocks concatenated;
- encoder (utils ``create_encoder``): three residual blocks of 150, 120, 100 units, each
  ``h = ReLU(Dense(x)); y = ReLU(Dense(BN(Dropout_0.1(h))) + h)``, then ``ReLU(Dense)`` to the latent
  of ``n_cell_types + n_batches + 2 + 5`` units; decoder (``create_decoder``): ReLU layers of 100,
  120, 150 units and a ReLU output of the input's size;
- the latent's first slices (``create_classifier``) are the logits of the cell type
  (cross-entropy), the logits of the batch (cross-entropy against the uniform distribution, so that
  the batch cannot be told: ``random_classification_loss``), the S and G2M cell-cycle scores (MSE;
  ``scanpy.tl.score_genes_cell_cycle`` on the scaled log expression with the 43 S and 54 G2M
  Tirosh et al. markers, ``cellembed/data/cell_cycle_genes.csv``), and 5 free units;
- loss ``0.7 MSE(recon) + 0.2 CE(type) + 0.05 CE(uniform, batch) + 0.05 MSE(phase)``; Adam 1e-4
  (Keras' epsilon 1e-7), batch 32, at most 500 epochs, early stopping with patience 5 on the loss of
  a 10% validation split, keeping the best epoch's weights; Keras' initialization (Glorot-uniform
  weights, zero biases) and batch-norm constants (momentum 0.99, epsilon 1e-3).

Labels enter training (``supervised = True``). Deviations, each forced by our setting: the source
fits its SVDs on the unlabelled test cells and trains on separate labelled "exploration" cells,
then fine-tunes on the test cells with the reconstruction loss only; we have one labelled set, so
the SVDs and the network are fit on the labelled cells, and any cells (those or new ones, with the
same genes and second-modality features) are embedded by them, without fine-tuning. The source
scores the cell cycle on the exploration set's size-factor-normalized expression; we use ``log1p``
of counts normalized to 1e4 per cell (`cellembed.preprocessing.log_normalize`), then scale. A data
set without a batch column (or with one batch) has no batch slice and no batch loss; one whose
genes include no S or no G2M marker (e.g. an ``.h5`` file, which stores no gene names) has no phase
slice and no phase loss (a warning says so). The last partial minibatch of an epoch is skipped when
it would hold a single cell (batch norm needs two). Above 20,000 cells the epochs shrink as 1 / N
(``scale_epochs``, scvi-tools' rule, as for the other minibatch models): the source's 500 epochs of
batch 32 grow linearly with N. Sparse counts stay sparse through the normalization and the SVDs
(the same normalized values; the SVD's products round differently from dense ones); the cell-cycle
scores are scanpy's ``score_genes_cell_cycle`` on the scaled expression bit for bit, computed from
column blocks of it and the markers' and control genes' columns (`cell_cycle_scores`), where scanpy
reads a dense N x M z-scored copy (400 MB at 100,000 cells of 1,000 genes). Adam runs over one flat
buffer of the parameters (`cellembed.training.FlatAdam`: torch's Adam bit for bit, a quarter less
time per step of 32 cells).

Measured (issue 22; docs/results.md, `python compare.py --data neurips_cite --data-root
../shared/data --no-tsne --seeds 0 1 2 3 4 --models jae,pca_joint`, and ``--data neurips_multiome``;
2-core AMD EPYC, 2026-12-05), the competition's joint mean score: CITE 0.706 +- 0.068 against
``pca_joint``'s 0.783 +- 0.001, Multiome 0.582 +- 0.071 against 0.621 +- 0.001 (the source, on
the competition's full test sets of tens of thousands of cells: 0.8039 and 0.8424). On CITE JAE is
above the baseline on every metric but trajectory conservation (nmi 0.822 against 0.785, asw_label
0.639 / 0.556, asw_batch 0.838 / 0.766, graph_conn 0.953 / 0.938, cc_cons 0.806 / 0.798), and
``ti_cons_batch_mean`` decides: 0.176 +- 0.394 against 0.854, because scib scores 0 when no cell of
the earliest type lies in the largest connected component of the neighbour graph restricted to the
cells with a pseudotime (about 15% of these 600- and 500-cell subsets); JAE's label-separated
latent splits that small graph on four CITE seeds of five (seed 1: 0.881, mean score 0.820). On
Multiome it is above on nmi, asw_label, asw_batch and cc_cons, below on graph_conn (0.802 / 0.842)
and ti_cons (0.412 / 0.678).

The organisers' baseline (openproblems-bio/neurips2021_multimodal_viash,
``src/joint_embedding/methods/baseline_pca``): per modality the 1,000 features of largest standard
deviation, concatenated, and the first 10 principal components (``irlba::prcomp_irlba``, centred,
not scaled). Their input was the organisers' normalized ``X``; ours is JAE's normalization of the
raw counts of each modality, ``log10(1 + 1e4 x / total)`` (we keep raw counts only), so that the
two differ only in the model. New cells are projected on the fit cells' features, mean and
components. As ``prcomp_irlba``, the PCA never centres a dense copy of the data: the kept
features stay sparse, the principal axes come from their D x D covariance in float64 (sklearn's
``covariance_eigh``), and a cell's components are ``Z @ loadings - mean @ loadings``. (Until
2026-12-05 the blocks were made dense and PCA's full SVD ran in float32: the same kept features
on both NeurIPS subsets, latents within 3e-5 and 3e-4 of today's, whose values are about 15.)
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.preprocessing import normalize
from torch import nn

from cellembed.data.checks import BATCH_KEY, LABEL_KEY, DataError
from cellembed.data.markers import markers_present
from cellembed.data.minibatch import scaled_epochs
from cellembed.data.validate import MOD2_KEY
from cellembed.models.base import Model
from cellembed.preprocessing import (CHUNK, column_sd, dense, gene_scaling, log_normalize, log_normalize_sparse,
                                     standardize)
from cellembed.training import FlatAdam, predict, train


# ----------------------------------------------------------------------------- preprocessing

def log10_normalize(X, target_sum=1e4):
    """``log10(1 + target_sum * x / sum(x))`` per cell (train ``preprocess``), (N, M) float32.

    Sparse counts stay sparse (CSR: a zero count stays 0), dense ones dense; the values are the
    same either way. A cell with no counts stays 0 (`sklearn.preprocessing.normalize` leaves zero
    rows as they are).
    """
    if sp.issparse(X):
        scaled = sp.csr_matrix(X, dtype=np.float64, copy=True)  # the one float64 copy, then in place
        normalize(scaled, norm="l1", axis=1, copy=False)
        scaled.data *= target_sum
        np.log1p(scaled.data, out=scaled.data)  # the stored values only: log1p(0) = 0
        scaled.data /= np.log(10)
        return scaled.astype(np.float32)
    scaled = target_sum * normalize(np.asarray(X, dtype=np.float64), norm="l1", axis=1)  # (N, M)
    return (np.log1p(scaled) / np.log(10)).astype(np.float32)


def svd_loadings(X, wanted, seed):
    """TruncatedSVD's ``components_`` of ``X`` (N, M), transposed: (M, k), C-contiguous.

    ``X @ loadings`` is TruncatedSVD's ``transform``. C-contiguous, so that the product runs the
    same BLAS call before and after `save` / `load` (``components_`` can be a strided view, which
    is saved contiguous; the two layouts can differ in the last bit). ``k`` is ``wanted`` capped
    to ``M - 1`` (TruncatedSVD needs fewer components than features); ``seed`` is its
    ``random_state`` (train: 123).
    """
    k = max(1, min(wanted, X.shape[1] - 1))
    return np.ascontiguousarray(TruncatedSVD(n_components=k, random_state=seed).fit(X).components_.T)


def joint_features(rna, mod2, rna_loadings, mod2_loadings=None):
    """The JAE input (train ``preprocess``): both normalized modalities, reduced, side by side.

    Parameters
    ----------
    rna : ndarray or scipy.sparse matrix, shape (N, M)
        `log10_normalize` of the RNA counts.
    mod2 : ndarray or scipy.sparse matrix, shape (N, M2)
        `log10_normalize` of the second modality's counts.
    rna_loadings : ndarray, shape (M, k)
        `svd_loadings` of the fit cells' RNA.
    mod2_loadings : ndarray, shape (M2, k2), optional
        The same for the second modality (ATAC); None keeps it unreduced (ADT).

    Returns
    -------
    ndarray, shape (N, k + k2) (k2 = M2 when unreduced), float32
    """
    reduced = dense(mod2) if mod2_loadings is None else mod2 @ mod2_loadings  # (N, k2): dense either way
    return np.hstack([rna @ rna_loadings, reduced]).astype(np.float32)


def two_modalities(data, model, n_mod2=None):
    """The RNA counts (N, M) and the second modality's counts (N, M2) of a checked AnnData.

    Parameters
    ----------
    data : anndata.AnnData
        What `cellembed.data.setup_anndata` returns.
    model : str
        The model's name, for the errors.
    n_mod2 : int, optional
        The number of second-modality features the model was fit on.

    Raises
    ------
    DataError
        No ``obsm['mod2']``, or not ``n_mod2`` features in it.
    """
    if MOD2_KEY not in data.obsm:
        raise DataError(f"adata: has one modality; {model} needs two (RNA counts in X, protein or ATAC counts in "
                        f"obsm[{MOD2_KEY!r}]): pass a multimodal set such as neurips_cite or neurips_multiome")
    mod2 = data.obsm[MOD2_KEY]
    if n_mod2 is not None and mod2.shape[1] != n_mod2:
        raise DataError(f"adata: obsm[{MOD2_KEY!r}] holds {mod2.shape[1]} features; {model} was fit on {n_mod2}: "
                        "pass the same second-modality features, in the same order")
    return data.X, mod2


def normalized_blocks(data, model, target_sum, n_mod2=None):
    """Both modalities `log10_normalize`-d, (N, M) and (N, M2), from a checked AnnData.

    Each block is sparse where its counts are. A second modality that came already normalized
    (``uns['mod2']['normalized']``: e.g. the CLR-normalized proteins of public CITE-seq files, see
    `cellembed.data.load_dataset`) is taken as it is, dense; the RNA counts are always normalized here.
    """
    rna, mod2 = two_modalities(data, model, n_mod2)
    done = bool(data.uns.get(MOD2_KEY, {}).get("normalized", False))
    return (log10_normalize(rna, target_sum),
            dense(mod2) if done else log10_normalize(mod2, target_sum))


def modality(data):
    """``"ADT"`` or ``"ATAC"`` (``uns['mod2']['modality']``; ADT when not stated)."""
    return str(data.uns.get(MOD2_KEY, {}).get("modality", "ADT")).upper()


def cell_cycle_scores(counts, var_names, seed=0):
    """S and G2M scores of every cell (``scanpy.tl.score_genes_cell_cycle`` on the scaled log expression).

    The numbers of scanpy 1.11's ``score_genes_cell_cycle(AnnData(scale(log_normalize(counts))))``
    bit for bit (`tests/test_jae.py`), without its dense N x M input: scanpy reads the z-scored
    matrix whole for one thing, every gene's mean over the cells, which bins the genes by
    expression to draw the control genes. Here those means come from column blocks of the
    z-scored values (each block holds every cell, so numpy sums each column in the same row
    order), and only the markers' and the control genes' columns are made whole. The steps that
    follow are scanpy's (`_score_genes`), the same pandas calls in the same order.

    Parameters
    ----------
    counts : sparse or ndarray, shape (N, M)
        Raw RNA counts.
    var_names : sequence of str, length M
    seed : int
        ``score_genes``' random state (its control genes).

    Returns
    -------
    ndarray, shape (N, 2), or None
        Columns S_score, G2M_score; None when no S or no G2M marker is among ``var_names``.
    """
    s_genes, g2m_genes = markers_present(var_names, "S"), markers_present(var_names, "G2M")
    if not s_genes or not g2m_genes:
        return None
    logged = log_normalize_sparse(counts) if sp.issparse(counts) else log_normalize(counts)
    mean, sd = gene_scaling(logged)  # scale's: (x - mean) / sd, ddof 1
    by_gene = sp.csc_matrix(logged) if sp.issparse(logged) else logged

    def scaled(columns):
        """The z-scored values of these genes, (N, len(columns)) float32, as `scale` gives them."""
        return standardize(dense(by_gene[:, columns]), mean[columns], sd[columns])

    # blocks of at least 2 genes (~CHUNK values): numpy sums a column of a block in row order, as
    # in the whole matrix; a block of one column would be summed pairwise, another rounding
    n_blocks = max(1, logged.shape[1] // max(2, CHUNK // max(1, logged.shape[0])))
    gene_means = np.concatenate([np.nanmean(scaled(block), axis=0)  # (M,) float32, np.nanmean's
                                 for block in np.array_split(np.arange(logged.shape[1]), n_blocks)])
    names = pd.Index(var_names).astype(str)
    ctrl_size = min(len(s_genes), len(g2m_genes))  # score_genes_cell_cycle's
    return np.stack([_score_genes(scaled, gene_means, names, genes, ctrl_size, seed)
                     for genes in (s_genes, g2m_genes)], axis=1).astype(np.float32)


def _score_genes(scaled, gene_means, var_names, genes, ctrl_size, random_state, n_bins=25):
    """``scanpy.tl.score_genes`` (1.11, ``ctrl_as_ref=True``) given every gene's mean: (N,) float64."""
    np.random.seed(random_state)  # scanpy seeds numpy's global state; pandas' sample draws from it
    gene_list = pd.Index(genes).intersection(var_names)
    gene_pool = var_names.astype("string")
    obs_avg = pd.Series(gene_means, index=gene_pool)
    obs_avg = obs_avg[np.isfinite(obs_avg)]
    n_items = int(np.round(len(obs_avg) / (n_bins - 1)))
    obs_cut = obs_avg.rank(method="min") // n_items
    control_genes = pd.Index([], dtype="string")
    for cut in np.unique(obs_cut.loc[gene_list]):
        r_genes = obs_cut[obs_cut == cut].index  # ctrl_as_ref: the markers stay in the bins
        if ctrl_size < len(r_genes):
            r_genes = r_genes.to_series().sample(ctrl_size).index
        control_genes = control_genes.union(r_genes.difference(gene_list))
    if len(control_genes) == 0:
        raise RuntimeError("cell-cycle scores: no control genes found in any expression bin")
    means_list, means_control = (np.nanmean(scaled(var_names.get_indexer(g)), axis=1, dtype="float64")
                                 for g in (gene_list, control_genes))
    return means_list - means_control


# ----------------------------------------------------------------------------- the torch module

def keras_dense(n_in, n_out):
    """A linear layer initialized as Keras' Dense (Glorot-uniform weights, zero bias)."""
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ResidualBlock(nn.Module):
    """``h = ReLU(Dense(x)); ReLU(Dense(BN(Dropout(h))) + h)`` (utils ``create_encoder``), (B, n_in) -> (B, n)."""

    def __init__(self, n_in, n, dropout=0.1):
        super().__init__()
        self.inner, self.outer = keras_dense(n_in, n), keras_dense(n, n)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.BatchNorm1d(n, eps=1e-3, momentum=0.01)  # Keras' BatchNormalization defaults

    def forward(self, x):
        h = F.relu(self.inner(x))
        return F.relu(self.outer(self.norm(self.drop(h))) + h)


class JAEModule(nn.Module):
    """The autoencoder: residual encoder to a ReLU latent (B, d_latent), ReLU decoder back to (B, n_in)."""

    def __init__(self, n_in, n_latent, hidden=(150, 120, 100), dropout=0.1):
        super().__init__()
        blocks, width = [], n_in
        for n in hidden:
            blocks.append(ResidualBlock(width, n, dropout))
            width = n
        self.blocks = nn.Sequential(*blocks)
        self.to_latent = keras_dense(width, n_latent)
        layers, width = [], n_latent
        for n in hidden[::-1]:
            layers += [keras_dense(width, n), nn.ReLU()]
            width = n
        layers += [keras_dense(width, n_in), nn.ReLU()]  # the source's decoder ends in a ReLU too
        self.decoder = nn.Sequential(*layers)

    def encode(self, x):
        """Latent (B, d_latent), ReLU as in the source's encoder."""
        return F.relu(self.to_latent(self.blocks(x)))

    def forward(self, x):
        z = self.encode(x)
        return z, self.decoder(z)


def uniform_batch_loss(logits):
    """Cross-entropy of the uniform distribution against ``softmax(logits)`` (B, n_batches), mean over cells.

    ``-(1/K) sum_k log softmax(logits)_k``; its minimum, ``log K``, is at equal logits.
    """
    return -F.log_softmax(logits, dim=1).mean(dim=1).mean()


def jae_loss(slices, weights):
    """The loss function for `cellembed.training.train`: ``batch = (x, cell_type[, batch][, phase])``.

    Parameters
    ----------
    slices : dict
        ``type``, ``batch``, ``phase``: [start, stop] of each slice of the latent; ``batch`` and
        ``phase`` may be None (no such head).
    weights : tuple of 4 floats
        Reconstruction, cell type, batch, phase.
    """
    w_rec, w_type, w_batch, w_phase = weights

    def loss_fn(module, batch, _kl_weight):
        x, cell_type, *rest = batch
        z, recon = module(x)
        rec = F.mse_loss(recon, x)  # Keras' MSE: mean over features and cells
        ce = F.cross_entropy(z[:, slice(*slices["type"])], cell_type)
        loss = w_rec * rec + w_type * ce
        parts = {"rec": rec.item(), "ce_type": ce.item()}
        rest = list(rest)
        if slices["batch"] is not None:
            uni = uniform_batch_loss(z[:, slice(*slices["batch"])])
            loss = loss + w_batch * uni
            parts["ce_batch"] = uni.item()
        if slices["phase"] is not None:
            phase = F.mse_loss(z[:, slice(*slices["phase"])], rest[-1])
            loss = loss + w_phase * phase
            parts["phase"] = phase.item()
        return loss, parts

    return loss_fn


# ----------------------------------------------------------------------------- the models

@dataclasses.dataclass
class JAEConfig:
    n_components: int = 100  # train: n_components_mod1 = n_components_mod2 = 100
    svd_seed: int = 123  # train: TruncatedSVD(random_state=123)
    target_sum: float = 1e4  # train: scale = 1e4
    hidden: tuple = (150, 120, 100)  # train: hidden_units = [150, 120, 100, latent]
    n_free: int = 5  # train: nb_cell_types + nb_batches + nb_phases + 5
    dropout: float = 0.1  # utils: Dropout(0.1)
    loss_weights: tuple = (0.7, 0.2, 0.05, 0.05)  # train: loss_weights (recon, type, batch, phase)
    lr: float = 1e-4  # train: params["lr"]
    adam_eps: float = 1e-7  # Keras' Adam epsilon (torch's default is 1e-8)
    batch_size: int = 32  # train: batch_size = 32
    epochs: int = 500  # train: epochs = 500 (for up to 20,000 cells, see scale_epochs)
    # above 20,000 cells train round(epochs * 20000 / N) epochs (at least 1), so that the steps stay
    # bounded (scvi-tools' rule, as the other minibatch models); False: always ``epochs``
    scale_epochs: bool = True
    patience: int = 5  # train: EarlyStoppingAtMinLoss(patience=5)
    valid_fraction: float = 0.1  # train: train_test_split(test_size=0.1)


class JAE(Model):
    """JAE (see the module's docstring). Needs ``obsm['mod2']``; labels enter training.

    Fitted attributes: ``svd_rna_loadings_`` (M, k) and ``svd_mod2_loadings_`` (M2, k2; None
    for ADT, which stays unreduced), the fit cells' TruncatedSVD components (`svd_loadings`);
    ``n_mod2_``, the second modality's number of features; ``cell_types_``, the classes of the
    type slice in order; ``slices_``, slice name (``type``, ``batch``, ``phase``, ``free``) ->
    ``[start, stop]`` (a Python slice) of the latent, None for a head that is off; ``module_``,
    the `JAEModule`.
    """

    Config = JAEConfig
    quick = {"epochs": 2}  # compare.py --quick: a smoke run
    supervised = True

    def _fit(self, data, seed):
        cfg = self.config
        rna, mod2 = normalized_blocks(data, "JAE", cfg.target_sum)
        self.n_mod2_ = int(mod2.shape[1])
        self.svd_rna_loadings_ = svd_loadings(rna, cfg.n_components, cfg.svd_seed)
        self.svd_mod2_loadings_ = svd_loadings(mod2, cfg.n_components, cfg.svd_seed) if modality(data) != "ADT" \
            else None
        x = torch.from_numpy(joint_features(rna, mod2, self.svd_rna_loadings_, self.svd_mod2_loadings_))
        types = data.obs[LABEL_KEY].astype("category")
        self.cell_types_ = [str(t) for t in types.cat.categories]
        tensors = [x, torch.from_numpy(types.cat.codes.to_numpy().astype(np.int64))]  # (N, D), (N,)
        n_batches = int(data.obs[BATCH_KEY].nunique()) if BATCH_KEY in data.obs else 0
        n_batches = n_batches if n_batches >= 2 else 0  # one batch: nothing to remove
        phase = cell_cycle_scores(data.X, data.var_names, seed=seed)  # (N, 2) or None
        if phase is None:
            warnings.warn(f"JAE: no S or no G2M cell-cycle marker among the {data.n_vars} genes; "
                          "training without the phase slice and loss", stacklevel=3)
        else:
            tensors.append(torch.from_numpy(phase))
        n_phase = 0 if phase is None else 2
        edges = [int(e) for e in np.cumsum([0, len(self.cell_types_), n_batches, n_phase, cfg.n_free])]
        self.slices_ = {"type": edges[0:2], "batch": edges[1:3] if n_batches else None,
                        "phase": edges[2:4] if n_phase else None, "free": edges[3:5]}
        self.module_ = self._build_module().to(self.device_)
        optimizer = FlatAdam(self.module_.parameters(), lr=cfg.lr, eps=cfg.adam_eps)  # torch's Adam, bit for bit
        n_train = x.shape[0] - max(1, int(round(cfg.valid_fraction * x.shape[0]))) if cfg.valid_fraction > 0 \
            else x.shape[0]
        self.history = train(self.module_, jae_loss(self.slices_, cfg.loss_weights), tuple(tensors), optimizer,
                             epochs=scaled_epochs(cfg.epochs, data.n_obs) if cfg.scale_epochs else cfg.epochs,
                             batch_size=cfg.batch_size, seed=seed,
                             valid_fraction=cfg.valid_fraction, patience=cfg.patience, desc="jae",
                             drop_last=n_train % cfg.batch_size == 1)

    def _build_module(self):
        n_mod2 = self.n_mod2_ if self.svd_mod2_loadings_ is None else self.svd_mod2_loadings_.shape[1]
        return JAEModule(self.svd_rna_loadings_.shape[1] + n_mod2, self.slices_["free"][1], self.config.hidden,
                         self.config.dropout)

    def _get_latent(self, data):
        """The encoder's ReLU latent of the cells, (N, d): the `slices_` side by side."""
        rna, mod2 = normalized_blocks(data, "JAE", self.config.target_sum, self.n_mod2_)
        x = joint_features(rna, mod2, self.svd_rna_loadings_, self.svd_mod2_loadings_)  # (N, D)
        self.module_.eval()
        return predict(self.module_.encode, torch.from_numpy(x), device=self.device_)


@dataclasses.dataclass
class PCAJointConfig:
    n_dims: int = 10  # baseline_pca config.vsh.yaml: --n_dims default 10
    hvg_sel: int = 1000  # baseline_pca config.vsh.yaml: --hvg_sel default 1000 (per modality)
    target_sum: float = 1e4  # ours: log10(1 + 1e4 x / total) per modality, JAE's normalization


class PCAJoint(Model):
    """The organisers' baseline: PCA of the top-sd features of both modalities, concatenated.

    Fitted attributes: ``features_rna_`` and ``features_mod2_``, the columns kept from each
    modality (int, ascending); ``n_mod2_``, the second modality's number of features;
    ``mean_`` (D,) and ``loadings_`` (D, k), float32, the PCA of the kept features (D of them):
    its ``mean_`` and ``components_.T``. Features are ranked by `cellembed.preprocessing.column_sd`.
    """

    Config = PCAJointConfig
    uses_torch = False

    def _selected(self, data, n_mod2=None):
        """The kept features of both normalized modalities (`normalized_blocks`) side by side: CSR (N, D) float32."""
        rna, mod2 = normalized_blocks(data, "PCAJoint", self.config.target_sum, n_mod2)
        return sp.hstack([sp.csr_matrix(rna)[:, self.features_rna_], sp.csr_matrix(mod2)[:, self.features_mod2_]],
                         format="csr", dtype=np.float32)

    def _fit(self, data, seed):
        rna, mod2 = normalized_blocks(data, "PCAJoint", self.config.target_sum)
        self.n_mod2_ = int(mod2.shape[1])
        self.features_rna_, self.features_mod2_ = (np.sort(np.argsort(-column_sd(X), kind="stable")
                                                           [:self.config.hvg_sel]) for X in (rna, mod2))
        del rna, mod2
        Z = self._selected(data)  # (N, D), sparse where the counts are
        # PCA of the centred Z without centring it (a dense N x D copy): the D x D covariance, in float64
        pca = PCA(n_components=min(self.config.n_dims, min(Z.shape) - 1), svd_solver="covariance_eigh")
        pca.fit(Z.astype(np.float64))
        self.mean_ = pca.mean_.astype(np.float32)
        self.loadings_ = np.ascontiguousarray(pca.components_.T, dtype=np.float32)
        self.history = [{"epoch": 0, "explained_variance": float(pca.explained_variance_ratio_.sum())}]

    def _get_latent(self, data):
        """The cells' principal components, (N, k) float32: ``(Z - mean) @ loadings`` without centring Z."""
        Z = self._selected(data, self.n_mod2_)  # (N, D) CSR
        return np.asarray(Z @ self.loadings_) - self.mean_[None, :] @ self.loadings_
