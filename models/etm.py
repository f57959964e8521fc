"""The course's embedded topic model as a registry model (``etm``): an adapter around Q4.

The model is `etm.ETM` with the assignment's hyperparameters (`comp565_A4.build_etm`), trained
by the assignment's own loop (`comp565_A4.train_scETM`: full-batch Adam, lr 1e-3, weight decay
1.2e-6, gradient norm clipped to 2); the embedding is `comp565_A4.get_theta`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from a4.scoring import NoScorer
from a4.training import seed_everything
from models.base import Model


@dataclass
class ETMConfig:
    niter: int = 1000  # the assignment's Q4 steps
    precision: str = "auto"  # the encoder's first layer: auto (bf16 where the CPU/GPU has it), fp32, bf16


class CourseETM(Model):
    """The assignment's ETM: K = 16 topics; theta = softmax(mu(x / total)) is the embedding."""

    Config = ETMConfig
    quick = {"niter": 5}

    def fit(self, adata, seed=0):
        import comp565_A4 as course
        from a4.runtime import use_bf16

        seed_everything(seed)
        counts, normalized = course.normalized_counts(adata)
        self.module = course.build_etm(adata.n_vars)
        self.module.set_encoder_bf16(use_bf16(self.config.precision, torch.device("cpu")))
        self.module, perf = course.train_scETM(self.module, counts, normalized, adata, self.config.niter,
                                               scorer=NoScorer(), desc="ETM")
        self.history = [{"iteration": int(i), "nelbo": float(v)} for i, v, _ in perf]
        return self

    def get_latent(self, adata):
        """Topic proportions, (N, 16)."""
        import comp565_A4 as course

        _, normalized = course.normalized_counts(adata)
        return course.get_theta(self.module, normalized).cpu().numpy()
