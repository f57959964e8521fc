"""Small data sets shipped inside the package (no download, no ``A4_DATA_ROOT`` needed).

``pbmc3k_demo.h5ad``: 466 labelled cells of the 10x Genomics PBMC 3k data set (9 Seurat-tutorial cell types,
about 60 cells each) x 2000 highly variable genes, raw integer UMI counts. See ``README.md`` beside this file
for its source, licence (CC BY 4.0, 10x Genomics) and how ``make_demo.py`` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_NAME", "demo_path", "load_demo"]

DEMO_NAME = "pbmc3k_demo"


def demo_path() -> Path:
    """The path of the bundled demo file, ``pbmc3k_demo.h5ad`` (an AnnData in h5ad format).

    The file holds raw integer counts (CSR) in ``X``, the Seurat PBMC 3k tutorial's cell types in
    ``obs['cell_type']`` and how it was made in ``uns['demo']``. Read it with ``anndata.read_h5ad(demo_path())``
    or with :func:`load_demo`.
    """
    return Path(__file__).resolve().parent / f"{DEMO_NAME}.h5ad"


def load_demo():
    """The demo data set as an :class:`anndata.AnnData` (a fresh copy read from :func:`demo_path`)."""
    import anndata

    return anndata.read_h5ad(demo_path())
