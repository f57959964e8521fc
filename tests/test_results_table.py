"""The results table's scores (bench/results_table.py): batch mixing, and a short run on the real data."""

import numpy as np
import pandas as pd

from bench import results_table as rt


def two_blobs(n=40, separated=True, seed=0):
    """Two batches of n cells in 2-d, either far apart or drawn from one cloud."""
    rng = np.random.default_rng(seed)
    embed = rng.normal(size=(2 * n, 2))
    batch = np.repeat([0, 1], n)
    if separated:
        embed[batch == 1] += 100.0
    return embed, batch


def test_knn_mixing_is_zero_for_separate_batches_and_near_half_when_mixed():
    embed, batch = two_blobs()
    assert rt.knn_mixing(embed, batch, n_neighbors=10) == 0.0
    mixed, batch = two_blobs(n=200, separated=False)
    assert 0.4 < rt.knn_mixing(mixed, batch, n_neighbors=10) < 0.6


def test_ideal_mixing_is_each_cells_share_of_other_batch_cells_within_its_type():
    labels = np.array(["a", "a", "a", "b", "b"])
    batch = np.array([0, 0, 1, 0, 0])
    # a: cells of batch 0 have 1 of 2 others from batch 1, the batch-1 cell 2 of 2; b: none
    expected = (0.5 + 0.5 + 1.0 + 0 + 0) / 5
    assert rt.ideal_knn_mixing(labels, batch) == expected


def test_asw_batch_is_one_when_mixed_and_near_zero_when_separated():
    embed, batch = two_blobs()
    labels = np.zeros(len(batch))
    assert rt.asw_batch(embed, batch, labels) < 0.05
    mixed, batch = two_blobs(n=200, separated=False)
    assert rt.asw_batch(mixed, batch, np.zeros(len(batch))) > 0.9
    # a cell type found in one batch only is skipped, as in scib
    labels = np.array(["t"] * 400, dtype=object)
    labels[:50] = "solo"  # all in batch 0
    assert rt.asw_batch(mixed, batch, labels) > 0.9


def test_markdown_table():
    frame = pd.DataFrame({"model": ["PCA"], "ARI": ["0.6 +- 0.1"]})
    assert rt.markdown_table(frame) == "| model | ARI |\n|---|---|\n| PCA | 0.6 +- 0.1 |"


def test_pca_and_nmf_rows_on_the_real_data(real_data_dir, tmp_path, capsys):
    out = tmp_path / "runs.csv"
    code = rt.main(["--data-dir", str(real_data_dir), "--models", "pca", "nmf_sse", "--seeds", "0", "1",
                    "--niter-nmf", "3", "--out", str(out)])
    assert code == 0
    runs = pd.read_csv(out)
    assert len(runs) == 4 and set(runs["model"]) == {"pca", "nmf_sse"}
    assert runs[["ari", "nmi", "knn_mixing", "asw_batch"]].notna().all().all()
    pca = runs[runs["model"] == "pca"]
    assert (pca["ari"] > 0.4).all(), pca  # PCA of log-normalized counts: ~0.6 on this data
    assert ((runs["knn_mixing"] >= 0) & (runs["knn_mixing"] <= 1)).all()
    table = capsys.readouterr().out
    assert "PCA, 16 PCs of log-normalized counts | 2 |" in table
    # the runs file can be summarized again without training
    assert rt.main(["--data-dir", str(real_data_dir), "--summarize", str(out)]) == 0
    assert "| NMF-SSE (niter=3) | 2 |" in capsys.readouterr().out
