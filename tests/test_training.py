"""The training loop's optimizer helper: `FlatAdam` takes torch's Adam steps bit for bit."""

import copy

import pytest
import torch

from cellembed.models.jae import JAEModule, jae_loss
from cellembed.training import FlatAdam, train


def _jae_data(n=300, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g), torch.randint(0, 4, (n,), generator=g), torch.randn(n, 2, generator=g))


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_flat_adam_takes_torch_adams_steps_bit_for_bit(weight_decay):
    data = _jae_data()
    slices = {"type": [0, 4], "batch": None, "phase": [4, 6], "free": [6, 9]}
    runs = []
    for optimizer_cls in (torch.optim.Adam, FlatAdam):
        torch.manual_seed(0)
        module = JAEModule(40, 9, hidden=(30, 20, 10))  # batch norm, dropout: the JAE's layers
        optimizer = optimizer_cls(module.parameters(), lr=1e-3, eps=1e-7, weight_decay=weight_decay)
        history = train(module, jae_loss(slices, (0.7, 0.2, 0.05, 0.05)), data, optimizer, epochs=3,
                        batch_size=32, seed=1, valid_fraction=0.1, patience=2)
        runs.append((module, history))
    (adam, adam_history), (flat, flat_history) = runs
    assert [row["loss"] for row in flat_history] == [row["loss"] for row in adam_history]
    for (name, a), b in zip(adam.state_dict().items(), flat.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and batch-norm buffers
    assert len(adam_history) == 3 and adam_history[-1]["loss"] < adam_history[0]["loss"]
    restored = JAEModule(40, 9, hidden=(30, 20, 10))
    restored.load_state_dict(copy.deepcopy(flat.state_dict()))
    x = data[0][:50]
    assert torch.equal(restored.eval()(x)[0], flat.eval()(x)[0])  # the views save and load as tensors


def test_flat_adam_refuses_a_step_without_every_gradient():
    used, unused = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    optimizer = FlatAdam([*used.parameters(), *unused.parameters()], lr=0.1)
    before = used.weight.detach().clone()
    used(torch.ones(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="parameter 2 has no gradient"):
        optimizer.step()
    assert torch.equal(used.weight, before)
    with pytest.raises(ValueError, match="foreach / fused"):
        FlatAdam(used.parameters(), lr=0.1, fused=True)
