"""The one training loop of the models in `models/` (the assignment's ETM keeps its own, Q4).

As pytorch/examples' ``train(args, model, device, loader, optimizer, epoch)`` and scvi-tools'
training plan: the caller builds the optimizer and passes it in with the learning-rate and
KL-weight schedules; a module never holds its optimizer or counts its own steps.

    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    history = train(module, vae_loss, (x,), optimizer, epochs=200, batch_size=256,
                    kl_weight=linear_warmup(50), seed=seed, desc="vae")

``loss_fn(module, batch, kl_weight) -> (loss, parts)`` computes one minibatch's loss (a scalar
tensor) and a dict of floats to log; the loop does the rest: shuffling, steps, gradient
clipping, schedules, a validation split with early stopping, the progress bar, and a history
with one row per epoch. A non-finite loss stops training with an error naming the epoch.
"""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import torch
from tqdm.auto import tqdm


def seed_everything(seed):
    """One seed for Python's random, numpy's global generator and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def linear_warmup(epochs, start=0.0, end=1.0):
    """KL weight rising linearly from ``start`` to ``end`` over ``epochs`` epochs, then ``end``.

    Returns
    -------
    callable
        ``epoch (0-based) -> weight``; epoch 0 gets ``start`` (``end`` at once when ``epochs`` is 0).
    """
    if epochs <= 0:
        return lambda epoch: end
    return lambda epoch: start + (end - start) * min(1.0, epoch / epochs)


def constant(value=1.0):
    """A schedule that is always ``value``."""
    return lambda epoch: value


def batches(n_rows, batch_size, generator, shuffle=True):
    """Row indices of the minibatches of one epoch, shape (batch_size,) each (the last may be shorter).

    Parameters
    ----------
    n_rows : int
    batch_size : int or None
        None: one batch of every row.
    generator : torch.Generator
        Draws the permutation (one per epoch), so the order follows the seed.
    shuffle : bool
    """
    order = torch.randperm(n_rows, generator=generator) if shuffle else torch.arange(n_rows)
    if batch_size is None or batch_size >= n_rows:
        return [order]
    return list(order.split(batch_size))


def train(module, loss_fn, data, optimizer, *, epochs, batch_size=None, seed=0, lr_schedule=None,
          kl_weight=None, clip_norm=None, valid_fraction=0.0, valid_data=None, patience=None, on_epoch=None,
          desc="train", drop_last=False):
    """Train ``module`` on ``data`` for up to ``epochs`` epochs; returns the history.

    Parameters
    ----------
    module : torch.nn.Module
    loss_fn : callable
        ``loss_fn(module, batch, kl_weight) -> (loss, parts)``: ``batch`` is a tuple of the
        rows of every tensor in ``data``; ``loss`` a scalar tensor; ``parts`` a dict of floats.
    data : tuple of Tensor
        Tensors sharing their first dimension (N rows).
    optimizer : torch.optim.Optimizer
        Over ``module``'s parameters.
    epochs : int
    batch_size : int, optional
        Rows per step; None: full batch.
    seed : int
        Seeds the shuffling and the validation split (the caller seeds the initialization).
    lr_schedule : callable, optional
        ``epoch -> multiplier`` of the optimizer's learning rate (`torch.optim.lr_scheduler.LambdaLR`).
    kl_weight : callable, optional
        ``epoch -> weight`` passed to ``loss_fn`` (KL warm-up); default 1.
    clip_norm : float, optional
        Clip the gradient norm to this value.
    valid_fraction : float
        Hold out this fraction of the rows (random, by ``seed``) and log their loss every epoch.
    valid_data : tuple of Tensor, optional
        A validation set of its own (tensors laid out as ``data``, e.g. a stratified split made
        by the caller), instead of ``valid_fraction``: its loss is logged every epoch.
    patience : int, optional
        With a validation split or set: stop when its loss has not improved for this many epochs,
        and restore the parameters of the best epoch.
    on_epoch : callable, optional
        ``on_epoch(epoch, row) -> bool``, called after every epoch with its history row;
        True stops training (e.g. a clustering that stopped changing).
    desc : str
        Progress-bar label and the name in error messages.
    drop_last : bool
        Skip a last minibatch smaller than ``batch_size`` (batch norm needs 2+ rows).

    Returns
    -------
    list of dict
        One row per epoch: ``epoch``, ``loss`` (mean over the epoch's steps), the mean of every
        part, ``kl_weight``, ``lr``, and ``valid_loss`` with a validation split.

    Raises
    ------
    FloatingPointError
        The loss became NaN or infinite.
    """
    generator = torch.Generator().manual_seed(int(seed))
    device = module_device(module)  # data may stay on the CPU: each minibatch moves to the module
    n_rows = data[0].shape[0]
    assert all(t.shape[0] == n_rows for t in data), "every tensor of data needs the same number of rows"
    if valid_fraction > 0 and valid_data is not None:
        raise ValueError(f"{desc}: pass valid_fraction or valid_data, not both")
    train_rows = None
    if valid_fraction > 0:
        perm = torch.randperm(n_rows, generator=generator)
        n_valid = max(1, int(round(valid_fraction * n_rows)))
        valid_rows, train_rows = perm[:n_valid], perm[n_valid:]
        valid_data = tuple(t[valid_rows] for t in data)
    scheduler = None
    if lr_schedule is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule)
    kl_weight = kl_weight or constant(1.0)
    history, best, best_state, stale = [], math.inf, None, 0
    bar = tqdm(range(epochs), desc=desc, leave=False, dynamic_ncols=True, disable=None)
    for epoch in bar:
        module.train()
        weight = float(kl_weight(epoch))
        sums, steps = {}, 0
        n_train = n_rows if train_rows is None else train_rows.numel()
        for index in batches(n_train, batch_size, generator):
            if drop_last and batch_size is not None and index.numel() < min(batch_size, n_train):
                continue
            rows = index if train_rows is None else train_rows[index]
            loss, parts = loss_fn(module, tuple(t[rows].to(device) for t in data), weight)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the loss became {loss.item()} in epoch {epoch}; "
                                         "lower the learning rate or rerun with another --seed")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip_norm)
            optimizer.step()
            steps += 1
            for key, value in {"loss": loss.item(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        row = {"epoch": epoch, **{k: v / max(steps, 1) for k, v in sums.items()},
               "kl_weight": weight, "lr": optimizer.param_groups[0]["lr"]}
        if scheduler is not None:
            scheduler.step()
        stop = False
        if valid_data is not None:
            module.eval()
            with torch.no_grad():
                valid_loss, _ = loss_fn(module, tuple(t.to(device) for t in valid_data), weight)
            row["valid_loss"] = float(valid_loss)
            if row["valid_loss"] < best:
                best, stale = row["valid_loss"], 0
                if patience is not None:
                    best_state = copy.deepcopy(module.state_dict())
            else:
                stale += 1
                stop = patience is not None and stale >= patience
        history.append(row)
        bar.set_postfix({"loss": f"{row['loss']:.4g}"})
        if on_epoch is not None and on_epoch(epoch, row):
            stop = True
        if stop:
            break
    bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return history


def module_device(module):
    """The device of ``module``'s parameters (the CPU for a module without any)."""
    return next(module.parameters(), torch.empty(0)).device


@torch.no_grad()
def predict(fn, x, batch_size=4096, device=None):
    """``fn`` applied without gradients to row batches of ``x``, results concatenated.

    Call it with the module in evaluation mode (`train` leaves it there), so that dropout and
    sampling are off and the result is deterministic.

    Parameters
    ----------
    fn : callable
        Tensor (B, ...) -> Tensor (B, d).
    x : Tensor, shape (N, ...)
    device : torch.device, optional
        Where ``fn`` computes: each row batch of ``x`` is moved there (default: where ``x`` is).

    Returns
    -------
    ndarray, shape (N, d)
    """
    device = x.device if device is None else device
    return torch.cat([fn(x[i:i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)]).numpy()
