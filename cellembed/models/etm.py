"""The course's embedded topic model as a registry model (``etm``): an adapter around Q4.

The model is `etm.ETM` with the assignment's hyperparameters (`comp565_A4.build_etm`), trained
by the assignment's own loop (`comp565_A4.train_scETM`: full-batch Adam, lr 1e-3, weight decay
1.2e-6, gradient norm clipped to 2); the embedding is `comp565_A4.get_theta`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cellembed.evaluation.scoring import NoScorer
from cellembed.models.base import Model


@dataclass
class ETMConfig:
    niter: int = 1000  # the assignment's Q4 steps
    precision: str = "auto"  # the encoder's first layer: auto (bf16 where the CPU/GPU has it), fp32, bf16


class TopicModel(Model):
    """What the course ETM and scETM share: topic proportions softmax(mu(x / total)), (N, K), as the embedding."""

    def _set_precision(self):
        """The encoder's first layer in bf16 or fp32 (`cellembed.runtime.use_bf16`); drops its kept input."""
        from cellembed.runtime import use_bf16

        self.module_.set_encoder_bf16(use_bf16(self.config.precision, self.device_))

    def _get_latent(self, data):
        """Topic proportions, (N, K)."""
        import comp565_A4 as course

        _, normalized = course.normalized_counts(data, self.device_)
        self._set_precision()  # as in fit (also after `load`)
        theta = course.get_theta(self.module_, normalized).cpu().numpy()
        self._set_precision()  # the encoder keeps no reference to these cells
        return theta


class CourseETM(TopicModel):
    """The assignment's ETM: K = 16 topics. Fitted attribute: ``module_`` (`etm.ETM`)."""

    Config = ETMConfig
    quick = {"niter": 5}

    def _build_module(self):
        import comp565_A4 as course

        return course.build_etm(len(self.var_names_), self.device_)

    def _fit(self, data, seed):
        import comp565_A4 as course

        counts, normalized = course.normalized_counts(data, self.device_)
        self.module_ = self._build_module()
        self._set_precision()
        self.module_, perf = course.train_scETM(self.module_, counts, normalized, data, self.config.niter,
                                                scorer=NoScorer(), desc="ETM")
        self._set_precision()
        self.history = [{"iteration": int(i), "nelbo": float(v)} for i, v, _ in perf]
