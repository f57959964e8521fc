"""What the figures show: names, the zoom inset, the smoothed ARI curves, one palette for every
figure, the colour bar's arrow, a compact EPS heatmap. Figures are inspected as matplotlib
objects (texts, artists, colours) before they are saved."""

import json

import matplotlib
import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from course_fixtures import write_course_folder
from matplotlib.collections import PathCollection, QuadMesh
from matplotlib.image import AxesImage

import comp565_A4
from cellembed.outputs import save_figure

matplotlib.use("Agg")


@pytest.fixture
def figures(monkeypatch):
    """Every figure the script saves, by file stem, kept open; closed at the end."""
    kept = {}

    def keep(fig, path, png_twin=True):
        kept[str(path).rsplit("/", 1)[-1].rsplit(".", 1)[0]] = fig

    monkeypatch.setattr(comp565_A4, "save_figure", keep)
    yield kept
    for fig in kept.values():
        matplotlib.pyplot.close(fig)


def texts(fig):
    """Every string drawn in ``fig``: titles, axis labels, legend entries and titles."""
    found = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    return [t for t in found if t]


def perf_table(values, ari=None):
    it = np.arange(len(values), dtype=float)
    return np.column_stack([it, values, np.zeros_like(it) if ari is None else ari])


# ------------------------------------------------------------------------------ objective panels


def test_a_squashed_objective_gets_a_zoomed_inset(figures):
    mse = 2.0 + 26.0 * np.exp(-np.arange(100) / 0.7) + np.linspace(0.8, 0, 100)  # 28 -> 2.08, as NMF-SSE
    comp565_A4.monitor_perf(perf_table(mse), "MSE", "nmf_sse.eps", title="NMF-SSE")
    ax_obj = figures["nmf_sse"].axes[0]
    (inset,) = ax_obj.child_axes
    x, y = inset.lines[0].get_data()
    np.testing.assert_array_equal(x, np.arange(5, 100))  # after the first 5% of the iterations
    np.testing.assert_array_equal(y, mse[5:])
    lo, hi = inset.get_ylim()
    assert hi - lo < 0.2 * (mse.max() - mse.min())  # its own scale: the late fall fills it
    assert inset.get_position().y0 > ax_obj.get_position().y0 + 0.3 * ax_obj.get_position().height  # upper
    assert "NMF-SSE" in texts(figures["nmf_sse"])


def test_a_rising_objective_gets_its_inset_low_and_a_readable_curve_none(figures):
    loglik = -0.17 + 0.19 * (1 - np.exp(-np.arange(1000) / 8.0))  # NMF-Poisson's rise
    comp565_A4.monitor_perf(perf_table(loglik), comp565_A4.PSN_OBJECTIVE, "nmf_psn_1000.eps")
    ax_obj = figures["nmf_psn_1000"].axes[0]
    (inset,) = ax_obj.child_axes
    assert inset.get_position().y0 < ax_obj.get_position().y0 + 0.2 * ax_obj.get_position().height  # lower
    assert "log x!" in ax_obj.get_ylabel()  # the constant the objective leaves out is named
    comp565_A4.monitor_perf(perf_table(np.linspace(10, 1, 100)), "NELBO", "scETM_train.eps")
    assert figures["scETM_train"].axes[0].child_axes == []  # a straight fall needs no zoom


# ------------------------------------------------------------------------------ ARI curves


def test_long_ari_curves_are_drawn_raw_in_a_light_tone_under_a_rolling_mean(figures):
    rng = np.random.default_rng(0)
    nmf = perf_table(np.zeros(1000), 0.6 + 0.01 * rng.standard_normal(1000))
    etm = perf_table(np.zeros(1000), 0.5 + 0.15 * rng.standard_normal(1000))  # the noisy one
    comp565_A4.plot_ari_curves({"NMF-Poisson": nmf, "ETM": etm}, "nmf_psn_vs_scETM.eps", title="NMF-Poisson and ETM")
    ax = figures["nmf_psn_vs_scETM"].axes[0]
    raw_nmf, raw_etm, mean_nmf, mean_etm = ax.lines  # both raw curves first, the means above them
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["NMF-Poisson", "ETM"]
    np.testing.assert_array_equal(raw_etm.get_ydata(), etm[:, 2])
    expected = pd.Series(etm[:, 2]).rolling(25, center=True, min_periods=1).mean()
    np.testing.assert_allclose(mean_etm.get_ydata(), expected)
    for raw, mean in ((raw_nmf, mean_nmf), (raw_etm, mean_etm)):
        light, dark = np.array(mcolors.to_rgb(raw.get_color())), np.array(mcolors.to_rgb(mean.get_color()))
        np.testing.assert_allclose(light, 0.35 * dark + 0.65)  # the same hue, mixed with white: no alpha in EPS
        assert raw.get_alpha() is None and mean.get_zorder() >= raw.get_zorder()


def test_short_ari_curves_are_drawn_as_they_are(figures):
    sse, psn = perf_table(np.zeros(100), np.linspace(0, 0.4, 100)), perf_table(np.zeros(100), np.linspace(0, 0.7, 100))
    comp565_A4.plot_ari_curves({"NMF-SSE": sse, "NMF-Poisson": psn}, "nmf_sse_vs_psn.eps")
    lines = figures["nmf_sse_vs_psn"].axes[0].lines
    assert len(lines) == 2
    np.testing.assert_array_equal(lines[1].get_ydata(), psn[:, 2])


# ------------------------------------------------------------------------------ Q6-Q8


def test_one_palette_in_the_tsne_and_the_clustermap(small_adata, figures, monkeypatch):
    adata = small_adata
    adata.obsm["X_a"] = np.random.default_rng(0).random((adata.n_obs, 4))
    palette = comp565_A4.celltype_palette(adata)
    stored = adata.uns["Celltype_colors"]
    assert list(palette) == list(adata.obs["Celltype"].cat.categories) and list(palette.values()) == stored
    assert comp565_A4.celltype_palette(adata) == palette and adata.uns["Celltype_colors"] is stored  # made once

    row_colors = {}
    clustermap = comp565_A4.sns.clustermap

    def spy(*args, **kwargs):
        row_colors["value"] = kwargs["row_colors"]
        return clustermap(*args, **kwargs)

    monkeypatch.setattr(comp565_A4.sns, "clustermap", spy)
    cell_types = adata.obs["Celltype"].to_numpy()
    comp565_A4.plot_tsne(adata, {"X_a": "ETM theta"}, "tsne.eps")
    comp565_A4.plot_cells_topics(adata.obsm["X_a"], cell_types, "heatmap.eps", palette)

    assert adata.uns["Celltype_colors"] is stored  # scanpy read it, did not replace it
    expected = [mcolors.to_rgba(palette[t]) for t in cell_types]
    assert [mcolors.to_rgba(c) for c in row_colors["value"]] == expected  # clustermap's row colours
    scatter = [c for c in figures["tsne"].axes[0].collections if isinstance(c, PathCollection)]
    shown = {tuple(np.round(c, 6)) for c in scatter[0].get_facecolors()}
    assert shown == {tuple(np.round(mcolors.to_rgba(c), 6)) for c in stored}  # t-SNE: the same colours
    legend = {h.get_label(): mcolors.to_rgba(h.get_facecolor()) for h in figures["heatmap"].legends[0].legend_handles}
    assert legend == {n: mcolors.to_rgba(c) for n, c in palette.items()}


def test_cells_topics_heatmap_is_one_embedded_image(figures, tmp_path):
    rng = np.random.default_rng(0)
    theta = rng.dirichlet(np.ones(16), size=1886)  # (N, K), as the real run's
    cell_types = np.array(["alpha", "beta", "delta"])[rng.integers(0, 3, 1886)]
    comp565_A4.plot_cells_topics(theta, cell_types, tmp_path / "cells_topics_heatmap.eps", title="ETM theta")
    fig = figures["cells_topics_heatmap"]
    images = {im.get_array().shape: im for ax in fig.axes for im in ax.images}
    assert set(images) == {(1886, 16), (1886, 1)}  # theta and the row colours
    image = images[(1886, 16)]
    assert isinstance(image, AxesImage) and image.get_interpolation() == "none"  # one pixel per cell
    meshes = [c for ax in fig.axes for c in ax.collections
              if isinstance(c, QuadMesh) and np.size(c.get_array()) in (1886 * 16, 1886)]  # not the colour bar
    assert len(meshes) == 2 and not any(m.get_visible() for m in meshes)  # the rectangles are not drawn
    np.testing.assert_allclose(np.sort(image.get_array().ravel()), np.sort(theta.ravel()))  # same values
    assert "ETM theta: 1886 cells x 16 topics" in texts(fig)
    save_figure(fig, tmp_path / "cells_topics_heatmap.eps")
    assert (tmp_path / "cells_topics_heatmap.eps").stat().st_size < 1_500_000  # 6.6 MB as rectangles


def test_top_genes_heatmap_marks_the_values_above_vmax(figures):
    beta = np.full((3, 8), 0.01)
    beta[0, 2] = 0.62  # Gcg-like: far above vmax 0.2
    beta /= beta.sum(1, keepdims=True)
    comp565_A4.plot_top_genes(beta, [f"g{j}" for j in range(8)], "topics_top_genes_heatmap.eps", n_top=2,
                              title="ETM beta")
    fig = figures["topics_top_genes_heatmap"]
    colorbar = fig.axes[0].collections[0].colorbar
    assert colorbar.extend == "max" and colorbar.vmax == pytest.approx(0.2)
    assert "ETM beta: top 2 genes of each topic" in texts(fig)


# ------------------------------------------------------------------------------ the whole script


def test_the_run_names_the_course_model_etm_everywhere(tmp_path, figures, monkeypatch):
    seen = {}
    plot_cells_topics = comp565_A4.plot_cells_topics

    def spy(theta, cell_types, path, palette=None, **kwargs):
        seen["palette"] = palette
        return plot_cells_topics(theta, cell_types, path, palette, **kwargs)

    tsne_uns = {}
    plot_tsne = comp565_A4.plot_tsne

    def spy_tsne(adata, reps, path, seed=0):
        plot_tsne(adata, reps, path, seed)
        tsne_uns["colors"] = adata.uns["Celltype_colors"]

    monkeypatch.setattr(comp565_A4, "plot_cells_topics", spy)
    monkeypatch.setattr(comp565_A4, "plot_tsne", spy_tsne)
    course = write_course_folder(tmp_path / "data")
    code = comp565_A4.main(["--data-dir", str(course), "--figures-dir", str(tmp_path / "out"), "--niter-nmf", "2",
                            "--niter-etm", "2", "--niter-long", "3", "--jobs", "0", "--device", "cpu"])
    assert code == 0
    assert list(seen["palette"].values()) == tsne_uns["colors"]  # the clustermap's colours are the t-SNE's
    titles = {name: texts(fig) for name, fig in figures.items()}
    everything = " ".join(" ".join(t) for t in titles.values())
    assert "scETM" not in everything  # the course model is the ETM
    assert any(t in ("ETM (bf16 encoder)", "ETM (fp32 encoder)") for t in titles["scETM_train"])
    assert "ETM theta" in titles["tsne_scETM_vs_nmf"] and "ETM theta: 36 cells x 16 topics" in everything
    assert "ETM" in [t.get_text() for t in figures["nmf_psn_vs_scETM"].axes[0].get_legend().get_texts()]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages_finished"][-1] == "figures"
