"""The report's pure parts (``e2kd.report``) against hand-written results: the Markdown table, the
images sampled for figures, the split figures show, and every model explained for the reference's class."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from e2kd import report
from e2kd.runtime import Runtime


def test_table_is_one_row_per_run_with_missing_cells_dashed_and_lower_is_better_marked():
    results = {
        "kd": {
            "splits": {
                "val": {"accuracy": 0.81234, "l1": 0.5, "groups": {"y0_g1": 0.3}},
                "test/ood": {"accuracy": 0.5},
            },
            "higher_is_better": {"accuracy": True, "l1": False},
        },
        "e2kd": {"splits": {"val": {"accuracy": 0.9, "shift_equivariance": {"shift_2": 0.7}}}},
    }
    got = report.table(results)
    assert got == (
        "| run | val/accuracy | val/l1 ↓ | test/ood/accuracy |\n"
        "|---|---|---|---|\n"
        "| kd | 0.8123 | 0.5 | 0.5 |\n"
        "| e2kd | **0.9** | — | — |\n"
        "\n↓: lower is better; bold: the best run of a column\n"
    )
    plain = report.table({"a": {"splits": {"val": {"accuracy": 1.0}}, "higher_is_better": {"accuracy": True}}})
    assert plain == "| run | val/accuracy |\n|---|---|\n| a | 1 |\n"
    nested = report.table({"a": {"splits": {"val": {"l1": {"mean": 0.25}}}, "higher_is_better": {"l1": False}}})
    assert nested.splitlines()[0] == "| run | val/l1.mean ↓ |"


def test_table_bolds_the_best_run_by_direction_names_details_and_leaves_curves_out():
    def run(deletion, similarity, accuracy):
        return {
            "splits": {
                "test": {
                    "deletion": {"auc": deletion, "curve": {"0": 0.9, "1": 0.1}},
                    "sim": similarity,
                    "explanation_similarity[similarity=l2]": 0.3,
                    "accuracy": accuracy,
                }
            },
            "higher_is_better": {
                "deletion": False,
                "sim": True,
                "explanation_similarity[similarity=l2]": False,
                "accuracy": True,
            },
            "details": {
                "deletion": "MoRF, 8 px patches",
                "sim": "cosine",
                "explanation_similarity[similarity=l2]": "l2",
            },
        }

    got = report.table({"kd": run(0.4, 0.7, float("nan")), "e2kd": run(0.2, 0.9, 0.5), "t": run(0.2, 0.8, 0.25)})
    assert got.splitlines() == [
        "| run | test/deletion.auc (MoRF, 8 px patches) ↓ | test/sim (cosine) | "
        "test/explanation_similarity[similarity=l2] ↓ | test/accuracy |",
        "|---|---|---|---|---|",
        "| kd | 0.4 | 0.7 | 0.3 | nan |",
        "| e2kd | **0.2** | **0.9** | 0.3 | **0.5** |",
        "| t | **0.2** | 0.8 | 0.3 | 0.25 |",
        "",
        "↓: lower is better; bold: the best run of a column",
    ]


def test_sample_images_are_spread_over_the_dataset():
    data = [{"image": torch.full((1, 2, 2), float(i)), "label": i % 3} for i in range(20)]
    images, labels = report.sample_images(data)
    assert images[:, 0, 0, 0].tolist() == [0, 4, 8, 12, 16, 0]  # stride 20 // 6 + 1 = 4, wrapping around
    assert labels.tolist() == [0, 1, 2, 0, 1, 0]
    images, _ = report.sample_images(data[:3], n=5)
    assert images[:, 0, 0, 0].tolist() == [0, 1, 2]  # never more images than there are


def test_figures_show_the_last_evaluated_split():
    run = SimpleNamespace(
        config=SimpleNamespace(eval=SimpleNamespace(splits=["val", "test_id", "test_ood"])), dataset=None
    )
    assert report.figure_split(run) == "test_ood"
    run = SimpleNamespace(
        config=SimpleNamespace(eval=SimpleNamespace(splits=None)),
        dataset=SimpleNamespace(eval_splits=lambda: ("a", "b")),
    )
    assert report.figure_split(run) == "b"


def test_every_model_is_explained_for_the_reference_models_class(spread_images):
    from e2kd.registry import get_explainer
    from e2kd.testing import TinyCNN

    torch.manual_seed(10)
    teacher, student = TinyCNN(num_classes=3).eval(), TinyCNN(num_classes=3).eval()
    x = spread_images
    explainer = get_explainer("gradient")
    maps, preds = report.explanation_maps({"teacher": teacher, "student": student}, x, explainer, reference="teacher")
    target = teacher(x).argmax(1)
    torch.testing.assert_close(maps["student"], explainer.explain(student, x, target))
    torch.testing.assert_close(preds["student"], student(x).argmax(1))
    own, _ = report.explanation_maps({"student": student}, x, explainer)
    torch.testing.assert_close(own["student"], explainer.explain(student, x, student(x).argmax(1)))
    assert not torch.equal(student(x).argmax(1), target)  # the two choices differ on these images


class _FakeRun:
    """What evaluate_report reads of a loaded run, with made-up results."""

    def __init__(self, root, name, teacher=True, shift=False):
        from e2kd.testing import TinyCNN

        self.name, self.path = name, root / name
        self.path.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(len(name))
        self.model = TinyCNN(num_classes=3).eval()
        self.teacher = TinyCNN(num_classes=3).eval() if teacher else None
        self.config = SimpleNamespace(eval=SimpleNamespace(splits=["val", "test_ood"], metrics=[]))
        self.class_names = ["a", "b", "c"]
        self.runtime = Runtime(torch.device("cpu"), "bf16")
        self.asked = []
        split = {"accuracy": 0.5 + len(name) / 100}
        if shift:
            split["shift_equivariance"] = {"shift_0": 1.0, "shift_4": 0.75}
        self.results = {
            "splits": {"test_ood": split},
            "skipped": {"x": "why"},
            "higher_is_better": {"accuracy": True},
            "extra": "not written",
        }

    def evaluate(self, metrics):
        self.asked.append(metrics)
        return self.results

    def split(self, name):
        assert name == "test_ood"
        return [
            {"image": torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)), "label": i % 3} for i in range(8)
        ]

    def explainer(self):
        from e2kd.registry import get_explainer

        return get_explainer("gradient")


def _fake_report(monkeypatch, runs):
    import json

    figures, curves = [], []
    monkeypatch.setattr(report, "load_run", lambda path: runs[str(path)])
    monkeypatch.setattr(
        report,
        "explanation_figure",
        lambda models, images, labels, explainer, path, **kw: (
            figures.append((list(models), images.shape, labels.tolist(), explainer.name, path, kw)),
            path,
        )[1],
    )
    monkeypatch.setattr(report, "plot_curves", lambda data, path, **kw: (curves.append((data, path, kw)), path)[1])
    return figures, curves, json


def test_evaluate_report_writes_metrics_table_and_figures_for_every_run(tmp_path, monkeypatch):
    runs = {str(tmp_path / n): _FakeRun(tmp_path, n, shift=(n == "kd")) for n in ("kd", "e2kd")}
    figures, curves, json = _fake_report(monkeypatch, runs)
    logs = []
    out = report.evaluate_report(list(runs), tmp_path / "out", metrics=["accuracy"], log=logs.append)
    results = {r.name: r.results for r in runs.values()}
    assert [r.asked for r in runs.values()] == [[["accuracy"]], [["accuracy"]]]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == {
        name: {k: r[k] for k in ("splits", "skipped", "higher_is_better")} for name, r in results.items()
    }
    assert (tmp_path / "out" / "report.md").read_text() == report.table(results)
    ((models, shape, labels, explainer, path, kw),) = figures
    assert (
        models == ["teacher", "kd", "e2kd"] and shape == (6, 3, 8, 8) and labels == [0, 2, 1, 0, 0, 2]
    )  # items 0, 2, 4, 6, 0, 2 of 8
    assert explainer == "gradient" and path == tmp_path / "out" / "explanations.png"
    assert kw == {
        "reference": "teacher",
        "class_names": ["a", "b", "c"],
        "title": "gradient explanations for the teacher's class on test_ood images",
        "runtime": runs[str(tmp_path / "kd")].runtime,  # the first run's device and precision
    }
    ((data, path, kw),) = curves
    assert data == {"kd": ([0, 4], [1.0, 0.75])} and path == tmp_path / "out" / "shift.png"
    assert kw == {
        "xlabel": "diagonal shift (px)",
        "ylabel": "cosine on the overlap",
        "title": "shift equivariance of explanations (test_ood)",
    }
    assert out == {
        "results": results,
        "out": str(tmp_path / "out"),
        "figures": {
            "explanations": str(tmp_path / "out" / "explanations.png"),
            "shift": str(tmp_path / "out" / "shift.png"),
        },
    }
    assert logs == [
        f"[evaluate] {tmp_path / 'kd'}",
        f"[evaluate] {tmp_path / 'e2kd'}",
        report.table(results),
        "wrote "
        + ", ".join(str(tmp_path / "out" / f) for f in ("metrics.json", "report.md", "explanations.png", "shift.png")),
    ]


def test_one_run_without_a_teacher_reports_into_its_own_folder(tmp_path, monkeypatch):
    run = _FakeRun(tmp_path, "alone", teacher=False)
    figures, curves, json = _fake_report(monkeypatch, {str(run.path): run})
    out = report.evaluate_report([run.path], log=lambda line: None)
    assert out["out"] == str(run.path) and not (run.path / "metrics.json").exists()  # its own record stays
    assert (run.path / "report.md").is_file() and curves == [] and list(out["figures"]) == ["explanations"]
    ((models, _, _, _, _, kw),) = figures
    assert models == ["alone"] and kw["reference"] is None
    assert kw["title"] == "gradient explanations for each model's predicted class on test_ood images"


def test_reports_over_several_runs_default_to_e2kd_report_and_other_ranks_write_nothing(tmp_path, monkeypatch):
    import pytest

    runs = {str(tmp_path / n): _FakeRun(tmp_path, n) for n in ("a", "b")}
    _fake_report(monkeypatch, runs)
    monkeypatch.chdir(tmp_path)
    assert report.evaluate_report(list(runs), log=lambda line: None)["out"] == "e2kd_report"
    assert (tmp_path / "e2kd_report" / "report.md").is_file()
    monkeypatch.setenv("RANK", "1")
    out = report.evaluate_report(list(runs), tmp_path / "other", log=lambda line: None)
    assert out == {
        "results": {n: r.results for n, r in zip(("a", "b"), runs.values())},
        "figures": {},
        "out": str(tmp_path / "other"),
    }
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match=r"^no run directories given$"):
        report.evaluate_report([])


def test_a_run_evaluated_on_other_splits_adds_no_shift_curve(tmp_path, monkeypatch):
    runs = {str(tmp_path / n): _FakeRun(tmp_path, n, shift=True) for n in ("kd", "e2kd")}
    runs[str(tmp_path / "e2kd")].results = {"splits": {"val": {"accuracy": 0.5}}}
    _, curves, _ = _fake_report(monkeypatch, runs)
    report.evaluate_report(list(runs), tmp_path / "out", log=lambda line: None)
    assert list(curves[0][0]) == ["kd"]


def test_the_explanation_figure_shows_each_models_map_and_prediction(spread_images):
    import numpy as np

    from e2kd.registry import get_explainer
    from e2kd.testing import TinyCNN

    torch.manual_seed(10)
    teacher, student = TinyCNN(num_classes=3).eval(), TinyCNN(num_classes=3).eval()
    x = spread_images[[0, 3]]
    explainer = get_explainer("gradient")
    fig = report.explanation_figure(
        {"teacher": teacher, "student": student},
        x,
        torch.tensor([0, 1]),
        explainer,
        None,
        reference="teacher",
        class_names=["a", "b", "c"],
        title="T",
    )
    axes = np.asarray(fig.axes).reshape(2, 3)
    maps, preds = report.explanation_maps({"teacher": teacher, "student": student}, x, explainer, reference="teacher")
    for j, name in ((1, "teacher"), (2, "student")):
        heat = np.asarray(axes[0, j].get_images()[1].get_array())
        m = maps[name][0].sum(0)
        np.testing.assert_allclose(heat, (m / m.abs().max()).numpy(), rtol=1e-5, atol=1e-6)
        label = axes[1, j].get_xlabel()
        assert label.endswith(["a", "b", "c"][int(preds[name][1])])
    assert [ax.get_title() for ax in axes[0]] == ["input", "teacher", "student"] and fig._suptitle.get_text() == "T"
    assert axes[1, 0].get_ylabel() == "b"


def test_the_explanation_figure_is_written_where_asked(tmp_path):
    from e2kd.registry import get_explainer
    from e2kd.testing import TinyCNN

    path = report.explanation_figure(
        {"m": TinyCNN().eval()}, torch.rand(2, 3, 8, 8), None, get_explainer("gradient"), tmp_path / "e.png"
    )
    assert path == tmp_path / "e.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explanation_maps_run_under_the_runtimes_precision(spread_images):
    """With a bf16 runtime the maps are the ones a bf16 forward gives (returned in float32), which
    differ from the float32 maps: the figures show what the run's precision computes."""
    from e2kd.explaining import explained_forward
    from e2kd.registry import get_explainer
    from e2kd.testing import TinyCNN

    torch.manual_seed(3)
    model, x, explainer = TinyCNN(num_classes=3).eval(), spread_images[:4], get_explainer("gradient")
    maps, preds = report.explanation_maps({"m": model}, x, explainer, runtime=Runtime(torch.device("cpu"), "bf16"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, want, _ = explained_forward(model, x, explainer)
    assert maps["m"].dtype == torch.float32 and torch.equal(maps["m"], want[:, 0].float()) and maps["m"].abs().sum() > 0
    assert torch.equal(preds["m"], logits.argmax(1))
    plain, _ = report.explanation_maps({"m": model}, x, explainer)
    assert not torch.allclose(plain["m"], maps["m"], rtol=1e-4, atol=0)


def test_the_explanation_figure_passes_the_runtime_on(spread_images, monkeypatch):
    from e2kd.registry import get_explainer
    from e2kd.testing import TinyCNN

    seen = []
    real = report.explanation_maps
    monkeypatch.setattr(report, "explanation_maps", lambda *a, **k: (seen.append(k), real(*a, **k))[1])
    runtime = Runtime(torch.device("cpu"), "bf16")
    report.explanation_figure(
        {"m": TinyCNN(num_classes=3).eval()}, spread_images[:2], None, get_explainer("gradient"), None, runtime=runtime
    )
    assert seen == [{"reference": None, "runtime": runtime}]


def test_curve_panels_draw_every_run_per_metric_and_category():
    """A panel per metric with a curve on the split (numbers on the x axis, or names such as layers
    as ticks), a line per run that has it, titled with the metric's detail, labelled with its axes."""

    def run(deletion, layers):
        return {
            "splits": {
                "test": {
                    "accuracy": 0.5,
                    "deletion": {"auc": 0.2, "curve": {"0": deletion, "0.5": deletion / 2, "1": 0.0}},
                    "insertion": {"auc": 0.7, "curve": {"0": 0.1, "1": deletion}},
                    "model_randomisation": {"mean": 0.3, "curve": layers},
                },
                "val": {"deletion": {"auc": 0.1, "curve": {"0": 1.0}}},
            },
            "details": {"deletion": "MoRF, 8 px patches"},
            "categories": {
                "deletion": "faithfulness",
                "insertion": "faithfulness",
                "model_randomisation": "randomisation",
            },
            "curve_labels": {"deletion": ["share of patches removed", "probability"]},
        }

    results = {"kd": run(0.8, {"fc": 0.1, "conv": 0.4}), "teacher": run(0.6, {"fc": 0.2, "conv": 0.3})}
    panels = report.curve_panels(results, "test")
    assert list(panels) == ["faithfulness", "randomisation"]
    deletion, insertion = panels["faithfulness"]
    assert insertion["title"] == "insertion" and insertion["curves"]["kd"] == ([0.0, 1.0], [0.1, 0.8])
    assert deletion == {
        "title": "deletion (MoRF, 8 px patches)",
        "xlabel": "share of patches removed",
        "ylabel": "probability",
        "curves": {"kd": ([0.0, 0.5, 1.0], [0.8, 0.4, 0.0]), "teacher": ([0.0, 0.5, 1.0], [0.6, 0.3, 0.0])},
    }
    (layers,) = panels["randomisation"]
    assert layers["xticks"] == ["fc", "conv"] and layers["title"] == "model_randomisation"
    assert layers["curves"]["teacher"] == ([0, 1], [0.2, 0.3]) and (layers["xlabel"], layers["ylabel"]) == ("", "")
    assert report.curve_panels(results, "missing") == {}


def test_a_split_name_with_a_slash_keeps_its_columns_direction_and_best_mark():
    got = report.table(
        {
            "a": {"splits": {"test/ood": {"l1": 0.5}}, "higher_is_better": {"l1": False}},
            "b": {"splits": {"test/ood": {"l1": 0.25}}, "higher_is_better": {"l1": False}},
        }
    )
    assert got.splitlines()[:4] == ["| run | test/ood/l1 ↓ |", "|---|---|", "| a | 0.5 |", "| b | **0.25** |"]


def test_curve_panels_of_results_that_state_no_category_labels_or_detail():
    results = {"x": {"splits": {"val": {"m": {"curve": {"0": 1.0, "1": 0.5}}}}}}
    assert report.curve_panels(results, "val") == {
        "other": [{"title": "m", "xlabel": "", "ylabel": "", "curves": {"x": ([0.0, 1.0], [1.0, 0.5])}}]
    }


def test_the_teacher_is_evaluated_with_the_runs_faithfulness_and_randomisation_metrics_under_their_keys(monkeypatch):
    from e2kd.config import MetricRef

    calls = []
    monkeypatch.setattr(report, "evaluate_model", lambda *args, **kwargs: calls.append((args, kwargs)) or {"ok": 1})
    metrics = [
        MetricRef(name="accuracy"),
        MetricRef(name="deletion", options={"patch_size": 2}),
        MetricRef(name="deletion", options={"patch_size": 4}),
        MetricRef(name="model_randomisation", options={"order": "independent"}, as_="mprt"),
        MetricRef(name="shift_equivariance"),
    ]
    teacher = object()
    run = SimpleNamespace(
        config=SimpleNamespace(eval=SimpleNamespace(metrics=metrics)), teacher=teacher, plan="plan", runtime="rt"
    )
    assert report.teacher_results(run) == {"ok": 1}
    ((args, kwargs),) = calls
    assert args[:3] == ("plan", teacher, None) and kwargs == {"runtime": "rt"}
    assert [(r.name, r.options, r.as_) for r in args[3]] == [
        ("deletion", {"patch_size": 2}, "deletion[patch_size=2]"),
        ("deletion", {"patch_size": 4}, "deletion[patch_size=4]"),
        ("model_randomisation", {"order": "independent"}, "mprt"),
    ]
    calls.clear()
    assert report.teacher_results(run, ["accuracy", "road"]) == {"ok": 1}
    assert [(r.name, r.as_) for r in calls[0][0][3]] == [("road", "road")]
    assert report.teacher_results(run, ["accuracy", "epg"]) is None  # no metric of those categories
    assert report.teacher_results(SimpleNamespace(**{**vars(run), "teacher": None})) is None
