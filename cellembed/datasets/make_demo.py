"""Rebuild ``pbmc3k_demo.h5ad``: a small, stratified, raw-count subset of the 10x PBMC 3k data set.

Usage (from the repository root)::

    .venv/bin/python cellembed/datasets/make_demo.py \\
        --source /work/shared/data/pbmc3k/pbmc3k_counts_seurat_labels.h5ad

What it does, all deterministic for a given ``--seed``:

1. drops the cells without a Seurat-tutorial label (``obs['cell_type']`` NaN: cells removed by the tutorial's QC);
2. draws, for every cell type, ``--per-type`` cells at random without replacement (every cell of a type
   smaller than that), with ``numpy.random.default_rng(seed)``, types taken in the order of their categories;
3. keeps the genes detected in at least ``--min-cells`` of the drawn cells, and of those the ``--n-genes``
   most highly variable ones (scanpy ``highly_variable_genes(flavor="seurat")`` on
   ``normalize_total(1e4)`` + ``log1p`` of the drawn cells), in the source's gene order;
4. writes the raw integer counts (CSR, int32) of these cells and genes, untouched, with ``obs['cell_type']``
   (categorical), the source's barcodes (``obs_names``) and gene symbols (``var_names``), gzip-compressed.

The choices are recorded in ``adata.uns["demo"]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "pbmc3k_demo.h5ad"
LABEL = "cell_type"


def choose_cells(labels: pd.Series, per_type: int, seed: int) -> np.ndarray:
    """Positions (sorted) of up to ``per_type`` randomly drawn labelled cells of every type."""
    rng = np.random.default_rng(seed)
    labels = labels.astype("category")
    picked = []
    for cat in labels.cat.categories:
        idx = np.flatnonzero((labels == cat).to_numpy())
        if idx.size == 0:
            continue
        picked.append(rng.choice(idx, size=min(per_type, idx.size), replace=False))
    return np.sort(np.concatenate(picked))


def choose_genes(counts: ad.AnnData, n_genes: int, min_cells: int) -> np.ndarray:
    """Positions (sorted) of the ``n_genes`` most variable genes detected in >= ``min_cells`` cells."""
    import scanpy as sc

    detected = np.asarray((counts.X > 0).sum(axis=0)).ravel() >= min_cells
    cand = np.flatnonzero(detected)
    tmp = counts[:, cand].copy()
    tmp.X = tmp.X.astype(np.float32)
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    n_top = min(n_genes, cand.size)
    sc.pp.highly_variable_genes(tmp, flavor="seurat", n_top_genes=n_top)
    hv = tmp.var["highly_variable"].to_numpy()
    return np.sort(cand[hv])


def make_demo(source: Path, out: Path = DEFAULT_OUT, per_type: int = 60, n_genes: int = 2000, min_cells: int = 3,
              seed: int = 0) -> ad.AnnData:
    src = ad.read_h5ad(source)
    if LABEL not in src.obs:
        raise SystemExit(f"{source}: no obs['{LABEL}']")
    source_shape = [int(src.n_obs), int(src.n_vars)]
    labelled = np.flatnonzero(src.obs[LABEL].notna().to_numpy())
    n_labelled = int(labelled.size)
    src = src[labelled]
    cells = choose_cells(src.obs[LABEL], per_type, seed)
    sub = src[cells].copy()
    sub.X = sp.csr_matrix(sub.X)
    genes = choose_genes(sub, n_genes, min_cells)
    sub = sub[:, genes].copy()

    X = sp.csr_matrix(sub.X)
    if X.nnz and (X.data.min() < 0 or not np.all(np.equal(np.mod(X.data, 1), 0))):
        raise SystemExit("the source's X is not raw integer counts")
    X = X.astype(np.int32)
    X.eliminate_zeros()
    X.sort_indices()

    types = [c for c in src.obs[LABEL].astype("category").cat.categories if c in set(sub.obs[LABEL])]
    obs = pd.DataFrame({LABEL: pd.Categorical(sub.obs[LABEL].astype(str), categories=types)},
                       index=sub.obs_names.astype(str))
    var = pd.DataFrame(index=sub.var_names.astype(str))
    demo = ad.AnnData(X=X, obs=obs, var=var)
    if (np.asarray(demo.X.sum(axis=1)).ravel() == 0).any():
        raise SystemExit("a chosen cell has no counts in the chosen genes")

    counts = demo.obs[LABEL].value_counts().reindex(types)
    demo.uns["demo"] = {
        "source_file": Path(source).name,
        "source_shape": source_shape,
        "source_labelled_cells": n_labelled,
        "seed": int(seed),
        "rng": "numpy.random.default_rng(seed).choice(..., replace=False), one draw per type in category order",
        "cells": (f"dropped cells with NaN obs['{LABEL}']; then up to {per_type} cells per cell type drawn at random "
                  f"without replacement (all cells of smaller types); kept in source order"),
        "cells_per_type": {str(k): int(v) for k, v in counts.items()},
        "genes": (f"genes detected in >= {min_cells} of the chosen cells; of those the {n_genes} most highly variable "
                  f"(scanpy highly_variable_genes flavor='seurat' on normalize_total(1e4)+log1p of the chosen "
                  f"cells); kept in source order"),
        "counts": "raw UMI counts copied unchanged from the source (int32 CSR)",
        "script": "cellembed/datasets/make_demo.py",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    demo.write_h5ad(out, compression="gzip", compression_opts=9)
    return demo


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, type=Path,
                   help="the PBMC 3k h5ad with raw counts and obs['cell_type'] "
                        "(e.g. /work/shared/data/pbmc3k/pbmc3k_counts_seurat_labels.h5ad)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--per-type", type=int, default=60)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--min-cells", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    demo = make_demo(a.source, a.out, a.per_type, a.n_genes, a.min_cells, a.seed)
    size = a.out.stat().st_size
    print(f"wrote {a.out}: {demo.n_obs} cells x {demo.n_vars} genes, {demo.obs[LABEL].nunique()} types, "
          f"nnz {demo.X.nnz}, {size / 1024:.0f} KiB")
    print(demo.obs[LABEL].value_counts().to_string())


if __name__ == "__main__":
    main()
