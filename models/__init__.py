"""More single-cell models, sharing the likelihoods of `a4.likelihoods` and the assignment's
training loop (`comp565_A4.train_scETM`)."""

from models.scetm import BatchETM, batch_codes, make_scetm, set_optimizer

__all__ = ["BatchETM", "batch_codes", "make_scetm", "set_optimizer"]
