"""How the cost grows with the number of cells: NMF, an ETM step and evaluate_ari, 2k-100k cells.

    python bench/scaling.py [--sizes 2000 10000 50000 100000]

Larger data sets are made by resampling the 1886 real cells with replacement and thinning
every count binomially (p = 0.9), so that copies of a cell differ (exact duplicates would tie
in the kNN graph). Times are milliseconds per iteration (median of a few), all cores, one
process. At these sizes a run should score every k iterations (``--eval-every``) and may train
the ETM on minibatches (``--etm-batch-size``): one minibatch step costs the same at any size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # no progress bars (tqdm reads this when imported)
    os.environ.setdefault("TQDM_DISABLE", "1")

import anndata  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

import comp565_A4  # noqa: E402
from cellembed.evaluation import clustering  # noqa: E402
from cellembed.cli import quiet_known_warnings  # noqa: E402
from cellembed.evaluation.scoring import NoScorer, available_cores  # noqa: E402
from bench.timing import median_ms  # noqa: E402

MINIBATCH = 2048


def resample(adata, n_cells, seed=0):
    """``n_cells`` cells drawn with replacement, counts thinned binomially (p = 0.9)."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, adata.n_obs, n_cells)
    X = adata.X[pick].tocsr().astype(np.int64)
    X.data = rng.binomial(X.data, 0.9)
    X.eliminate_zeros()
    keep = np.asarray(X.sum(axis=1)).ravel() > 0  # a thinned cell can lose every count
    out = anndata.AnnData(X=sp.csr_matrix(X[keep]))
    out.obs["Celltype"] = adata.obs["Celltype"].to_numpy()[pick][keep]
    return out


def time_size(adata, repeat):
    X = adata.X.T.tocsr().astype(np.float64)
    M, N = X.shape
    W0, H0 = comp565_A4.init_factors(M, N, seed=0)
    row = {"cells": N}
    for name, fn in (("nmf_sse", comp565_A4.nmf_sse), ("nmf_psn", comp565_A4.nmf_psn)):
        row[name] = median_ms(lambda: fn(X, W0, H0, adata, niter=repeat, scorer=NoScorer()), 2) / repeat
    counts, normalized = comp565_A4.normalized_counts(adata)
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = comp565_A4.build_etm(M)
        model.set_encoder_bf16(bf16)
        key = "etm_step_bf16" if bf16 else "etm_step"
        row[key] = median_ms(lambda: comp565_A4.train_scETM_helper(model, counts, normalized), 2)
        batch = torch.arange(min(MINIBATCH, N))
        mb_counts, mb_norm = counts.rows(batch), normalized[batch]
        row[key + "_minibatch"] = median_ms(lambda: comp565_A4.train_scETM_helper(model, mb_counts, mb_norm), 3)
    theta = comp565_A4.get_theta(model, normalized).numpy()
    truth = adata.obs["Celltype"].to_numpy()
    t0 = time.perf_counter()
    pattern = clustering.knn_graph_pattern(theta)
    t1 = time.perf_counter()
    clustering.louvain_partition(pattern)
    t2 = time.perf_counter()
    row["ari_knn_pattern"] = (t1 - t0) * 1e3
    row["ari_louvain"] = (t2 - t1) * 1e3
    row["ari_value"] = clustering.louvain_ari(theta, truth)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("COMP565_DATA_DIR", str(ROOT / "data")))
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000, 100000])
    parser.add_argument("--repeat", type=int, default=3, help="timed NMF iterations per size")
    args = parser.parse_args(argv)
    quiet_known_warnings("scaling.py")
    torch.set_num_threads(available_cores())
    base = comp565_A4.load_data(args.data_dir)
    print("\nScaling: ms per iteration (cells resampled from the real data, counts thinned p=0.9)")
    cols = {"cells": "cells", "nmf_sse": "NMF-SSE", "nmf_psn": "NMF-Psn", "etm_step": "ETM fp32",
            "etm_step_bf16": "ETM bf16", "etm_step_bf16_minibatch": f"ETM mb{MINIBATCH}",
            "ari_knn_pattern": "ARI kNN", "ari_louvain": "ARI Louvain"}
    print("| " + " | ".join(cols.values()) + " |")
    print("|" + "---:|" * len(cols))
    rows = []
    for n in args.sizes:
        row = time_size(resample(base, n), args.repeat)
        rows.append(row)
        print("| " + " | ".join(f"{row[c]:.0f}" for c in cols) + " |", flush=True)
    print(f"(ETM: one full-batch step; mb{MINIBATCH}: one bf16 step on {MINIBATCH} cells, an epoch is "
          f"cells / {MINIBATCH} of them; ARI: one scoring, kNN + graph pattern, then Louvain)")
    return rows


if __name__ == "__main__":
    main()
