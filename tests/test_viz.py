"""Figures (``e2kd.viz``) read back from matplotlib's own artists: the pixels each panel shows,
its labels and colours, the lines and bars, against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from e2kd import viz


def _images_of(ax):
    return [np.asarray(im.get_array()) for im in ax.get_images()]


def test_explanation_grid_shows_each_image_and_each_map_scaled_by_its_maximum():
    images = torch.zeros(2, 3, 4, 4)
    images[0, 0] = torch.arange(16.0).view(4, 4)  # red ramp 0..15: stretched to [0, 1]
    images[1] = 5.0  # constant: no division by zero
    maps = {"teacher": torch.zeros(2, 2, 4, 4), "student": -torch.ones(2, 1, 4, 4)}
    maps["teacher"][0, 0, 0, 0], maps["teacher"][0, 1, 0, 0] = 3.0, 1.0  # channels summed: 4
    maps["teacher"][0, 0, 1, 1] = -2.0
    fig = viz.plot_explanations(
        images,
        maps,
        labels=torch.tensor([1, 0]),
        predictions={"teacher": torch.tensor([1, 2]), "student": torch.tensor([0, 0])},
        class_names=["cat", "dog", "owl"],
        title="three models",
    )
    axes = np.asarray(fig.axes).reshape(2, 3)
    (shown,) = _images_of(axes[0, 0])
    want = np.zeros((4, 4, 3))
    want[..., 0] = np.arange(16.0).reshape(4, 4) / 15
    np.testing.assert_allclose(shown, want, atol=1e-6)
    np.testing.assert_allclose(_images_of(axes[1, 0])[0], np.zeros((4, 4, 3)), atol=1e-6)
    under, heat = _images_of(axes[0, 1])
    np.testing.assert_allclose(under, want, atol=1e-6)
    assert heat[0, 0] == pytest.approx(1.0) and heat[1, 1] == pytest.approx(-0.5) and heat[2, 2] == 0
    assert _images_of(axes[0, 2])[1] == pytest.approx(-np.ones((4, 4)))  # a one-channel map: -1 / 1
    assert axes[0, 2].get_images()[1].get_clim() == (0, 1)  # the colour scale is fixed, not the data's range
    heat_artist = axes[0, 1].get_images()[1]
    assert heat_artist.get_cmap().name == "inferno" and heat_artist.get_clim() == (0, 1)
    assert heat_artist.get_alpha() == 0.6 and axes[0, 1].get_images()[0].get_alpha() == 0.55
    # labels, predictions (a wrong one marked in red), titles
    assert [axes[i, 0].get_ylabel() for i in range(2)] == ["dog", "cat"]
    assert axes[0, 1].get_xlabel() == "dog" and axes[0, 1].xaxis.label.get_color() == "black"
    assert axes[1, 1].get_xlabel() == "✗ owl" and axes[1, 1].xaxis.label.get_color() == "red"
    assert axes[0, 2].get_xlabel() == "✗ cat" and axes[1, 2].get_xlabel() == "cat"
    assert [ax.get_title() for ax in axes[0]] == ["input", "teacher", "student"]
    assert [ax.get_title() for ax in axes[1]] == ["", "", ""]
    assert fig._suptitle.get_text() == "three models"
    assert all(not ax.get_xticks().size and not ax.get_yticks().size for ax in axes.flat)


def test_explanation_grid_without_names_labels_multi_hot_rows_and_one_channel_images():
    images = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    fig = viz.plot_explanations(
        images,
        {"m": torch.ones(1, 1, 4, 4)},
        labels=torch.tensor([[1.0, 0.5, 1.0, 1.0, 1.0]]),
        predictions={"m": torch.tensor(3)[None]},
    )
    axes = fig.axes
    shown = _images_of(axes[0])[0]
    grey = (images[0, 0] - images.min()) / (images.max() - images.min())
    np.testing.assert_allclose(shown, grey[..., None].expand(4, 4, 3).numpy(), atol=1e-6)
    assert axes[0].get_ylabel() == "0, 2, 3"  # the first three present (> 0.5) classes, by index
    assert axes[1].get_xlabel() == "3" and axes[1].xaxis.label.get_color() == "black"
    assert fig._suptitle is None
    no_labels = viz.plot_explanations(images, {"m": torch.ones(1, 1, 4, 4)}, predictions={"m": torch.tensor([2])})
    assert no_labels.axes[0].get_ylabel() == "" and no_labels.axes[1].get_xlabel() == "2"


def test_explanation_grid_is_written_as_a_png_when_given_a_path(tmp_path):
    path = viz.plot_explanations(torch.rand(2, 3, 4, 4), {"a": torch.rand(2, 1, 4, 4)}, tmp_path / "sub" / "grid.png")
    assert path == tmp_path / "sub" / "grid.png"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (round(1.9 * 2 * 110), round(1.9 * 2 * 110))


def _captured(monkeypatch):
    figures = []

    def save(fig, path):
        assert path is not None
        figures.append(fig)
        return path

    monkeypatch.setattr(viz, "save_figure", save)
    return figures


def test_curves_are_one_line_each_with_axis_labels(monkeypatch, tmp_path):
    figures = _captured(monkeypatch)
    path = viz.plot_curves(
        {"kd": ([1, 2, 3], [0.5, 0.6, 0.7]), "e2kd": ([1, 2], [0.4, 0.9])},
        tmp_path / "c.png",
        xlabel="epoch",
        ylabel="accuracy",
        title="curves",
    )
    assert path == tmp_path / "c.png"
    (ax,) = figures[0].axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["kd", "e2kd"]
    assert lines[0].get_xydata().tolist() == [[1, 0.5], [2, 0.6], [3, 0.7]] and lines[1].get_marker() == "o"
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("epoch", "accuracy", "curves")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["kd", "e2kd"]
    viz.plot_curves({"a": ([0], [1])}, tmp_path / "d.png")
    ax = figures[1].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("", "", "")


def test_panels_side_by_side_keep_each_runs_colour_and_name_a_categorical_axis(monkeypatch, tmp_path):
    """Two panels (a deletion curve and per-layer randomisation): one axes each, in order; a run keeps its
    colour in every panel (colours by first appearance over all panels); a panel with ``xticks`` names
    the positions 0, 1, ...; labels and titles only where given; a legend per panel."""
    figures = _captured(monkeypatch)
    path = viz.plot_panels(
        [
            {
                "curves": {"teacher": ([0, 0.5, 1], [1.0, 0.5, 0.0]), "kd": ([0, 1], [0.9, 0.1])},
                "xlabel": "removed",
                "ylabel": "p",
                "title": "deletion",
            },
            {
                "curves": {"kd": ([0, 1, 2], [0.8, 0.4, 0.2]), "e2kd": ([0, 1, 2], [0.9, 0.3, 0.1])},
                "xticks": ["fc", "l4", "l3"],
            },
        ],
        tmp_path / "f.png",
    )
    assert path == tmp_path / "f.png"
    left, right = figures[0].axes
    assert [(line.get_label(), line.get_color()) for line in left.get_lines()] == [("teacher", "C0"), ("kd", "C1")]
    assert [(line.get_label(), line.get_color()) for line in right.get_lines()] == [("kd", "C1"), ("e2kd", "C2")]
    assert left.get_lines()[0].get_xydata().tolist() == [[0, 1], [0.5, 0.5], [1, 0]]
    assert right.get_lines()[1].get_xydata().tolist() == [[0, 0.9], [1, 0.3], [2, 0.1]]
    assert all(line.get_marker() == "o" for ax in (left, right) for line in ax.get_lines())
    assert list(right.get_xticks()) == [0, 1, 2] and [t.get_text() for t in right.get_xticklabels()] == [
        "fc",
        "l4",
        "l3",
    ]
    assert "fc" not in [t.get_text() for t in left.get_xticklabels()]
    assert (left.get_xlabel(), left.get_ylabel(), left.get_title()) == ("removed", "p", "deletion")
    assert (right.get_xlabel(), right.get_ylabel(), right.get_title()) == ("", "", "")
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["teacher", "kd"]
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["kd", "e2kd"]
    twelve = viz.plot_panels([{"curves": {f"r{i}": ([0], [i]) for i in range(12)}}], tmp_path / "g.png")
    assert twelve == tmp_path / "g.png"  # more runs than colours: the colours repeat
    assert [line.get_color() for line in figures[1].axes[0].get_lines()][9:] == ["C9", "C0", "C1"]


def test_paired_differences_are_dots_with_their_mean_as_a_bar_coloured_by_verdict(monkeypatch, tmp_path):
    figures = _captured(monkeypatch)
    viz.plot_paired(
        [("holds", [0.1, 0.3], True), ("fails", [-0.2, 0.0, 0.05], False)],
        tmp_path / "p.png",
        xlabel="difference",
        title="verdicts",
    )
    (ax,) = figures[0].axes
    bars = ax.patches  # drawn bottom-up: the last row first
    assert [round(b.get_width(), 6) for b in bars] == [-0.05, 0.2] and [b.get_y() + 0.3 for b in bars] == [0, 1]
    from matplotlib.colors import to_rgba

    assert bars[0].get_facecolor() == to_rgba("tab:gray", 0.5) and bars[1].get_facecolor() == to_rgba("tab:green", 0.5)
    dots = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert [d.get_xydata().tolist() for d in dots] == [[[-0.2, 0], [0.0, 0], [0.05, 0]], [[0.1, 1], [0.3, 1]]]
    zero = [line for line in ax.get_lines() if line.get_marker() != "o"]
    assert len(zero) == 1 and zero[0].get_xdata()[0] == 0
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fails", "holds"]
    assert (ax.get_xlabel(), ax.get_title()) == ("difference", "verdicts")
    viz.plot_paired([("one", [1.0], True)], tmp_path / "q.png")
    assert (figures[1].axes[0].get_xlabel(), figures[1].axes[0].get_title()) == ("", "")


def test_save_figure_writes_a_png_atomically(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.subplots().plot([0, 1], [0, 1])
    path = viz.save_figure(fig, tmp_path / "f.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (110, 110)
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


# -- the notebook API (e2kd.notebook), in-process --------------------------------------------------


def test_notebook_explain_is_the_explainers_map_of_the_top1_class_or_a_given_one():
    from e2kd import notebook
    from e2kd.registry import get_explainer
    from e2kd.testing import TinyCNN

    torch.manual_seed(0)
    model = TinyCNN(num_classes=3).train()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    top1 = model.eval()(images).argmax(1)
    model.train()
    got = notebook.explain(model, images, "gradient", absolute=True)
    assert not model.training and not got.requires_grad
    torch.testing.assert_close(got, get_explainer("gradient", absolute=True).explain(model, images, top1))
    for c in range(3):  # the top-1 class is not the one asked for: the maps differ
        if int(top1[0]) != c:
            other = notebook.explain(model, images, "gradient", target=c)
            assert not torch.allclose(other[0], notebook.explain(model, images, "gradient")[0])
    torch.testing.assert_close(
        notebook.explain(model, images, "gradient", target=2), get_explainer("gradient").explain(model, images, 2)
    )
    torch.testing.assert_close(notebook.explain(model, images), get_explainer("gradcam").explain(model, images, top1))


def test_notebook_compare_averages_each_named_similarity():
    from e2kd import notebook
    from e2kd.registry import get_similarity

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 1, 8, 8, generator=g), torch.rand(3, 1, 8, 8, generator=g)
    got = notebook.compare(a, b, ["cosine", "l1"])
    assert list(got) == ["cosine", "l1"]
    for name, value in got.items():
        assert value == pytest.approx(float(get_similarity(name)(a, b).mean()))
    assert list(notebook.compare(a, b)) == list(notebook.DEFAULT_SIMILARITIES)
    assert notebook.DEFAULT_SIMILARITIES == ("cosine", "pearson", "spearman", "ssim", "topk_overlap", "l1", "jsd")


def test_notebook_show_adds_each_models_predictions():
    from e2kd import notebook
    from e2kd.testing import TinyCNN

    torch.manual_seed(0)
    models = {"a": TinyCNN(num_classes=3).train(), "b": TinyCNN(num_classes=3)}
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    fig = notebook.show(
        images,
        {"a": torch.rand(2, 1, 8, 8), "b": torch.rand(2, 1, 8, 8)},
        models=models,
        class_names=["x", "y", "z"],
        title="t",
    )
    axes = np.asarray(fig.axes).reshape(2, 3)
    for j, name in ((1, "a"), (2, "b")):
        with torch.no_grad():
            predicted = models[name].eval()(images).argmax(1)
        assert [axes[i, j].get_xlabel() for i in range(2)] == [["x", "y", "z"][int(p)] for p in predicted]
    assert not models["a"].training and fig._suptitle.get_text() == "t"
    plain = notebook.show(images, {"a": torch.rand(2, 1, 8, 8)}, labels=torch.tensor([0, 2]))
    assert plain.axes[1].get_xlabel() == "" and plain.axes[0].get_ylabel() == "0"
