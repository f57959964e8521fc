"""Speed and clusters of scGPCL per data set: pre-training and fine-tuning seconds, ARI / NMI.

    python bench/scgpcl.py                                   # 10x_pbmc, mouse_bladder, mouse_pancreas, seed 0
    python bench/scgpcl.py --data 10x_pbmc --seeds 0 1 2 --threads 2
    python bench/scgpcl.py --data mouse_bladder --set epochs=20 --set warmup=10
    python bench/scgpcl.py --data 10x_pbmc --device cuda --n-clusters 12

One line per data set and seed: wall seconds of pre-training and fine-tuning (``SCGPCL.timings_``),
their epochs, the process's CPU seconds (on a shared machine the wall time also counts the
waiting for a core), and ``ari_own`` / ``nmi_own`` of the model's own clusters (argmax of DEC's
soft assignment); then mean +- sd over the seeds.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # no bars in the timings (tqdm reads this when imported)
    os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from cellembed.data import load_dataset  # noqa: E402
from cellembed.evaluation.metrics import own_scores  # noqa: E402
from cellembed.models.scgpcl import SCGPCL  # noqa: E402


def run(name, seed, data_root, options, device="auto", n_clusters=None):
    """Fit scGPCL on ``name`` with ``seed``; dict of timings and own-cluster scores.

    K is ``n_clusters``, by default the number of classes in the data set's ``obs['Celltype']``.
    """
    adata = load_dataset(name, data_root=data_root)
    cpu = time.process_time()
    start = time.perf_counter()
    model = SCGPCL(device=device, **options).fit(adata, labels_key="Celltype", n_clusters=n_clusters, seed=seed)
    pred = model.predict(adata)
    row = {"data": name, "seed": seed, "cells": adata.n_obs, **model.timings_,
           "total_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}
    row.update(own_scores(pred, adata.obs["Celltype"].to_numpy()))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["10x_pbmc", "mouse_bladder", "mouse_pancreas"],
                        help="data set names (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (default: 0)")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/data"),
                        help="folder of the named data sets (default: ../shared/data)")
    parser.add_argument("--threads", type=int, default=2, help="torch and BLAS threads (default: 2)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--n-clusters", type=int, default=None,
                        help="K (default: the number of labelled classes of each data set)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config field, as a Python literal (repeatable)")
    args = parser.parse_args(argv)
    options = {}
    for item in args.set:
        key, _, value = item.partition("=")
        options[key] = ast.literal_eval(value)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, device {args.device}, options {options or 'defaults'}", flush=True)
    with threadpool_limits(args.threads):
        for name in args.data:
            rows = []
            for seed in args.seeds:
                row = run(name, seed, args.data_root, options, args.device, args.n_clusters)
                rows.append(row)
                print(f"{name} seed {seed}: pre-train {row['pretrain_s']:.1f} s ({row['pretrain_epochs']} epochs), "
                      f"fine-tune {row['finetune_s']:.1f} s ({row['finetune_epochs']} epochs), total "
                      f"{row['total_s']:.1f} s, cpu {row['cpu_s']:.1f} s; ari_own {row['ari_own']:.4f}, "
                      f"nmi_own {row['nmi_own']:.4f}", flush=True)
            if len(rows) > 1:
                values = {key: [r[key] for r in rows] for key in ("ari_own", "nmi_own", "total_s")}
                summary = ", ".join(f"{key} {np.mean(v):.4f} +- {np.std(v, ddof=1):.4f}" for key, v in values.items())
                print(f"{name} over seeds {args.seeds}: {summary}", flush=True)


if __name__ == "__main__":
    main()
