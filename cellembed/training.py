"""The one training loop of the models in `cellembed/models/` (the assignment's ETM keeps its own, Q4).

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

Data parallel (``distributed=True`` or ``"auto"``, in the processes of a `torch.distributed`
process group, e.g. launched by ``torchrun -m cellembed.distributed``; PyTorch DDP's semantics):
every process holds the whole data and the same module (rank 0's parameters are broadcast at the
start), draws the same permutations from ``seed``, and takes its contiguous block of each global
minibatch of ``batch_size`` rows (`shard`: rank r of W the r-th of W near-equal blocks). Its
gradient, weighted by its share of the rows, is summed over the processes, so every process
steps with the gradient of the whole minibatch: W processes at ``batch_size`` B take the steps
of one process at B, to float rounding, provided ``loss_fn`` returns a MEAN over the batch's rows
of per-row terms (the losses here are means, but batch norm and in-batch terms such as the
GMVAE's marginal KL are not per-row: only the AE family passes ``"auto"``). The logged losses, the
validation loss and the stop decisions are the global minibatch's on every process; clipping
acts on the summed gradient. Random draws inside ``loss_fn`` (a VAE's noise) come from torch's
generator, reseeded on ranks above 0 from (seed, rank) so that they differ between processes.
"""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import torch
import torch.distributed as dist
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


class FlatAdam(torch.optim.Adam):
    """`torch.optim.Adam` over one flat buffer that holds every parameter: the same steps, faster.

    The parameters become views of one contiguous tensor; each step concatenates their gradients
    and runs torch's own (single-tensor) Adam once on the whole buffer. Adam is element-wise, so
    every element gets the update it gets from ``torch.optim.Adam(params)``, bit for bit
    (`tests/test_training.py`); what changes is ~10 vector operations a step instead of ~10 per
    parameter tensor: a JAE step of 32 cells (28 tensors) went from 2.5 to 1.9 ms. For small
    modules in small batches, where the per-tensor calls are a step's largest cost.

    Build it after the module is on its device (the views are of that device's buffer). Every
    parameter needs a gradient at every step (``torch.optim.Adam`` would skip one without: a
    flat buffer cannot), else `step` raises.

    Parameters
    ----------
    params : iterable of torch.nn.Parameter
        One device and one dtype.
    **kwargs
        `torch.optim.Adam`'s (``lr``, ``betas``, ``eps``, ``weight_decay``); not ``foreach`` or
        ``fused``, whose rounding differs from the single-tensor form.
    """

    def __init__(self, params, **kwargs):
        members = list(params)
        if {(p.device, p.dtype) for p in members} != {(members[0].device, members[0].dtype)}:
            raise ValueError("FlatAdam: the parameters need one device and one dtype")
        if kwargs.pop("foreach", None) or kwargs.pop("fused", None):
            raise ValueError("FlatAdam: runs torch's single-tensor Adam; foreach / fused do not apply")
        with torch.no_grad():
            flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in members]))
        start = 0
        for p in members:  # each parameter now reads and writes its slice of the buffer
            p.data = flat.data[start:start + p.numel()].view_as(p)
            start += p.numel()
        super().__init__([flat], foreach=False, fused=False, **kwargs)
        self._members, self._flat = members, flat

    def zero_grad(self, set_to_none=True):
        for p in self._members:
            p.grad = None
        self._flat.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        missing = [i for i, p in enumerate(self._members) if p.grad is None]
        if missing:
            raise RuntimeError(f"FlatAdam: parameter {missing[0]} has no gradient in this step; use "
                               "torch.optim.Adam for a module whose parameters do not all take part in every step")
        self._flat.grad = torch.cat([p.grad.reshape(-1) for p in self._members])
        return super().step(closure)


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


def shard(rows, rank, world_size):
    """This process's block of one global minibatch, and its share of the rows.

    Parameters
    ----------
    rows : Tensor, shape (n,)
        The global minibatch's row indices (the same on every process).
    rank, world_size : int

    Returns
    -------
    block : Tensor, shape (n_r,)
        The rank-th of ``world_size`` contiguous blocks (`torch.Tensor.tensor_split`: the first
        ``n % world_size`` blocks hold one row more). A rank left without rows (n < world_size)
        gets the first row with share 0, so that every process computes a loss and a gradient.
    share : float
        ``n_r / n`` (0 for a rank without rows).
    """
    block = rows.tensor_split(world_size)[rank]
    if block.numel() == 0:
        return rows[:1], 0.0
    return block, block.numel() / rows.numel()


def train(module, loss_fn, data, optimizer, *, epochs, batch_size=None, seed=0, lr_schedule=None,
          kl_weight=None, clip_norm=None, valid_fraction=0.0, valid_data=None, valid_batch_size=None,
          patience=None, on_epoch=None, desc="train", drop_last=False, distributed=False):
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
    valid_batch_size : int, optional
        Compute the validation loss over row chunks of this many rows, weighted by their size
        (the mean of a loss that is a mean over rows), e.g. for `SparseRows` validation data that
        is made dense one chunk at a time; None: one batch of every validation row.
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
    distributed : bool or "auto"
        Data parallel over the initialized `torch.distributed` process group (the module
        docstring): True needs one, "auto" uses one when there is one, False never does.
        ``batch_size`` is the global minibatch, split between the processes.

    Returns
    -------
    list of dict
        One row per epoch: ``epoch``, ``loss`` (mean over the epoch's steps), the mean of every
        part, ``kl_weight``, ``lr``, and ``valid_loss`` with a validation split.

    Raises
    ------
    FloatingPointError
        The loss became NaN or infinite.
    RuntimeError
        ``distributed=True`` without a process group.
    ValueError
        ``distributed`` on a module with batch norm (its statistics would be per process).
    """
    generator = torch.Generator().manual_seed(int(seed))
    device = module_device(module)  # data may stay on the CPU: each minibatch moves to the module
    replicas = _replicas(distributed, module, seed, desc)  # None, or (rank, world size)
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
    bar = tqdm(range(epochs), desc=desc, leave=False, dynamic_ncols=True,
               disable=None if replicas is None or replicas[0] == 0 else True)
    for epoch in bar:
        module.train()
        weight = float(kl_weight(epoch))
        sums, steps = {}, 0
        n_train = n_rows if train_rows is None else train_rows.numel()
        for index in batches(n_train, batch_size, generator):
            if drop_last and batch_size is not None and index.numel() < min(batch_size, n_train):
                continue
            rows = index if train_rows is None else train_rows[index]
            share = 1.0
            if replicas is not None:
                rows, share = shard(rows, *replicas)
            loss, parts = loss_fn(module, tuple(t[rows].to(device) for t in data), weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss = loss.item()
            if replicas is not None:
                loss, parts = _sum_gradients(module, share, loss, parts, replicas[1], desc)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{desc}: the loss became {loss} in epoch {epoch}; "
                                         "lower the learning rate or rerun with another --seed")
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip_norm)
            optimizer.step()
            steps += 1
            for key, value in {"loss": loss, **parts}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        row = {"epoch": epoch, **{k: v / max(steps, 1) for k, v in sums.items()},
               "kl_weight": weight, "lr": optimizer.param_groups[0]["lr"]}
        if scheduler is not None:
            scheduler.step()
        stop = False
        if valid_data is not None:
            module.eval()
            batch, share = valid_data, 1.0
            if replicas is not None:
                rows, share = shard(torch.arange(valid_data[0].shape[0]), *replicas)
                batch = tuple(t[rows] for t in valid_data)
            row["valid_loss"] = _valid_loss(module, loss_fn, batch, weight, device, valid_batch_size)
            if replicas is not None:
                row["valid_loss"] = _all_sum([share * row["valid_loss"]], device)[0]
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
        if replicas is not None:  # one process stopping stops all (each waits on the others' gradients)
            stop = _all_sum([float(stop)], device)[0] > 0
        if stop:
            break
    bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return history


@torch.no_grad()
def _valid_loss(module, loss_fn, batch, weight, device, chunk=None):
    """``loss_fn``'s loss of every row of ``batch`` (a float): in one call, or over row chunks
    of ``chunk`` rows weighted by their share of the rows (`train`'s ``valid_batch_size``)."""
    n_rows = batch[0].shape[0]
    if chunk is None or chunk >= n_rows:
        return float(loss_fn(module, tuple(t[:n_rows].to(device) for t in batch), weight)[0])
    total = 0.0
    for start in range(0, n_rows, chunk):
        part = tuple(t[start:start + chunk].to(device) for t in batch)
        total += float(loss_fn(module, part, weight)[0]) * part[0].shape[0] / n_rows
    return total


def _replicas(distributed, module, seed, desc):
    """(rank, world size) when ``train`` runs data parallel, else None; then the replicas start equal.

    Broadcasts rank 0's parameters and buffers, and reseeds torch's generator on ranks above 0
    from (seed, rank) (rank 0 keeps the caller's, so one process gives a plain run's numbers).
    """
    if distributed not in (False, True, "auto"):
        raise ValueError(f"{desc}: distributed={distributed!r}; use False, True or 'auto'")
    initialized = dist.is_available() and dist.is_initialized()
    if distributed is True and not initialized:
        raise RuntimeError(f"{desc}: distributed=True, but no torch.distributed process group is initialized; "
                           "launch with torchrun (e.g. torchrun --nproc-per-node 2 -m cellembed.distributed ...) "
                           "or call torch.distributed.init_process_group first")
    if not distributed or not initialized:
        return None
    norms = [name for name, m in module.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        raise ValueError(f"{desc}: batch norm ({norms[0]}) would normalize each process's block with its own "
                         "statistics, not the minibatch's; train this module in one process (distributed=False)")
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)
    rank = dist.get_rank()
    if rank > 0:
        torch.manual_seed(int(np.random.SeedSequence([int(seed), rank]).generate_state(1)[0]))
    return rank, dist.get_world_size()


def _all_sum(values, device):
    """Sum over the processes of a list of floats (float64 on ``device``: NCCL reduces on the GPU)."""
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def _sum_gradients(module, share, loss, parts, world_size, desc):
    """Replace every gradient by the sum over the processes of ``share`` times it (the global
    minibatch's gradient of a mean loss); returns the minibatch's loss and parts, summed alike.

    Parameters
    ----------
    share : float
        This process's fraction of the minibatch's rows (`shard`).
    loss : float
        The mean loss of this process's rows.
    parts : dict of float
        Its logged parts (the same keys on every process).
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    sizes = [g.numel() for g in grads]
    total = _all_sum([sum(sizes), share * loss, *(share * float(parts[k]) for k in parts)], module_device(module))
    if total[0] != world_size * sum(sizes):
        raise RuntimeError(f"{desc}: the processes' gradients differ in size ({sum(sizes)} values here); every "
                           "process must run the same module and loss on the same kind of batch")
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads]) * share  # (P,) one collective for every parameter
        dist.all_reduce(flat)
        for grad, summed in zip(grads, flat.split(sizes)):
            grad.copy_(summed.view_as(grad))
    return total[1], dict(zip(parts, total[2:]))


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
