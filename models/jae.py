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
  Tirosh et al. markers, ``a4/cell_cycle_genes.csv``), and 5 free units;
- loss ``0.7 MSE(recon) + 0.2 CE(type) + 0.05 CE(uniform, batch) + 0.05 MSE(phase)``; Adam 1e-4
  (Keras' epsilon 1e-7), batch 32, at most 500 epochs, early stopping with patience 5 on the loss of
  a 10% validation split, keeping the best epoch's weights; Keras' initialization (Glorot-uniform
  weights, zero biases) and batch-norm constants (momentum 0.99, epsilon 1e-3).

Labels enter training (``supervised = True``). Deviations, each forced by our setting: the source
fits its SVDs on the unlabelled test cells and trains on separate labelled "exploration" cells,
then fine-tunes on the test cells with the reconstruction loss only; we have one labelled set, so
we fit and embed the same cells (no fine-tuning). The source scores the cell cycle on the
exploration set's size-factor-normalized expression; we use ``log1p`` of counts normalized to 1e4
per cell (`a4.preprocessing.log_normalize`), then scale. A data set without a batch column (or with
one batch) has no batch slice and no batch loss; one whose genes include no S or no G2M marker
(e.g. an ``.h5`` file, which stores no gene names) has no phase slice and no phase loss (a warning
says so). The last partial minibatch of an epoch is skipped when it would hold a single cell
(batch norm needs two).

The organisers' baseline (openproblems-bio/neurips2021_multimodal_viash,
``src/joint_embedding/methods/baseline_pca``): per modality the 1,000 features of largest standard
deviation, concatenated, and the first 10 principal components (``irlba::prcomp_irlba``, centred,
not scaled). Their input was the organisers' normalized ``X``; ours is JAE's normalization of the
raw counts of each modality, ``log10(1 + 1e4 x / total)`` (we keep raw counts only), so that the
two differ only in the model.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.preprocessing import normalize
from torch import nn

from a4.preprocessing import dense, log_normalize, scale
from a4.training import predict, seed_everything, train
from models.base import Model, check_latent

CELL_CYCLE_GENES = Path(__file__).resolve().parents[1] / "a4" / "cell_cycle_genes.csv"


# ----------------------------------------------------------------------------- preprocessing

def log10_normalize(X, target_sum=1e4):
    """``log10(1 + target_sum * x / sum(x))`` per cell (train ``preprocess``), dense (N, M) float32.

    A cell with no counts stays 0 (`sklearn.preprocessing.normalize` leaves zero rows as they are).
    """
    X = sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    scaled = target_sum * normalize(X, norm="l1", axis=1)  # (N, M)
    return (np.log1p(dense(scaled, np.float64)) / np.log(10)).astype(np.float32)


def n_svd_components(n_features, wanted):
    """``wanted`` capped to ``n_features - 1`` (TruncatedSVD needs fewer components than features)."""
    return max(1, min(wanted, n_features - 1))


def check_two_modalities(adata):
    """The RNA counts (N, M) and the second modality's counts (N, M2) of ``adata``; else ValueError."""
    name = adata.uns.get("dataset", {}).get("name", "this data set")
    if "mod2" not in adata.obsm:
        raise ValueError(f"{name!r} has one modality; JAE needs two (RNA in X and protein or ATAC counts in "
                         "obsm['mod2']): pass a multimodal set such as neurips_cite or neurips_multiome")
    mod2 = adata.obsm["mod2"]
    if mod2.shape[0] != adata.n_obs:  # AnnData refuses this itself; kept for arrays passed around it
        raise ValueError(f"{name!r}: the modalities hold different cells ({adata.n_obs} RNA vs {mod2.shape[0]} "
                         "mod2 rows); both must hold the same cells")
    return adata.X, mod2


def modality(adata):
    """``"ADT"`` or ``"ATAC"`` (``uns['mod2']['modality']``; ADT when not stated)."""
    return str(adata.uns.get("mod2", {}).get("modality", "ADT")).upper()


class JointFeatures:
    """The JAE input: per-modality log10 normalization, SVD of RNA (and ATAC), concatenation.

    Parameters
    ----------
    n_components : int
        SVD dimensions per reduced modality (train: 100).
    reduce_mod2 : bool
        Reduce the second modality too (ATAC: yes, ADT: no, as train's ``mod2 != "ADT"``).
    seed : int
        TruncatedSVD's ``random_state`` (train: 123).
    """

    def __init__(self, n_components=100, reduce_mod2=False, seed=123, target_sum=1e4):
        self.n_components, self.reduce_mod2, self.seed, self.target_sum = n_components, reduce_mod2, seed, target_sum
        self.svd_rna = self.svd_mod2 = None

    def _svd(self, X):
        return TruncatedSVD(n_components=n_svd_components(X.shape[1], self.n_components),
                            random_state=self.seed).fit(X)

    def fit(self, rna, mod2):
        """Fit the SVDs on ``rna`` (N, M) and ``mod2`` (N, M2) counts; returns self."""
        if rna.shape[0] != mod2.shape[0]:
            raise ValueError(f"the modalities hold different cells ({rna.shape[0]} RNA vs {mod2.shape[0]} "
                             "mod2 rows); both must hold the same cells")
        self.svd_rna = self._svd(log10_normalize(rna, self.target_sum))
        if self.reduce_mod2:
            self.svd_mod2 = self._svd(log10_normalize(mod2, self.target_sum))
        return self

    def transform(self, rna, mod2):
        """The concatenated features, ndarray (N, n_rna + n_mod2) float32."""
        if rna.shape[0] != mod2.shape[0]:
            raise ValueError(f"the modalities hold different cells ({rna.shape[0]} RNA vs {mod2.shape[0]} "
                             "mod2 rows); both must hold the same cells")
        assert self.svd_rna is not None, "call fit first"
        for what, X, svd in (("RNA", rna, self.svd_rna), ("mod2", mod2, self.svd_mod2)):
            n_in = svd.n_features_in_ if svd is not None else None
            if n_in is not None and X.shape[1] != n_in:
                raise ValueError(f"{what} has {X.shape[1]} features, the model was fitted on {n_in}")
        a = self.svd_rna.transform(log10_normalize(rna, self.target_sum))
        b = log10_normalize(mod2, self.target_sum)
        if self.svd_mod2 is not None:
            b = self.svd_mod2.transform(b)
        return np.hstack([a, b]).astype(np.float32)


def cell_cycle_genes():
    """The 43 S and 54 G2M markers of Tirosh et al. 2016: DataFrame (97 rows) gene_name, gene_id, phase."""
    return pd.read_csv(CELL_CYCLE_GENES, comment="#")


def markers_present(var_names, phase):
    """The markers of ``phase`` ("S" or "G2M") found in ``var_names``, by symbol or by Ensembl id,
    whichever matches more (as scib's ``score_cell_cycle``)."""
    table = cell_cycle_genes()
    table = table[table["phase"] == phase]
    names = pd.Index(var_names)
    found = [[g for g in table[col] if g in names] for col in ("gene_name", "gene_id")]
    return max(found, key=len)


def cell_cycle_scores(counts, var_names, seed=0):
    """S and G2M scores of every cell (``scanpy.tl.score_genes_cell_cycle`` on the scaled log expression).

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
    import scanpy as sc

    s_genes, g2m_genes = markers_present(var_names, "S"), markers_present(var_names, "G2M")
    if not s_genes or not g2m_genes:
        return None
    adata = anndata.AnnData(scale(log_normalize(counts)), var=pd.DataFrame(index=pd.Index(var_names).astype(str)))
    sc.tl.score_genes_cell_cycle(adata, s_genes=s_genes, g2m_genes=g2m_genes, random_state=seed)
    return adata.obs[["S_score", "G2M_score"]].to_numpy(np.float32)


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
    """The loss function for `a4.training.train`: ``batch = (x, cell_type[, batch][, phase])``.

    Parameters
    ----------
    slices : dict
        ``type``, ``batch``, ``phase``: (start, stop) of each slice of the latent; ``batch`` and
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
    epochs: int = 500  # train: epochs = 500
    patience: int = 5  # train: EarlyStoppingAtMinLoss(patience=5)
    valid_fraction: float = 0.1  # train: train_test_split(test_size=0.1)


class JAE(Model):
    """JAE (see the module's docstring). Needs ``obsm['mod2']``; labels enter training.

    After `fit`: ``slices`` (name -> (start, stop) of the latent, None for a head that is off),
    ``features`` (the fitted `JointFeatures`), ``module``, ``history``.
    """

    Config = JAEConfig
    quick = {"epochs": 2}  # compare.py --quick: a smoke run
    supervised = True

    def _inputs(self, adata):
        rna, mod2 = check_two_modalities(adata)
        return rna, mod2

    def fit(self, adata, seed=0):
        cfg = self.config
        rna, mod2 = self._inputs(adata)
        seed_everything(seed)
        self.features = JointFeatures(cfg.n_components, modality(adata) != "ADT", cfg.svd_seed,
                                      cfg.target_sum).fit(rna, mod2)
        x = torch.from_numpy(self.features.transform(rna, mod2))  # (N, D)
        types = adata.obs["Celltype"].astype("category")
        self.cell_types = list(types.cat.categories)
        data = [x, torch.from_numpy(types.cat.codes.to_numpy().astype(np.int64))]  # (N,)
        n_types = len(self.cell_types)
        n_batches = int(adata.obs["batch"].nunique()) if "batch" in adata.obs else 0
        n_batches = n_batches if n_batches >= 2 else 0  # one batch: nothing to remove
        phase = cell_cycle_scores(rna, adata.var_names, seed=seed)
        if phase is None:
            warnings.warn(f"JAE: no S or no G2M cell-cycle marker among the {adata.n_vars} genes; "
                          "training without the phase slice and loss", stacklevel=2)
        else:
            data.append(torch.from_numpy(phase))
        n_phase = 0 if phase is None else 2
        edges = np.cumsum([0, n_types, n_batches, n_phase, cfg.n_free])
        self.slices = {"type": (int(edges[0]), int(edges[1])),
                       "batch": (int(edges[1]), int(edges[2])) if n_batches else None,
                       "phase": (int(edges[2]), int(edges[3])) if n_phase else None,
                       "free": (int(edges[3]), int(edges[4]))}
        self.module = JAEModule(x.shape[1], int(edges[-1]), cfg.hidden, cfg.dropout)
        optimizer = torch.optim.Adam(self.module.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        n_train = x.shape[0] - max(1, int(round(cfg.valid_fraction * x.shape[0]))) if cfg.valid_fraction > 0 \
            else x.shape[0]
        self.history = train(self.module, jae_loss(self.slices, cfg.loss_weights), tuple(data), optimizer,
                             epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed,
                             valid_fraction=cfg.valid_fraction, patience=cfg.patience, desc="jae",
                             drop_last=n_train % cfg.batch_size == 1)
        return self

    def get_latent(self, adata):
        rna, mod2 = self._inputs(adata)
        self.module.eval()
        x = torch.from_numpy(self.features.transform(rna, mod2))
        return check_latent(predict(self.module.encode, x), adata.n_obs)


@dataclasses.dataclass
class PCAJointConfig:
    n_dims: int = 10  # baseline_pca config.vsh.yaml: --n_dims default 10
    hvg_sel: int = 1000  # baseline_pca config.vsh.yaml: --hvg_sel default 1000 (per modality)
    target_sum: float = 1e4  # ours: log10(1 + 1e4 x / total) per modality, JAE's normalization


class PCAJoint(Model):
    """The organisers' baseline: PCA of the top-sd features of both modalities, concatenated."""

    Config = PCAJointConfig

    def _matrix(self, adata):
        rna, mod2 = check_two_modalities(adata)
        blocks = []
        for i, X in enumerate((rna, mod2)):
            X = log10_normalize(X, self.config.target_sum)  # (N, M_i), as the JAE input
            if self._keep[i] is None:
                sd = X.std(axis=0)
                self._keep[i] = np.sort(np.argsort(-sd, kind="stable")[:self.config.hvg_sel])
            blocks.append(X[:, self._keep[i]])
        return np.hstack(blocks)

    def fit(self, adata, seed=0):
        self._keep = [None, None]
        Z = self._matrix(adata)
        self.pca = PCA(n_components=min(self.config.n_dims, min(Z.shape) - 1), svd_solver="full").fit(Z)
        self.history = [{"epoch": 0, "explained_variance": float(self.pca.explained_variance_ratio_.sum())}]
        return self

    def get_latent(self, adata):
        return check_latent(self.pca.transform(self._matrix(adata)), adata.n_obs)
