"""Data-parallel training (cellembed/training.py, distributed=True): 2 CPU processes (gloo) take
the steps of 1 process at the same global batch, see the same data order, and 1 process in a
process group gives a plain run's numbers bit for bit."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cellembed.models.autoencoders import AutoencoderModule
from cellembed.training import shard, train

# n rows, batch 16: "uneven" ends with a 3-row batch (blocks of 2 and 1 rows); "valid" holds out 7
# rows and ends with a 1-row batch (rank 1 has no row: share 0), with clipping and early stopping.
CASES = {"uneven": {"n": 35, "epochs": 3},
         "valid": {"n": 24, "epochs": 8, "clip_norm": 0.05, "valid_fraction": 0.3, "patience": 1}}


def fit_case(case, distributed=False):
    """A tiny AE (the AE family's loss: a mean over cells) trained on one case.

    Returns
    -------
    dict
        ``params`` (state dict), ``history``, ``seen``: the row ids of every training step's
        batch (this process's block when distributed), in order.
    """
    settings = dict(CASES[case])
    n = settings.pop("n")
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(1))
    ids = torch.arange(n)
    torch.manual_seed(0)
    module = AutoencoderModule(6, (8, 4, 3), 2, "ae", "mse")
    seen = []

    def loss_fn(module, batch, weight):  # the AE's loss: squared error summed over genes, mean over cells
        x, rows = batch
        if module.training:  # not the validation loss
            seen.append(rows.tolist())
        recon = (x - module(x)).pow(2).sum(-1).mean()
        return recon, {"recon": recon.item()}

    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    history = train(module, loss_fn, (x, ids), optimizer, batch_size=16, seed=7, distributed=distributed,
                    **settings)
    return {"params": module.state_dict(), "history": history, "seen": seen}


def _worker(rank, world_size, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.save({case: fit_case(case, distributed=True) for case in CASES}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Every case trained by 2 gloo processes: [rank 0's results, rank 1's]."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(out / "store"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("case", CASES)
def test_two_processes_take_the_steps_of_one_at_the_same_global_batch(two_processes, case):
    one = fit_case(case)
    for rank in range(2):
        got = two_processes[rank][case]
        assert got["params"].keys() == one["params"].keys()
        for key, value in one["params"].items():
            torch.testing.assert_close(got["params"][key], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {key}")
        assert len(got["history"]) == len(one["history"])
        for mine, theirs in zip(got["history"], one["history"]):
            assert mine.keys() == theirs.keys()
            for key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (rank, key)
    if case == "valid":  # early stopping hit, on the same epoch in both runs
        assert len(one["history"]) < CASES[case]["epochs"]


@pytest.mark.parametrize("case", CASES)
def test_the_seed_gives_every_rank_the_same_data_order(two_processes, case):
    one = fit_case(case)["seen"]
    ranks = [two_processes[r][case]["seen"] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for step, rows in enumerate(one):
        half = -(-len(rows) // 2)
        assert ranks[0][step] == rows[:half]  # rank 0: the first block of the global batch
        if len(rows) > 1:
            assert ranks[1][step] == rows[half:]  # rank 1: the rest
        else:
            assert ranks[1][step] == rows  # no row of its own: the first, with share 0
    assert one[-1] != list(range(len(one[-1]))), "the batches are shuffled"


def test_shard_splits_into_contiguous_blocks_with_their_share():
    rows = torch.tensor([5, 3, 9, 1, 7])
    blocks = [shard(rows, r, 3) for r in range(3)]
    assert [b.tolist() for b, _ in blocks] == [[5, 3], [9, 1], [7]]
    assert [s for _, s in blocks] == [0.4, 0.4, 0.2]
    assert shard(rows[:1], 1, 2)[0].tolist() == [5] and shard(rows[:1], 1, 2)[1] == 0.0


def test_one_process_in_a_group_gives_a_plain_run_bit_for_bit(tmp_path):
    plain = {case: fit_case(case) for case in CASES}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        grouped = {case: fit_case(case, distributed="auto") for case in CASES}
        with pytest.raises(ValueError, match="batch norm"):
            net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
            train(net, None, (torch.zeros(4, 3),), torch.optim.SGD(net.parameters(), lr=0.1), epochs=1,
                  distributed=True)
    finally:
        dist.destroy_process_group()
    for case in CASES:
        assert grouped[case]["history"] == plain[case]["history"]
        for key, value in plain[case]["params"].items():
            assert torch.equal(grouped[case]["params"][key], value), key


def test_distributed_without_a_process_group_is_refused():
    net = torch.nn.Linear(3, 1)
    with pytest.raises(RuntimeError, match="torchrun"):
        train(net, None, (torch.zeros(4, 3),), torch.optim.SGD(net.parameters(), lr=0.1), epochs=1,
              distributed=True)


def test_the_torchrun_entry_point_saves_the_model_and_the_latent(tmp_path, monkeypatch):
    """``python -m cellembed.distributed`` as torchrun starts it with one process: the saved model
    and embedding are a plain fit's, bit for bit."""
    import socket

    import anndata
    import numpy as np

    from cellembed import load_model
    from cellembed.data import load_dataset
    from cellembed.distributed import main
    from cellembed.models import get_model
    from conftest import make_counts

    make_counts(n_per_type=20).write_h5ad(tmp_path / "cells.h5ad")
    with pytest.raises(RuntimeError, match="torchrun"):
        main(["--data", str(tmp_path / "cells.h5ad"), "--model", "ae"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    main(["--data", str(tmp_path / "cells.h5ad"), "--model", "ae:epochs=2:batch_size=16:precision=fp32",
          "--device", "cpu", "--out", str(tmp_path / "out"), "--seed", "3"])
    assert not dist.is_initialized()
    adata = load_dataset(tmp_path / "cells.h5ad")
    plain = get_model("ae")(epochs=2, batch_size=16, precision="fp32", device="cpu").fit(adata, seed=3)
    saved = load_model(tmp_path / "out" / "model")
    assert saved.history == plain.history
    embedding = anndata.read_h5ad(tmp_path / "out" / "embedding.h5ad")
    np.testing.assert_array_equal(embedding.obsm["X_ae_epochs_2_batch_size_16_precision_fp32"], plain.get_latent(adata))
    assert list(embedding.obs_names) == list(adata.obs_names)
