"""cellembed: single-cell embedding models with one API, and a leaderboard that ranks them.

    import scanpy as sc
    from cellembed import get_model

    adata = sc.read_h5ad("my_cells.h5ad")                 # log-normalized X, counts in a layer
    model = get_model("vae")().fit(adata, layer="counts")
    adata.obsm["X_vae"] = model.get_latent(adata, layer="counts")
    model.save("my_vae")                                  # get_model("vae").load("my_vae")

Every model of `REGISTRY` follows `cellembed.models.base.Model`; ``python compare.py`` (or the
``cellembed-compare`` command) trains several over seeds and ranks them.
"""

from cellembed.models import REGISTRY, get_model, load_model

__version__ = "0.1.0"
__all__ = ["REGISTRY", "get_model", "load_model", "__version__"]
