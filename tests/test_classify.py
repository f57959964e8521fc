"""The classifier study (cellembed/evaluation/classify.py): splits, the classifier on planted classes, the files."""


import numpy as np
import pandas as pd
import pytest

from cellembed.evaluation.classify import (PCA_KS, classification_study, classifier, fit_classifier, pca_inputs,
                                           split_indices)
from tests.conftest import make_counts


def test_split_is_a_stratified_80_10_10_partition_drawn_by_the_seed():
    labels = np.repeat(["a", "b", "c", "d"], [100, 50, 30, 20])
    train, valid, test = split_indices(labels, seed=0)
    assert sorted(np.concatenate([train, valid, test]).tolist()) == list(range(200))
    assert (len(train), len(valid), len(test)) == (160, 20, 20)
    for t in "abcd":  # every type in every split, in proportion
        assert (labels[test] == t).sum() == pytest.approx((labels == t).sum() / 10, abs=1)
    again = split_indices(labels, seed=0)
    other = split_indices(labels, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, valid, test)))
    assert not np.array_equal(other[2], test)


def test_classifier_is_the_sources_network():
    net = classifier(20, 4)
    assert [type(m).__name__ for m in net] == ["Linear", "ReLU", "Linear"]
    assert net[0].out_features == 516 and net[2].out_features == 4
    bound = np.sqrt(6 / (20 + 516))  # Xavier uniform
    assert np.abs(net[0].weight.detach().numpy()).max() <= bound
    assert np.all(net[0].bias.detach().numpy() == 0)


def test_beats_chance_by_far_on_planted_classes():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 60)
    centers = rng.normal(0, 3, size=(4, 8))
    x = centers[y] + rng.normal(size=(y.size, 8))
    result = fit_classifier(x, y, split_indices(y, 0), seed=0, epochs=12, batch_size=20, lr=1e-3)
    assert result["accuracy"] > 0.9 and result["macro_f1"] > 0.9  # chance: 0.25
    fixed = fit_classifier(x, y, split_indices(y, 0), seed=0, epochs=3, batch_size=40, patience=None)
    assert fixed["epochs"] == 3
    same = fit_classifier(x, y, split_indices(y, 0), seed=0, epochs=3, batch_size=40, patience=None)
    assert same["accuracy"] == fixed["accuracy"]
    np.testing.assert_array_equal(same["predicted"], fixed["predicted"])


def test_pca_inputs_are_nested_components():
    adata = make_counts(n_per_type=40, n_genes=60)
    pcs = pca_inputs(adata.X)
    assert sorted(pcs) == [k for k in PCA_KS if k < 60]
    np.testing.assert_allclose(pcs[10], pcs[25][:, :10], rtol=1e-4, atol=1e-4)


def test_study_writes_csv_markdown_and_confusion(tmp_path):
    adata = make_counts(n_per_type=40, n_types=3, n_genes=60)
    y = adata.obs["Celltype"].cat.codes.to_numpy()
    good = {s: np.eye(3)[y] + np.random.default_rng(s).normal(0, 0.1, (y.size, 3)) for s in (0, 1)}
    noise = {0: np.random.default_rng(9).normal(size=(y.size, 2))}
    table = classification_study(adata, {"planted": good, "noise": noise}, [0, 1], tmp_path, epochs=8,
                                 batch_size=20, lr=1e-3)
    assert set(table.columns) >= {"input", "variant", "seed", "accuracy", "balanced_accuracy", "macro_f1"}
    assert len(table) == 2 * (1 + 3 + 1) + 1  # raw, 3 PCA ks, planted per seed; noise for seed 0
    assert not table.isna().any().any()
    planted = table[table.variant == "planted"]["accuracy"]
    assert planted.min() > 0.9
    assert table[table.variant == "noise"]["accuracy"].iloc[0] < 0.7
    saved = pd.read_csv(tmp_path / "classification.csv")
    assert len(saved) == len(table)
    md = (tmp_path / "classification.md").read_text()
    assert "| latent | planted | 2 |" in md and "+-" in md
    assert (tmp_path / "confusion.png").stat().st_size > 0
    assert not list(tmp_path.glob(".*tmp"))


def test_real_10x_pbmc_short_study(tmp_path, data_root):
    from cellembed.data import load_dataset

    adata = load_dataset("10x_pbmc", data_root=data_root)[:500].copy()
    table = classification_study(adata, {}, [0], tmp_path, epochs=2, batch_size=50, lr=1e-3)
    assert list(table["input"]) == ["raw", "pca", "pca", "pca", "pca"]
    assert (table["accuracy"] > 1 / adata.obs["Celltype"].nunique()).all()


def test_sparse_counts_train_the_classifier_as_their_dense_rows():
    # the raw-counts input stays CSR; its minibatches are the dense rows, so training is identical
    import scipy.sparse as sp

    adata = make_counts(n_per_type=40, n_types=3, n_genes=60)
    y = adata.obs["Celltype"].cat.codes.to_numpy()
    split = split_indices(y, 0)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    options = dict(epochs=4, batch_size=16, lr=1e-3, patience=None)
    dense = fit_classifier(X.toarray(), y, split, seed=0, **options)
    sparse = fit_classifier(X, y, split, seed=0, **options)
    np.testing.assert_array_equal(sparse["predicted"], dense["predicted"])
    assert sparse["accuracy"] == dense["accuracy"] > 1 / 3


def test_pca_inputs_equal_standard_scaler_then_pca_on_the_dense_counts():
    # the oracle: the source's StandardScaler on the dense counts, then an exact (full SVD) PCA
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    adata = make_counts(n_per_type=50, n_genes=120)
    Z = StandardScaler().fit_transform(adata.X.toarray().astype(np.float64))
    oracle = PCA(n_components=25, svd_solver="full").fit_transform(Z)
    pcs = pca_inputs(adata.X, ks=(10, 25))
    signs = np.sign((pcs[25] * oracle).sum(0))  # a component's sign is arbitrary
    np.testing.assert_allclose(pcs[25] * signs, oracle, atol=1e-6 * np.abs(oracle).max())


# A classifier study on 20,000 synthetic cells x 2,000 genes (one epoch of batch 100), in a fresh
# process: the peak resident memory above the baseline, against the dense copies the study built
# before (raw counts 153 MiB in float32, 305 MiB in float64 for StandardScaler). Measured: 84 MiB
# (2 CPU cores), most of it the float64 copy of the stored counts for the PCA and ARPACK's vectors.
CHILD = r"""
import json, sys, tempfile
import anndata, numpy as np, pandas as pd
from cellembed.evaluation.classify import classification_study

sys.path.insert(0, "tests")  # run from the repository root
from memory_child import mib, reset_peak, synthetic_counts

n, m = 20_000, 2_000
adata = anndata.AnnData(synthetic_counts(n, m, 100), var=pd.DataFrame(index=[f"g{j}" for j in range(m)]))
adata.obs["Celltype"] = pd.Categorical(np.arange(n) % 4)
with tempfile.TemporaryDirectory() as out:
    classification_study(adata[:500].copy(), {}, [0], out, epochs=1, batch_size=100)  # imports, start-up
    baseline = reset_peak()
    table = classification_study(adata, {}, [0], out, epochs=1, batch_size=100)
print(json.dumps({"rows": len(table), "study": mib("VmHWM") - baseline}))
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads the peak RSS in /proc/self")
def test_classifier_study_of_20k_cells_stays_below_one_dense_copy():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    dense_mib = 20_000 * 2_000 * 4 / 2**20  # 152.6, the float32 copy of the counts
    assert result["rows"] == 5 and result["study"] < dense_mib, result
