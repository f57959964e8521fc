"""The course's embedded topic model as a registry model (``etm``): an adapter around Q4.

The model is `etm.ETM` with the assignment's hyperparameters (`comp565_A4.build_etm`), trained
by the assignment's step (`comp565_A4.train_scETM_helper`: Adam, lr 1e-3, weight decay 1.2e-6,
gradient norm clipped to 2); the embedding is `comp565_A4.get_theta`.

Two solvers (``solver``, shared with ``scetm``, `Minibatching`):

- ``"full"``: the assignment's loop (`comp565_A4.train_scETM`): ``niter`` full-batch steps on the
  dense (N, M) normalized counts of every cell.
- ``"minibatch"``: ``niter`` steps of the same step function, each on ``batch_size`` cells
  (`minibatch_rows`: consecutive slices of a stream of shuffled epochs drawn from the fit's seed,
  as scETM's ``CellSampler``); each step's counts and normalized rows are built from that batch's
  rows of the CSR counts (`comp565_A4.normalized_counts` of the batch). Nothing N x M is formed;
  a step costs the same whatever N is.
- ``"auto"`` (the default): ``"full"`` up to `cellembed.data.minibatch.EPOCHS_DECAY_CELLS`
  (20,000) cells, ``"minibatch"`` above.

Either way the embedding is computed in row chunks of `cellembed.data.minibatch.embed_batch_size`
cells (each chunk's normalized rows made from its CSR rows): the same numbers as on all cells at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellembed.evaluation.scoring import NoScorer, PerfRecorder
from cellembed.data.minibatch import check_solver
from cellembed.models.base import Model

SOLVERS = ("auto", "full", "minibatch")


@dataclass
class Minibatching:
    """How the training steps of the ETMs see the cells (fields of `ETMConfig` and scETM's config)."""

    # "full": every step on every cell (the assignment's loop); "minibatch": every step on batch_size
    # cells from the CSR counts; "auto": "full" up to EPOCHS_DECAY_CELLS (20,000) cells, then "minibatch"
    solver: str = "auto"
    # Cells per minibatch step: scETM's (Zhao et al. 2021) UnsupervisedTrainer default, batch_size=2000
    # (hui2000ji/scETM, src/scETM/trainers/UnsupervisedTrainer.py).
    batch_size: int = 2000

    def __post_init__(self):
        check_solver(self, SOLVERS)


@dataclass
class ETMConfig(Minibatching):
    niter: int = 1000  # the assignment's Q4 steps (the minibatch solver: steps too, one minibatch each)
    precision: str = "auto"  # the encoder's first layer: auto (bf16 where the CPU/GPU has it), fp32, bf16


def resolve_solver(solver, n_cells):
    """``solver`` with ``"auto"`` resolved: ``"full"`` up to ``EPOCHS_DECAY_CELLS`` cells, ``"minibatch"`` above."""
    from cellembed.data import minibatch  # (imports torch: only when asked)

    if solver != "auto":
        return solver
    return "full" if n_cells <= minibatch.EPOCHS_DECAY_CELLS else "minibatch"


def minibatch_rows(n_cells, batch_size, generator):
    """Endless row indices of minibatches, LongTensor (min(batch_size, N),) each.

    As scETM's ``CellSampler``: consecutive slices of a stream of shuffled epochs (one
    ``randperm`` per epoch, from ``generator``), a batch at an epoch's end completed from the next
    epoch, so every batch holds ``batch_size`` cells. With ``batch_size >= n_cells`` every batch is
    every cell in order (the full batch).
    """
    import torch

    if batch_size >= n_cells:
        while True:
            yield torch.arange(n_cells)
    order, start = torch.randperm(n_cells, generator=generator), 0
    while True:
        parts, needed = [], batch_size
        while needed:
            if start == n_cells:
                order, start = torch.randperm(n_cells, generator=generator), 0
            part = order[start:start + needed]
            parts.append(part)
            start, needed = start + part.numel(), needed - part.numel()
        yield torch.cat(parts)  # (B,)


class TopicModel(Model):
    """What the course ETM and scETM share: topic proportions softmax(mu(x / total)), (N, K), as the
    embedding, and the two solvers (module docstring)."""

    def _set_precision(self):
        """The encoder's first layer in bf16 or fp32 (`cellembed.runtime.use_bf16`); drops its kept input."""
        from cellembed.runtime import use_bf16

        self.module_.set_encoder_bf16(use_bf16(self.config.precision, self.device_))

    def _train(self, data, seed, desc, optimizer=None, kl_weight=None, step_module=None):
        """Train ``module_`` for ``niter`` steps with the config's solver; fills ``history``.

        Parameters
        ----------
        data : anndata.AnnData
            The checked cells (``X`` CSR float32 counts, N x M).
        seed : int
            Draws the minibatches.
        desc : str
            Progress-bar label.
        optimizer : torch.optim.Optimizer, optional
            Default: the assignment's Adam (`comp565_A4.assignment_optimizer`).
        kl_weight : callable, optional
            ``step -> weight`` of the KL term; default 1.
        step_module : callable, optional
            ``rows (B,) -> module`` whose ``forward(counts, normalized)`` is the loss of those
            cells (scETM: their batch codes); default ``module_``.
        """
        import comp565_A4 as course

        self._set_precision()
        niter = self.config.niter
        if resolve_solver(self.config.solver, data.n_obs) == "full":
            counts, normalized = course.normalized_counts(data, self.device_)
            self.module_, perf = course.train_scETM(self.module_, counts, normalized, data, niter, scorer=NoScorer(),
                                                    optimizer=optimizer, kl_weight=kl_weight, desc=desc)
        else:
            import torch

            perf = PerfRecorder(desc, "nelbo", niter, None, NoScorer())
            batches = minibatch_rows(data.n_obs, self.config.batch_size, torch.Generator().manual_seed(int(seed)))
            for i in perf:
                rows = next(batches)  # (B,)
                counts, normalized = course.normalized_counts(data[rows.numpy()], self.device_)  # (B, M)
                module = self.module_ if step_module is None else step_module(rows)
                weight = 1.0 if kl_weight is None else kl_weight(i)
                perf.record(i, course.train_scETM_helper(module, counts, normalized, optimizer, weight), None)
            perf = perf.table()
        self._set_precision()
        self.history = [{"iteration": int(i), "nelbo": float(v)} for i, v, _ in perf]

    def _get_latent(self, data):
        """Topic proportions, (N, K), in row chunks of `cellembed.data.minibatch.embed_batch_size` cells."""
        import comp565_A4 as course

        from cellembed.data.minibatch import embed_batch_size

        self._set_precision()  # as in fit (also after `load`)
        step = embed_batch_size(data.n_vars)
        theta = []
        for i in range(0, data.n_obs, step):
            _, normalized = course.normalized_counts(data[i:i + step], self.device_)  # (B, M)
            theta.append(course.get_theta(self.module_, normalized).cpu().numpy())  # (B, K)
        self._set_precision()  # the encoder keeps no reference to these cells
        return np.concatenate(theta)


class CourseETM(TopicModel):
    """The assignment's ETM: K = 16 topics. Fitted attribute: ``module_`` (`etm.ETM`)."""

    Config = ETMConfig
    quick = {"niter": 5}

    def _build_module(self):
        import comp565_A4 as course

        return course.build_etm(len(self.var_names_), self.device_)

    def _fit(self, data, seed):
        self.module_ = self._build_module()
        self._train(data, seed, "ETM")
