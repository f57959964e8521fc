"""scETM with batch correction (Zhao et al., Nature Communications 2021).

The course ETM (`etm.ETM`) mixes topic distributions: ``p_i = theta_i @ softmax_genes(alpha rho^T)``.
scETM mixes in logit space and adds a gene bias per batch (the paper's lambda), so that what
the two mice differ in by gene, whatever the cell type, is not left for the topics to explain:

    log p_i = log_softmax_genes(theta_i @ alpha @ rho^T + lambda_{b(i)})       (N, M)

with ``theta_i = softmax(z_i)``, ``z_i ~ N(mu(x_i), sigma(x_i))`` from the encoder, and
``b(i)`` the batch of cell i. Training minimizes ``-sum_j x_ij log p_ij + w_t KL(q(z_i) || N(0, I))``
(mean over cells), where ``w_t`` rises linearly from 0 to 1 over the first ``kl_warmup``
training steps (KL warm-up; 1 throughout when ``kl_warmup=0``).

`BatchETM` keeps the course ETM's interface, so the assignment's own loop trains it unchanged:
``comp565_A4.train_scETM(model, X_tensor, X_tensor_normalized, adata, niter)`` calls
``model(X_tensor, X_tensor_normalized) -> (nll, kl)`` and ``comp565_A4.get_theta`` reads
``model.q_theta`` and ``model.mu_q_theta``. That loop passes no batch labels, so the model
holds the batch of every cell (a buffer set at construction) and trains on all cells at once.
Its learning rate comes from `set_optimizer`, which the loop's ``assignment_optimizer`` picks up.
The module knows nothing of AnnData or files: `batch_codes` turns a column of labels into the
integer codes it takes.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn, optim

from a4.likelihoods import CSRCounts, categorical_logits_nll
from etm import ETM, EncoderLinear

# Defaults chosen on Mouse Pancreas by mean final ARI over seeds 0-4 (README, "Results";
# `python bench/results_table.py --models scetm --scetm-lr ...` reruns the comparison).
DEFAULT_NUM_TOPICS = 16
DEFAULT_LR = 5e-3  # Adam learning rate, through `set_optimizer` (the assignment's is 1e-3)
DEFAULT_ANNEAL = None  # cosine-anneal the learning rate over this many steps (None: constant)
DEFAULT_KL_WARMUP = 300  # steps over which the KL weight rises from 0 to 1


def batch_codes(labels):
    """Integer codes 0..B-1 of batch labels, in sorted order of the labels.

    Parameters
    ----------
    labels : array-like, shape (N,)
        One batch label per cell (e.g. ``adata.obs['batch']``).

    Returns
    -------
    ndarray of int64, shape (N,)
    """
    codes, _ = pd.factorize(np.asarray(labels), sort=True)
    assert (codes >= 0).all(), "batch labels contain missing values; every cell needs a batch"
    return codes.astype(np.int64)


def set_optimizer(model, lr, weight_decay=1.2e-6, anneal_steps=None):
    """Give ``model`` the Adam optimizer that `comp565_A4.train_scETM_helper` will use.

    The assignment's helper makes ``Adam(lr=1e-3, weight_decay=1.2e-6)`` unless the model
    already has an ``optimizer`` attribute; this sets one with another learning rate, and
    optionally a cosine schedule that the optimizer advances itself after every step (so the
    assignment's loop, which only calls ``optimizer.step()``, follows it).

    Parameters
    ----------
    model : torch.nn.Module
    lr : float
        Learning rate (the peak, with ``anneal_steps``).
    weight_decay : float
        The assignment's 1.2e-6 by default.
    anneal_steps : int, optional
        Cosine-anneal the learning rate from ``lr`` to 0 over this many steps (then 0);
        None keeps it constant.

    Returns
    -------
    torch.optim.Adam
    """
    assert lr > 0, f"the learning rate must be positive, got {lr}"
    optimizer = optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if anneal_steps is not None:
        assert anneal_steps >= 1, f"anneal_steps must be at least 1, got {anneal_steps}"
        schedule = optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, anneal_steps) / anneal_steps))
        )
        optimizer.register_step_post_hook(lambda opt, args, kwargs: schedule.step())
        optimizer.schedule = schedule
    model.optimizer = optimizer
    return optimizer


def make_scetm(n_genes, batch_index, lr=DEFAULT_LR, anneal_steps=DEFAULT_ANNEAL, **options):
    """A `BatchETM` with its optimizer set (`set_optimizer`), ready for `comp565_A4.train_scETM`.

    Parameters
    ----------
    n_genes : int
        M genes.
    batch_index : array-like of int, shape (N,)
        Batch code of every cell (`batch_codes`).
    lr, anneal_steps : float, int or None
        See `set_optimizer`.
    **options
        `BatchETM` options (``num_topics``, ``kl_warmup``, ...); their defaults otherwise.

    Returns
    -------
    BatchETM
    """
    model = BatchETM(n_genes, batch_index, **options)
    set_optimizer(model, lr, anneal_steps=anneal_steps)
    return model


class InputLayer(EncoderLinear):
    """The encoder's first layer: optionally ``log1p(scale * x)``, then ``x W^T + b``.

    The input (the normalized counts) is the same tensor every step, so its transformed copy
    (and its bfloat16 copy, with ``bf16``) is made once and kept (`etm.EncoderLinear.prepared`).

    Parameters
    ----------
    in_features, out_features : int
        M genes, H hidden units.
    log1p_scale : float or None
        None feeds the normalized counts as they are; a number ``s`` feeds ``log1p(s x)``
        (``s = 1e4``: scanpy's ``normalize_total`` + ``log1p``).
    """

    def __init__(self, in_features, out_features, log1p_scale=None):
        super().__init__(in_features, out_features)
        assert log1p_scale is None or log1p_scale > 0, f"log1p_scale must be positive, got {log1p_scale}"
        self.log1p_scale = log1p_scale
        self.transforms_input = log1p_scale is not None

    def transform(self, x):
        """``log1p(log1p_scale * x)``, shape (N, M) (``x`` itself without a scale)."""
        return x if self.log1p_scale is None else torch.log1p(x * self.log1p_scale)


class BatchShift(nn.Module):
    """Adds a learned vector per batch to every cell's hidden units: the batch as an encoder input.

    Equivalent to appending the batch one-hot to the encoder input (scETM's
    ``input_batch_id``). Holds the batch of every cell, so it takes all cells at once.

    Parameters
    ----------
    batch_index : LongTensor, shape (N,)
    n_batches : int
    width : int
        H, the hidden width.
    """

    def __init__(self, batch_index, n_batches, width):
        super().__init__()
        self.register_buffer("batch_index", batch_index.clone())
        self.shift = nn.Embedding(n_batches, width)
        nn.init.zeros_(self.shift.weight)

    def forward(self, h):
        assert h.shape[0] == self.batch_index.shape[0], (
            f"got {h.shape[0]} cells, but the model holds batches for {self.batch_index.shape[0]}: "
            "the batch input needs all cells at once"
        )
        return h + self.shift(self.batch_index)  # (N, H)


class BatchETM(ETM):
    """scETM: the ETM with a logit-space decoder and a gene bias per batch.

    Parameters
    ----------
    vocab_size : int
        M genes.
    batch_index : array-like of int, shape (N,)
        Batch code (0..B-1) of every cell, in the order of the rows the model is trained on
        (see `batch_codes`).
    num_topics : int
        K topics.
    t_hidden_size : int
        Width of the encoder's two hidden layers.
    rho_size : int
        L, dimension of the gene and topic embeddings.
    theta_act : str
        Encoder activation (see `etm.ETM.get_activation`).
    enc_drop : float
        Dropout on the encoder output during training.
    batch_bias : bool
        Add lambda_b, a (B, M) gene bias per batch, to the logits. False keeps a single
        gene bias for all cells (B = 1), the logit-space ETM without batch correction.
    batch_input : bool
        Also give the encoder the batch (`BatchShift`).
    log1p_scale : float or None
        Encoder input ``log1p(log1p_scale * x / total)``; None: ``x / total`` as in the course ETM.
    kl_warmup : int
        Training steps over which the KL weight rises linearly from 0 to ``kl_scale``
        (0: ``kl_scale`` from the start).
    kl_scale : float
        The KL weight after warm-up (1: the ELBO; above 1 a beta-VAE's stronger prior).
    normed_loss : float or None
        None: the likelihood of the raw counts. A number ``s``: of the counts rescaled to ``s``
        per cell, ``s x / total`` (scETM's ``normed_loss`` with ``s = 1``), so that every cell
        weighs the same in the loss whatever its depth.
    log_loss : bool
        Reconstruct ``log1p`` of those counts instead (a categorical likelihood with
        fractional counts), which weighs a gene's first molecules more than its hundredth.
    n_batches : int, optional
        B; default ``max(batch_index) + 1``.
    """

    def __init__(self, vocab_size, batch_index, num_topics=DEFAULT_NUM_TOPICS, t_hidden_size=256,
                 rho_size=256, theta_act="relu", enc_drop=0.5, batch_bias=True, batch_input=False,
                 log1p_scale=None, kl_warmup=DEFAULT_KL_WARMUP, kl_scale=1.0, normed_loss=None, log_loss=False,
                 n_batches=None):
        super().__init__(num_topics, vocab_size, t_hidden_size, rho_size, theta_act,
                         embeddings=None, train_embeddings=True, enc_drop=enc_drop)
        batch_index = torch.as_tensor(np.asarray(batch_index), dtype=torch.long)  # (N,)
        assert batch_index.ndim == 1 and batch_index.numel() > 0, (
            f"batch_index must be one code per cell, got shape {tuple(batch_index.shape)}"
        )
        assert int(batch_index.min()) >= 0, f"batch codes must be >= 0, got {int(batch_index.min())}"
        n_batches = int(batch_index.max()) + 1 if n_batches is None else int(n_batches)
        assert int(batch_index.max()) < n_batches, (
            f"batch code {int(batch_index.max())} is out of range for n_batches={n_batches}"
        )
        assert kl_warmup >= 0, f"kl_warmup must be >= 0 steps, got {kl_warmup}"
        assert kl_scale > 0, f"kl_scale must be positive, got {kl_scale}"
        self.kl_scale = float(kl_scale)
        assert normed_loss is None or normed_loss > 0, f"normed_loss must be positive, got {normed_loss}"
        self.normed_loss = normed_loss
        self.log_loss = bool(log_loss)
        self.n_batches = n_batches
        self.kl_warmup = int(kl_warmup)
        self.register_buffer("batch_index", batch_index if batch_bias else torch.zeros_like(batch_index))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training steps taken
        # lambda: one gene bias per batch (a single one without batch correction)
        self.batch_bias = nn.Parameter(torch.zeros(n_batches if batch_bias else 1, vocab_size))
        # onehot(b(i)), so that the bias enters the logits in the same product as the topics
        self.register_buffer("batch_onehot", F.one_hot(self.batch_index, self.batch_bias.shape[0]).float())

        layers = [InputLayer(vocab_size, t_hidden_size, log1p_scale)]
        if batch_input:
            layers.append(BatchShift(batch_index, n_batches, t_hidden_size))
        layers += [self.theta_act, nn.Linear(t_hidden_size, t_hidden_size), self.theta_act]
        self.q_theta = nn.Sequential(*layers)

    def kl_weight(self):
        """The KL weight of the next training step: kl_scale * min(1, steps / kl_warmup)."""
        if self.kl_warmup == 0:
            return self.kl_scale
        return self.kl_scale * min(1.0, float(self.steps) / self.kl_warmup)

    def topic_logits(self):
        """alpha @ rho^T, shape (K, M): each topic's additive effect on the gene logits."""
        return self.alphas(self.rho.weight).T  # (K, M)

    def logits(self, theta):
        """Gene logits of every cell, ``theta @ alpha @ rho^T + lambda_b``, shape (N, M).

        Computed as one product ``[theta, onehot(b)] @ [alpha rho^T; lambda]`` (N x (K + B)
        times (K + B) x M): the bias's gradient is then a matrix product too, not a scatter
        over the N x M gradient.

        Parameters
        ----------
        theta : Tensor, shape (N, K)
            Topic proportions of the N cells the model holds batches for, in that order.
        """
        assert theta.shape[0] == self.batch_index.shape[0], (
            f"got {theta.shape[0]} cells, but the model holds batches for "
            f"{self.batch_index.shape[0]}: BatchETM decodes all cells at once"
        )
        factors = torch.cat([theta, self.batch_onehot], dim=1)  # (N, K + B)
        return factors @ torch.cat([self.topic_logits(), self.batch_bias], dim=0)  # (N, M)

    def forward(self, bows, normalized_bows, theta=None):
        """Negative ELBO terms ``(nll, kl)``, means over cells: the arguments of `etm.ETM.forward`.

        ``nll = -mean_i sum_j x_ij log_softmax(logits_i)_j`` (with `logits`; ``x`` is the raw
        counts or the `target` transform of them); ``kl`` carries the warm-up weight
        (`kl_weight`) and is None when ``theta`` is given.
        """
        n_cells = bows.shape[0]
        assert n_cells == normalized_bows.shape[0], (
            f"counts have {n_cells} cells but normalized counts {normalized_bows.shape[0]}"
        )
        kl = None
        if theta is None:
            theta, kl = self.get_theta(normalized_bows)  # (N, K)
            if self.training and torch.is_grad_enabled():
                kl = kl * self.kl_weight()
                self.steps += 1
        nll = categorical_logits_nll(self.logits(theta), self.target(bows, normalized_bows))
        return nll, kl

    def target(self, bows, normalized_bows):
        """What the likelihood reconstructs: the raw counts, or (``normed_loss``, ``log_loss``)
        a transform of them, made once per input and kept.

        Returns
        -------
        Tensor (N, M) or a4.likelihoods.CSRCounts
        """
        if self.normed_loss is None and not self.log_loss:
            return bows
        source = normalized_bows if self.normed_loss is not None else bows
        version = (source.values if isinstance(source, CSRCounts) else source)._version
        cached = getattr(self, "_target", None)
        if cached is None or cached[0] is not source or cached[1] != version:
            with torch.no_grad():
                if self.normed_loss is not None:
                    x = normalized_bows * self.normed_loss  # (N, M), s per cell
                else:
                    x = bows.dense() if isinstance(bows, CSRCounts) else bows  # (N, M)
                if self.log_loss:
                    x = torch.log1p(x)
            cached = (source, version, x)
            self._target = cached
        return cached[2]


__all__ = ["BatchETM", "BatchShift", "InputLayer", "batch_codes", "make_scetm", "set_optimizer"]
