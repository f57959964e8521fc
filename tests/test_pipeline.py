"""The script end to end on the real Mouse Pancreas data, as the TA runs it."""

import json

import anndata
import numpy as np
import pandas as pd
import pytest

import comp565_A4

FIGURES = ["nmf_sse", "nmf_psn", "nmf_sse_vs_psn", "scETM_train", "nmf_psn_1000", "nmf_psn_vs_scETM",
           "tsne_scETM_vs_nmf", "cells_topics_heatmap", "topics_top_genes_heatmap"]
TABLES = {"perf_nmf_sse.csv": ("mse", 5), "perf_nmf_psn.csv": ("poisson_loglik", 5),
          "perf_scETM.csv": ("nelbo", 20), "perf_nmf_psn_1000.csv": ("poisson_loglik", 20)}


def test_loading_gives_the_course_matrix(real_adata):
    assert real_adata.shape == (1886, 4194)
    X = real_adata.X
    assert np.issubdtype(X.dtype, np.integer) and X.min() >= 0 and X.max() > 100
    assert real_adata.obs["Celltype"].nunique() == 13
    assert real_adata.obs["Celltype"].value_counts()["beta"] == 894
    assert real_adata.obs["batch"].nunique() == 2
    assert real_adata.obs_names[0] == "mouse2_lib1.final_cell_0052"  # cell_IDs.pkl order


@pytest.fixture(scope="module")
def quick_run(real_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    code = comp565_A4.main(["--data-dir", str(real_data_dir), "--figures-dir", str(out), "--quick", "--jobs", "2"])
    return code, out


def test_quick_run_writes_every_output(quick_run):
    code, out = quick_run
    assert code == 0
    for name in FIGURES:
        for ext in ("eps", "png"):
            path = out / f"{name}.{ext}"
            assert path.stat().st_size > 5000, path
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


def test_quick_run_tables(quick_run):
    _, out = quick_run
    for name, (objective, rows) in TABLES.items():
        df = pd.read_csv(out / name)
        assert list(df.columns) == ["iter", objective, "ari"], name
        assert len(df) == rows, name
        assert df.notna().all().all() and np.isfinite(df.to_numpy(float)).all(), name
        np.testing.assert_array_equal(df["iter"], np.arange(rows))
        assert df["ari"].between(-0.5, 1).all()
    psn, long = pd.read_csv(out / "perf_nmf_psn.csv"), pd.read_csv(out / "perf_nmf_psn_1000.csv")
    pd.testing.assert_frame_equal(psn, long.iloc[:5])  # the long run continues Q3's run


def test_quick_run_results_h5ad(quick_run):
    _, out = quick_run
    adata = anndata.read_h5ad(out / "mp_results.h5ad")
    assert adata.shape == (1886, 4194)
    for key in ("X_nmf_sse", "X_nmf_psn", "X_etm", "X_nmf_psn_1000"):
        assert adata.obsm[key].shape == (1886, 16), key
        assert np.isfinite(adata.obsm[key]).all()
    beta = adata.varm["etm_beta"]
    assert beta.shape == (4194, 16)
    np.testing.assert_allclose(beta.sum(0), 1, rtol=1e-4)
    assert adata.varm["W_nmf_psn"].shape == (4194, 16)
    np.testing.assert_allclose(adata.obsm["X_etm"].sum(1), 1, rtol=1e-4)
    assert "Celltype" in adata.obs and "batch" in adata.obs


def test_quick_run_summary(quick_run):
    _, out = quick_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 0
    assert summary["iterations"] == {"nmf_sse": 5, "nmf_psn": 5, "etm": 20, "nmf_psn_1000": 20}
    assert set(summary["wall_seconds"]) == {"nmf_sse", "nmf_psn", "etm", "nmf_psn_1000", "figures", "total"}
    assert all(v > 0 for v in summary["wall_seconds"].values())
    perf = pd.read_csv(out / "perf_scETM.csv")
    assert summary["final_ari"]["etm"] == pytest.approx(perf["ari"].iloc[-1])
    assert summary["stages_finished"] == ["nmf_sse", "nmf_psn", "etm", "nmf_psn_1000", "figures"]


def test_missing_data_folder_is_one_clear_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "figures"
    code = comp565_A4.main(["--data-dir", str(tmp_path / "nowhere"), "--figures-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "nowhere" in err and "--data-dir" in err
    assert not out.exists()


def test_precision_auto_resolves_to_what_the_hardware_has():
    import torch

    cpu = torch.device("cpu")
    args = comp565_A4.parse_args(["--precision", "auto", "--device", "cpu"])
    assert args.precision == ("bf16" if comp565_A4.native_bf16(cpu) else "fp32")
    assert comp565_A4.parse_args(["--precision", "fp32"]).precision == "fp32"
    assert comp565_A4.parse_args(["--precision", "bf16"]).precision == "bf16"


def test_batch_corrected_run_writes_the_same_outputs(real_data_dir, tmp_path, quick_run):
    """--batch-correct swaps the ETM of Q4-Q8 for scETM; every file is still written, and the
    NMF results are those of the plain run."""
    _, plain = quick_run
    out = tmp_path / "figures"
    code = comp565_A4.main(["--data-dir", str(real_data_dir), "--figures-dir", str(out), "--quick", "--jobs", "0",
                    "--batch-correct"])
    assert code == 0
    for name in FIGURES:
        assert (out / f"{name}.png").stat().st_size > 5000, name
    perf = pd.read_csv(out / "perf_scETM.csv")
    assert len(perf) == 20 and np.isfinite(perf.to_numpy(float)).all()
    assert not perf.equals(pd.read_csv(plain / "perf_scETM.csv"))  # another model
    pd.testing.assert_frame_equal(pd.read_csv(out / "perf_nmf_psn.csv"), pd.read_csv(plain / "perf_nmf_psn.csv"))
    adata = anndata.read_h5ad(out / "mp_results.h5ad")
    assert adata.obsm["X_etm"].shape == (1886, 16)
    np.testing.assert_allclose(adata.obsm["X_etm"].sum(1), 1, rtol=1e-4)
    np.testing.assert_allclose(adata.varm["etm_beta"].sum(0), 1, rtol=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["etm_model"]["name"] == "scETM, batch-corrected"
    assert json.loads((plain / "summary.json").read_text())["etm_model"] == {"name": "ETM (course)"}
