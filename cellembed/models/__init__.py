"""The registry: model name -> where its class lives (imported only when asked for).

A new model is one file in this folder (a `cellembed.models.base.Model` subclass) and one line
here; it then appears in ``compare.py --models`` and in the registry's tests without other changes.
The assignment's models (``nmf_*``, ``etm``, ``scetm``) are adapters around the functions of
``comp565_A4.py``: the only imports of this package that run upward, to the assignment.
"""

from __future__ import annotations

import importlib

REGISTRY = {
    "pca": "cellembed.models.pca:PCA",
    "nmf_sse": "cellembed.models.nmf:NMFSSE",
    "nmf_psn": "cellembed.models.nmf:NMFPoisson",
    "etm": "cellembed.models.etm:CourseETM",
    "scetm": "cellembed.models.scetm:SCETM",
    "jae": "cellembed.models.jae:JAE",
    "pca_joint": "cellembed.models.jae:PCAJoint",
    "scgpcl": "cellembed.models.scgpcl:SCGPCL",
    "ae": "cellembed.models.autoencoders:AE",
    "vae": "cellembed.models.autoencoders:VAE",
    "vsc": "cellembed.models.autoencoders:VSC",
    "gmvae": "cellembed.models.gmvae:GMVAE",
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


def load_model(path, device="auto"):
    """Any registered model saved with ``model.save(path)`` (see `cellembed.models.base.Model.load`)."""
    from cellembed.models.base import Model

    return Model.load(path, device=device)
