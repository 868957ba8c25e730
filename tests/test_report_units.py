"""The report's pure parts (``e2kd.report``) against hand-written results: the Markdown table, the
images sampled for figures, the split figures show, and every model explained for the reference's class."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from e2kd import report


def test_table_is_one_row_per_run_with_missing_cells_dashed_and_lower_is_better_marked():
    results = {
        "kd": {"splits": {"val": {"accuracy": 0.81234, "l1": 0.5, "groups": {"y0_g1": 0.3}}, "test/ood": {"accuracy": 0.5}},
               "higher_is_better": {"accuracy": True, "l1": False}},
        "e2kd": {"splits": {"val": {"accuracy": 0.9, "shift_equivariance": {"shift_2": 0.7}}}},
    }
    got = report.table(results)
    assert got == ("| run | val/accuracy | val/l1 ↓ | test/ood/accuracy |\n"
                   "|---|---|---|---|\n"
                   "| kd | 0.8123 | 0.5 | 0.5 |\n"
                   "| e2kd | 0.9 | — | — |\n"
                   "\n↓: lower is better\n")
    plain = report.table({"a": {"splits": {"val": {"accuracy": 1.0}}, "higher_is_better": {"accuracy": True}}})
    assert plain == "| run | val/accuracy |\n|---|---|\n| a | 1 |\n"
    nested = report.table({"a": {"splits": {"val": {"l1": {"mean": 0.25}}}, "higher_is_better": {"l1": False}}})
    assert nested.splitlines()[0] == "| run | val/l1.mean ↓ |"


def test_sample_images_are_spread_over_the_dataset():
    data = [{"image": torch.full((1, 2, 2), float(i)), "label": i % 3} for i in range(20)]
    images, labels = report.sample_images(data)
    assert images[:, 0, 0, 0].tolist() == [0, 4, 8, 12, 16, 0]  # stride 20 // 6 + 1 = 4, wrapping around
    assert labels.tolist() == [0, 1, 2, 0, 1, 0]
    images, _ = report.sample_images(data[:3], n=5)
    assert images[:, 0, 0, 0].tolist() == [0, 1, 2]  # never more images than there are


def test_figures_show_the_last_evaluated_split():
    run = SimpleNamespace(config=SimpleNamespace(eval=SimpleNamespace(splits=["val", "test_id", "test_ood"])),
                          dataset=None)
    assert report.figure_split(run) == "test_ood"
    run = SimpleNamespace(config=SimpleNamespace(eval=SimpleNamespace(splits=None)),
                          dataset=SimpleNamespace(eval_splits=lambda: ("a", "b")))
    assert report.figure_split(run) == "b"


def test_every_model_is_explained_for_the_reference_models_class():
    from e2kd.registry import get_explainer
    from e2kd.testing import TinyCNN

    torch.manual_seed(10)
    teacher, student = TinyCNN(num_classes=3).eval(), TinyCNN(num_classes=3).eval()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * torch.tensor([0.1, 1, 3, 6]).view(4, 1, 1, 1)
    explainer = get_explainer("gradient")
    maps, preds = report.explanation_maps({"teacher": teacher, "student": student}, x, explainer, reference="teacher")
    target = teacher(x).argmax(1)
    torch.testing.assert_close(maps["student"], explainer.explain(student, x, target))
    torch.testing.assert_close(preds["student"], student(x).argmax(1))
    own, _ = report.explanation_maps({"student": student}, x, explainer)
    torch.testing.assert_close(own["student"], explainer.explain(student, x, student(x).argmax(1)))
    assert not torch.equal(student(x).argmax(1), target)  # the two choices differ on these images
