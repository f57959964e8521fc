"""scVAE's Gaussian-mixture VAE with a negative-binomial likelihood (registry name ``gmvae``).

Grønbech et al., "scVAE: variational auto-encoders for single-cell gene expression data",
Bioinformatics 2020, as used by the classifier study in
``../shared/references/scvae_gmvae_classifier.txt`` (Bolos et al.). The generative model:

    y ~ Cat(1 / K),   z | y ~ N(mu_y, diag sigma_y^2),   x_j | z ~ NB(l * softmax(f(z))_j, theta_j)

with ``mu_y``, ``log sigma_y^2`` dense layers on the one-hot ``y`` (one vector per component),
a decoder ``f`` shared by the K components, the cell's library size ``l`` and one inverse
dispersion per gene. The inference model: ``q(y | x)`` its own MLP (softmax over K) and
``q(z | x, y)`` an MLP on ``[x, one-hot y]`` (scVAE's; ours by default reads x only, below).
The ELBO sums exactly over the K components:

    ELBO(x) = sum_k q(k | x) [ E_{q(z | x, k)} log p(x | z) - KL(q(z | x, k) || p(z | k)) ]
              - KL(q(y | x) || Cat(1 / K))

(one reparameterized draw of z per component; both KLs analytic). Both KL terms are multiplied
by a weight rising linearly from 0 to 1 over the first ``warmup`` epochs (scVAE's warm-up).
Clusters (`predict`): ``argmax_k q(k | x)``; the latent (`get_latent`): the posterior mean
``sum_k q(k | x) mu_q(x, k)``.

Three changes against the mixture collapsing onto one component, which scVAE's recipe does on
PBMC 3k (seed 0: every cell in one component, ``ari_own`` 0.000), each measured there with
100 epochs at the defaults (docs/models.md, *Autoencoders*):

- ``z_reads_y=False``: ``q(z | x)`` does not read y. When it does, the encoder can move z onto
  whichever component's prior it is asked about, every component then explains a cell equally
  well and y carries nothing (with the two changes below, seed 0: one component holds 2,627 of
  2,638 cells, ``ari_own`` 0.003; 0.587 without it). With one z per cell the decoder also runs
  once instead of K times (3x faster);
- ``prior_scale=0.1``: the component means start as N(0, 0.1^2) draws. scVAE's N(0, 1) puts them
  ~10 apart in 50 dimensions, far outside the initial codes, and the nearest one takes every cell
  (with the other two changes, seed 0: ``ari_own`` 0.000);
- ``kl_y="marginal"``: the categorical KL of the ELBO, averaged over cells, is
  ``I(x; y) + KL(q(y) || Cat(1 / K))`` (Hoffman and Johnson 2016, "ELBO surgery"; q(y) the mean
  of q(y | x) over the minibatch). Its first part penalizes exactly the information about a
  cell's component that clustering needs; with it, one component holding every cell is the
  better ELBO (k-means-initialized components collapsed back, loss 630.7 vs 632.1). We keep the
  second part only, which rewards using the K components evenly (seeds 0 / 2: ``ari_own``
  0.537 / 0.404 with the ELBO's KL, 0.587 / 0.616 with the marginal one). The training loss is then
  no longer the negative ELBO; the history logs the ELBO itself as well (``elbo``).

``z_reads_y=True, kl_y="cell", prior_scale=1.0`` is scVAE's model and objective.

At the defaults, seeds 0-4 (issue 22; docs/results.md, `python compare.py --data SET ... --seeds
0 1 2 3 4 --models ...,gmvae`, 2-core AMD EPYC, 2026-12-05): its own clusters (``ari_own``) stay
below k-means at the same K on its latent on the mean of the four labelled sets (0.539 against
0.584; above it on mouse_bladder only) and are level over all six (0.460 against 0.457: on the
NeurIPS subsets, 41 and 21 types, its own clusters 0.317 and 0.290 beat k-means' 0.223 and
0.183); its best of the two clears 0.8 x PCA's k-means ARI on all six sets. The changes tried
against the merging and splitting of components are listed in docs/models.md.

Defaults: the classifier study's (table 1: one hidden layer, Adam 1e-4, 100 epochs; its best
Rand index and accuracy, models 19 and 10: latent 50, 250 hidden units), K = ``fit``'s
``n_clusters``, by default the number of labelled classes (the study: 11 = its number of cell
types). ``GMVAE.Config.scvae_recipe()`` gives the scVAE paper's larger recipe (hidden
100-100, latent 100, warm-up 200, 500 epochs).

Further deviations, each for a stated reason:
- the encoder reads ``log1p(x)`` (scVI's input), not the raw counts scVAE feeds through
  batch-normalized layers: without batch normalization raw counts up to hundreds make the first
  layer's scale depend on sequencing depth; we use no batch normalization (small data sets);
- the NB mean is the library size times gene proportions (scVI's offset) rather than scVAE's
  free NB parameters, so that depth does not have to be learned by the clusters;
- with more than ``n_top_genes`` genes (pbmc3k: 13,713) the model uses the 2,000 most variable
  genes (scanpy's Seurat flavour on the log-normalized counts): speed, the first and last
  layers are as wide as the genes (and scVAE's ``z_reads_y=True`` runs the decoder K times per
  cell, which over every gene is hours on 2 CPU cores).

Memory grows with the batch, not with the cells: the counts stay CSR (the modelled genes'
columns), each minibatch's dense rows and their ``log1p`` are built when it is drawn
(`cellembed.data.minibatch.SparseRows`; the same numbers as the dense (N, G) tensors, bit for
bit), and the genes are selected on the sparse log-normalized counts. Above 20,000 cells the
epochs and the warm-up shrink as 1 / N (``scale_epochs``, scvi-tools' rule).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch
from torch import nn

from cellembed.data.backed import BackedCounts, counts as counts_of
from cellembed.data.minibatch import SparseRows, embed_batch_size, log1p_rows, scaled_epochs
from cellembed.likelihoods import nb_log_prob
from cellembed.preprocessing import library_sizes, log_normalize_sparse
from cellembed.training import linear_warmup, predict, train
from cellembed.models.base import Model


def mlp(sizes):
    """Linear + ReLU layers through ``sizes`` (the last layer has ReLU too)."""
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


def gaussian_kl_between(mu_q, logvar_q, mu_p, logvar_p):
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) summed over the last dimension."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1).sum(-1)


class GMVAEModule(nn.Module):
    """The Gaussian-mixture VAE's networks; knows nothing of AnnData.

    Parameters
    ----------
    n_genes : int
        M.
    n_components : int
        K.
    hidden : tuple of int
        Hidden widths of q(y | x), q(z | x, y) and (reversed) the decoder.
    latent : int
        d.
    z_reads_y : bool
        q(z | x, y) reads y (scVAE) or q(z | x) does not (one z per cell for every component).
    prior_scale : float
        Standard deviation of the initial component means.
    """

    def __init__(self, n_genes, n_components, hidden, latent, z_reads_y=False, prior_scale=0.1):
        super().__init__()
        hidden = tuple(hidden)
        self.n_components = n_components
        self.qy = nn.Sequential(mlp((n_genes,) + hidden), nn.Linear(hidden[-1], n_components))
        # q(z | x, y): the first layer on [x, one-hot y] is W_x x + W_y[:, y] (one W_x x per cell)
        self.qz_x = nn.Linear(n_genes, hidden[0])
        self.qz_y = nn.Linear(n_components, hidden[0], bias=False) if z_reads_y else None
        self.qz_rest = mlp(hidden)  # hidden[0] -> ... -> hidden[-1] (empty for one layer)
        self.qz_mu = nn.Linear(hidden[-1], latent)
        self.qz_logvar = nn.Linear(hidden[-1], latent)
        self.pz_mu = nn.Linear(n_components, latent, bias=False)  # mu_y: a dense layer on one-hot y
        self.pz_logvar = nn.Linear(n_components, latent, bias=False)
        # components start apart (zeros would make them identical) but near the codes (docstring)
        nn.init.normal_(self.pz_mu.weight, std=prior_scale)
        nn.init.zeros_(self.pz_logvar.weight)
        rev = hidden[::-1]
        self.decoder = nn.Sequential(mlp((latent,) + rev), nn.Linear(rev[-1], n_genes))
        self.log_theta = nn.Parameter(torch.zeros(n_genes))  # per-gene NB inverse dispersion

    def q_y(self, x):
        """log q(y | x), shape (B, K)."""
        return torch.log_softmax(self.qy(x), dim=-1)

    def q_z(self, x):
        """Mean and log variance of q(z | x, k) for every k, shapes (B, K, d) (K = 1 without y)."""
        h = self.qz_x(x)[:, None, :]  # (B, 1, h0)
        if self.qz_y is not None:
            h = h + self.qz_y(torch.eye(self.n_components, dtype=x.dtype, device=x.device))[None]  # (B, K, h0)
        h = torch.relu(h)
        h = self.qz_rest(h)
        return self.qz_mu(h), self.qz_logvar(h)

    def p_z(self):
        """Mean and log variance of p(z | k), shapes (K, d)."""
        eye = torch.eye(self.n_components, device=self.pz_mu.weight.device)
        return self.pz_mu(eye), self.pz_logvar(eye)

    def latent(self, x):
        """The posterior mean of z, ``sum_k q(k | x) mu_q(x, k)``, shape (B, d)."""
        mu, _ = self.q_z(x)
        return (self.q_y(x).exp()[..., None] * mu).sum(1)


def gmvae_terms(module, x, counts, library, sample=True):
    """The ELBO's terms per cell, the sum over components done exactly.

    Parameters
    ----------
    module : GMVAEModule
    x : Tensor, shape (B, M)
        Encoder input (``log1p`` of the counts).
    counts : Tensor, shape (B, M)
    library : Tensor, shape (B,)
        Total counts.
    sample : bool
        Draw z from q(z | x, k) (training); False uses its mean.

    Returns
    -------
    dict of Tensor, shape (B,)
        ``recon`` (``-sum_k q_k E log p(x | z_k)``), ``kl_z`` (``sum_k q_k KL_k``), ``kl_y``
        (``KL(q(y | x) || Cat(1 / K))``, the ELBO's), ``kl_y_marginal`` (``KL(q(y) || Cat(1 / K))``
        of the minibatch's mean ``q(y)``, the same value in every row).
    """
    log_qy = module.q_y(x)  # (B, K)
    qy = log_qy.exp()
    mu, logvar = module.q_z(x)  # (B, K, d), or (B, 1, d): one z for every component
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
    rates = torch.softmax(module.decoder(z), dim=-1) * library[:, None, None]  # (B, K or 1, M)
    log_px = nb_log_prob(counts[:, None, :], rates, module.log_theta.exp()).sum(-1)  # (B, K or 1)
    pz_mu, pz_logvar = module.p_z()  # (K, d)
    kl_z = gaussian_kl_between(mu, logvar, pz_mu[None], pz_logvar[None])  # (B, K)
    log_k = math.log(module.n_components)
    kl_y = (qy * (log_qy + log_k)).sum(-1)  # KL(q(y|x) || Cat(1/K))
    log_qbar = torch.logsumexp(log_qy, dim=0) - math.log(x.shape[0])  # log of the batch's mean q(y), (K,)
    kl_y_marginal = (log_qbar.exp() * (log_qbar + log_k)).sum().expand(x.shape[0])
    return {"recon": -(qy * log_px).sum(-1), "kl_z": (qy * kl_z).sum(-1), "kl_y": kl_y,
            "kl_y_marginal": kl_y_marginal}


def gmvae_loss(module, batch, kl_weight, kl_y="marginal"):
    """``loss_fn`` for `cellembed.training.train`: reconstruction + warmed-up KLs, mean over cells.

    ``kl_y="cell"`` gives the negative ELBO (scVAE); ``"marginal"`` replaces the ELBO's
    ``KL(q(y | x) || Cat(1 / K))`` with the minibatch marginal's (module docstring). The parts
    logged: ``recon``, ``kl`` (the KLs trained on) and ``elbo`` (the ELBO itself, per cell).
    """
    t = gmvae_terms(module, *batch)
    recon, kl_z = t["recon"].mean(), t["kl_z"].mean()
    kl = kl_z + t["kl_y" if kl_y == "cell" else "kl_y_marginal"].mean()
    elbo = -(recon + kl_z + t["kl_y"].mean())
    return recon + kl_weight * kl, {"recon": recon.item(), "kl": kl.item(), "elbo": elbo.item()}


@dataclasses.dataclass
class GMVAEConfig:
    """Hyperparameters of `GMVAE` (sources in the comments)."""

    hidden: tuple = (250,)  # the study: 1 hidden layer (table 1), 250 units (its best models 10, 19)
    latent: int = 50  # the study's best Rand index and accuracy (models 19 and 10: Z = 50)
    epochs: int = 100  # the study, table 1 (for up to 20,000 cells, see scale_epochs)
    warmup: int = 40  # KL warm-up epochs: scVAE's recipe warms up over 200 of 500 epochs (40%)
    # above 20,000 cells train round(epochs * 20000 / N) epochs (at least 1), the warm-up the same
    # fraction of them, so that the steps stay bounded: scvi-tools' rule (get_max_epochs_heuristic,
    # with epochs as its cap); False: always epochs and warmup
    scale_epochs: bool = True
    lr: float = 1e-4  # the study, table 1 (Adam)
    batch_size: int = 100  # scVAE's default minibatch size
    n_top_genes: int = 2000  # more genes than this: the most variable ones (speed; module docstring)
    z_reads_y: bool = False  # scVAE: True, q(z | x, y); ours q(z | x) (module docstring)
    kl_y: str = "marginal"  # scVAE: "cell", the ELBO's KL(q(y | x) || p(y)) (module docstring)
    prior_scale: float = 0.1  # sd of the initial component means; scVAE's N(0, 1) is 1.0

    def __post_init__(self):
        if self.kl_y not in ("cell", "marginal"):
            raise ValueError(f"gmvae: kl_y={self.kl_y!r}; use 'cell' (scVAE's ELBO) or 'marginal'")

    @classmethod
    def scvae(cls, **overrides):
        """scVAE's model and objective: q(z | x, y), the ELBO's categorical KL, N(0, 1) means."""
        return cls(**{"z_reads_y": True, "kl_y": "cell", "prior_scale": 1.0, **overrides})

    @classmethod
    def scvae_recipe(cls, **overrides):
        """The scVAE paper's larger recipe: hidden 100-100, latent 100, warm-up 200, 500 epochs."""
        return cls(**{"hidden": (100, 100), "latent": 100, "warmup": 200, "epochs": 500, **overrides})


class GMVAE(Model):
    """scVAE's GMVAE with an NB likelihood; clusters are ``argmax q(y | x)``.

    K is ``n_clusters_`` (`fit`'s ``n_clusters``, by default the number of labelled classes).
    After `fit`: ``history`` (per epoch ``loss``, ``recon``, ``kl``, ``elbo``, ``kl_weight``),
    ``module_`` (the trained `GMVAEModule`), ``genes_`` (int ndarray (G,), the indices in
    ``var_names_`` of the genes modelled).
    """

    Config = GMVAEConfig
    clusters = True
    streams_backed = True
    quick = {"epochs": 2, "warmup": 1}  # compare.py --quick: a smoke run

    def _select_genes(self, X):
        """Indices (G,) of the genes the model reads: all M, or the ``n_top_genes`` most variable.

        Parameters
        ----------
        X : scipy.sparse.csr_matrix, shape (N, M), or `BackedCounts`
            Raw counts of the training cells (on disk: read a chunk at a time).
        """
        if X.shape[1] <= self.config.n_top_genes:
            return np.arange(X.shape[1])
        import anndata
        import dask
        import scanpy as sc

        if isinstance(X, BackedCounts):  # scanpy on a dask array of log-normalized chunks read from disk
            lognorm = X.to_dask(log_normalize_sparse)
        else:
            lognorm = log_normalize_sparse(X)  # CSR: scanpy's HVG reads it sparse
        with dask.config.set(scheduler="synchronous"):  # one chunk in memory at a time
            hvg = sc.pp.highly_variable_genes(anndata.AnnData(lognorm), n_top_genes=self.config.n_top_genes,
                                              flavor="seurat", inplace=False)
        return np.flatnonzero(np.asarray(hvg["highly_variable"]))

    def _tensors(self, X):
        """Encoder input ``log1p`` of the counts (N, G), the counts (N, G), rows built per batch
        (`SparseRows`), and the library sizes (N,), a CPU tensor.

        Parameters
        ----------
        X : scipy.sparse.csr_matrix, shape (N, M), float32, or `BackedCounts`
            Raw counts, genes in ``var_names_`` order (on disk: each batch read when drawn).
        """
        if isinstance(X, BackedCounts):
            counts = X if len(self.genes_) == X.shape[1] else X.select_columns(self.genes_)
        else:
            counts = X[:, self.genes_]  # (N, G) CSR
        # over the genes modelled (the NB's proportions are over them); exact: integer counts
        library = torch.from_numpy(library_sizes(counts).astype(np.float32))  # (N,)
        return SparseRows(counts, log1p_rows), SparseRows(counts), library

    def _build_module(self):
        """A new `GMVAEModule` for the G genes of ``genes_`` and K = ``n_clusters_`` (random weights, CPU)."""
        cfg = self.config
        return GMVAEModule(len(self.genes_), self.n_clusters_, cfg.hidden, cfg.latent, cfg.z_reads_y,
                           cfg.prior_scale)

    def _fit(self, data, seed):
        """Train on every cell of ``data`` (checked: N x M raw counts in ``X``)."""
        cfg = self.config
        self.genes_ = self._select_genes(counts_of(data))
        tensors = self._tensors(counts_of(data))
        self.module_ = self._build_module().to(self.device_)
        optimizer = torch.optim.Adam(self.module_.parameters(), lr=cfg.lr)
        loss_fn = functools.partial(gmvae_loss, kl_y=cfg.kl_y)
        epochs = scaled_epochs(cfg.epochs, data.n_obs) if cfg.scale_epochs else cfg.epochs
        warmup = cfg.warmup if epochs == cfg.epochs else round(cfg.warmup * epochs / cfg.epochs)  # same fraction
        self.history = train(self.module_, loss_fn, tensors, optimizer, epochs=epochs,
                             batch_size=cfg.batch_size, seed=seed, kl_weight=linear_warmup(warmup),
                             desc="gmvae")

    def _get_latent(self, data):
        """``sum_k q(k | x) mu_q(x, k)``, ndarray (N, d)."""
        inputs = self._tensors(counts_of(data))[0]
        return predict(self.module_.latent, inputs, embed_batch_size(self.genes_.size), self.device_)

    def _predict(self, data):
        """``argmax_k q(k | x)``, int ndarray (N,)."""
        inputs = self._tensors(counts_of(data))[0]
        return predict(self.module_.q_y, inputs, embed_batch_size(self.genes_.size), self.device_).argmax(1)
