"""One model trained data-parallel over several processes or GPUs (PyTorch DDP's semantics).

    torchrun --nproc-per-node 4 -m cellembed.distributed --data my_cells.h5ad --model vae --out vae_4gpu
    torchrun --nproc-per-node 2 -m cellembed.distributed --data pbmc3k --data-root ../shared/data \\
        --model vae:epochs=50:batch_size=1024 --device cpu

Every process joins torchrun's process group (NCCL, one GPU per process by ``LOCAL_RANK``, when
CUDA is there; else gloo on the CPU), loads the data and fits the model with the same seed;
`cellembed.training.train` then splits each minibatch of ``batch_size`` cells between the
processes and sums their gradients, so N processes take the steps of one process at the same
``batch_size`` (the module docstring of `cellembed.training`). Rank 0 writes the model
(``OUT/model/``, `Model.save`; reload with `cellembed.load_model`) and the embedding of every cell
(``OUT/embedding.h5ad``, ``obsm['X_<model>']`` beside the cells' ``obs``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

MODELS = ("ae", "vae", "vsc")  # models whose training runs data parallel (train(..., distributed="auto"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m cellembed.distributed",
        description="Train one model data-parallel over the processes torchrun starts; rank 0 saves it.")
    parser.add_argument("--data", required=True, help="a named data set or a file, as compare.py --data")
    parser.add_argument("--data-root", default=None, help="where named sets are looked up (default $A4_DATA_ROOT, "
                        "else data)")
    parser.add_argument("--layer", default=None, help="the layer of raw counts; raw reads adata.raw (default X)")
    parser.add_argument("--label-key", default=None, help="obs column of the cell types (kept in the embedding)")
    parser.add_argument("--model", default="vae", help=f"one of {', '.join(MODELS)}, with compare.py's "
                        ":field=value settings, e.g. vae:epochs=50:batch_size=1024 (default vae)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initialization and the data order (default 0)")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: one GPU per process with NCCL when CUDA is there, else the CPU with gloo")
    parser.add_argument("--out", type=Path, default=Path("results/distributed"),
                        help="folder of model/ and embedding.h5ad (default results/distributed)")
    return parser.parse_args(argv)


def init(device="auto"):
    """Join torchrun's process group; returns the torch.device of this process.

    Parameters
    ----------
    device : {"auto", "cpu"}
        "auto": NCCL and GPU ``LOCAL_RANK`` when torch sees CUDA, else gloo on the CPU.

    Raises
    ------
    RuntimeError
        Not started by torchrun (no ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the environment),
        or fewer GPUs than processes on this machine.
    """
    import torch
    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: start this with torchrun --nproc-per-node N "
                           "-m cellembed.distributed ...")
    if device == "auto" and torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"process {local_rank} has no GPU ({torch.cuda.device_count()} on this machine); "
                               "pass --nproc-per-node at most the number of GPUs, or --device cpu")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def main(argv=None):
    args = parse_args(argv)
    from cellembed.runner import build, obsm_key, parse_models

    try:
        [(label, name, options)] = parse_models([args.model])
    except ValueError as exc:
        raise SystemExit(f"cellembed.distributed: {exc}".replace("--models", "--model")) from None
    if name not in MODELS:
        raise SystemExit(f"cellembed.distributed: --model {name} does not train data parallel; use one of "
                         f"{', '.join(MODELS)} (or compare.py for the others)")
    import anndata
    import torch.distributed as dist

    from cellembed.data import load_dataset
    from cellembed.outputs import prepare_dir, write_h5ad

    device = init(args.device)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        adata = load_dataset(args.data, args.data_root, label_key=args.label_key, layer=args.layer)
        model = build(name, options, device=str(device))
        start = time.perf_counter()
        model.fit(adata, seed=args.seed)
        seconds = time.perf_counter() - start
        if rank == 0:
            out = prepare_dir(args.out, "--out")
            model.save(out / "model", overwrite=True)
            embedding = anndata.AnnData(obs=adata.obs.copy(), obsm={obsm_key(label): model.get_latent(adata)})
            write_h5ad(embedding, out / "embedding.h5ad")
            print(f"{label}: {adata.n_obs} cells, {world} processes on {device.type}, trained in {seconds:.1f} s, "
                  f"final loss {model.history[-1]['loss']:.4g}; wrote {out / 'model'} and {out / 'embedding.h5ad'}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
