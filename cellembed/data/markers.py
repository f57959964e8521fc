"""Tirosh et al. 2016's cell-cycle markers, and those of them among a data set's genes.

One table for the model that scores the cell cycle (JAE's phase slice,
`cellembed.models.jae.cell_cycle_scores`) and the metric that checks it is kept (``cc_cons``,
`cellembed.evaluation.joint_metrics`): both import it from here, so the evaluation never imports
a model.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

# 43 S then 54 G2M markers (Tirosh et al. 2016, Science 352:189, as Seurat's cc.genes) with the
# Ensembl id of each symbol (as scib's resources/cell_cycle_genes_homo_sapiens.tsv).
CELL_CYCLE_GENES = Path(__file__).resolve().parent / "cell_cycle_genes.csv"


def cell_cycle_genes():
    """The 43 S and 54 G2M markers: DataFrame (97 rows) of ``gene_name``, ``gene_id``, ``phase``."""
    return pd.read_csv(CELL_CYCLE_GENES, comment="#")


def markers_present(var_names, phase):
    """The markers of ``phase`` (``"S"`` or ``"G2M"``) found in ``var_names``, list of str.

    Matched by symbol or by Ensembl id, whichever finds more (as scib's ``score_cell_cycle``);
    empty when none is found.
    """
    table = cell_cycle_genes()
    table = table[table["phase"] == phase]
    names = pd.Index(var_names)
    found = [[g for g in table[col] if g in names] for col in ("gene_name", "gene_id")]
    return max(found, key=len)
