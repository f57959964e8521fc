"""The registry: model name -> where its class lives (imported only when asked for).

A new model is one file in this folder (a `models.base.Model` subclass) and one line here; it
then appears in ``compare.py --models`` and in the registry's tests without other changes.
"""

from __future__ import annotations

import importlib

REGISTRY = {
    "pca": "models.pca:PCA",
    "nmf_sse": "models.nmf:NMFSSE",
    "nmf_psn": "models.nmf:NMFPoisson",
    "etm": "models.etm:CourseETM",
    "scetm": "models.scetm:SCETM",
    "jae": "models.jae:JAE",
    "pca_joint": "models.jae:PCAJoint",
    "scgpcl": "models.scgpcl:SCGPCL",
    "ae": "models.autoencoders:AE",
    "vae": "models.autoencoders:VAE",
    "vsc": "models.autoencoders:VSC",
    "gmvae": "models.gmvae:GMVAE",
}


def get_model(name):
    """The model class registered under ``name``.

    Raises
    ------
    KeyError
        Unknown name; the message lists the registered ones.
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(REGISTRY)}")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)
