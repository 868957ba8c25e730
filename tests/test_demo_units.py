"""The demo's plan and summary by hand: the configs it runs (teacher on unbiased data, three students
on a few biased images), and the table of percentages over seeds."""

from __future__ import annotations

import statistics
from pathlib import Path

from e2kd import demo
from e2kd.config import load_config_dict


def test_the_full_demo_is_the_documented_setting():
    configs = demo.demo_configs(Path("/o"), seed=3)
    assert list(configs) == ["teacher", "KD", "e2KD", "e2KD frozen"]
    test = {"num_classes": 4, "image_size": 32, "test_per_class": 100}
    assert configs["teacher"] == {
        "seed": 0, "data": {"name": "synthetic", "options": {**test, "train_per_class": 200, "bias": 0.0}, "seed": 0},
        "model": {"name": "small_resnet", "options": {"widths": [24, 48, 96]}},
        "train": {"epochs": 6, "batch_size": 64, "lr": 3e-3}, "eval": {"metrics": ["accuracy"]}, "out_dir": "/o/teacher"}
    for variant, lam, mode, folder in (("KD", 0.0, "live", "kd"), ("e2KD", 1.0, "live", "e2kd"),
                                       ("e2KD frozen", 1.0, "frozen", "e2kd_frozen")):
        assert configs[variant] == {
            "seed": 3, "data": {"name": "synthetic", "options": {**test, "train_per_class": 16, "bias": 0.95}, "seed": 3},
            "model": {"name": "small_resnet", "options": {"widths": [16, 32, 64]}},
            "teacher": {"name": "small_resnet", "options": {"widths": [24, 48, 96]}, "checkpoint": "/o/teacher/model.pt"},
            "distill": {"lam": lam, "temperature": 1.0, "explainer": "gradcam", "similarity": "cosine",
                        "teacher_mode": mode},
            "train": {"epochs": 60, "batch_size": 32, "lr": 3e-3}, "out_dir": f"/o/{folder}_seed3"}
    for config in configs.values():
        load_config_dict(config, source="demo")  # every one validates


def test_the_quick_demo_is_a_tenth_with_floors():
    configs = demo.demo_configs(Path("/o"), seed=0, quick=True)
    assert configs["teacher"]["data"]["options"] == {"num_classes": 4, "image_size": 32, "test_per_class": 10,
                                                     "train_per_class": 20, "bias": 0.0}
    assert configs["teacher"]["train"]["epochs"] == 1 and configs["KD"]["train"]["epochs"] == 2
    assert configs["KD"]["data"]["options"]["train_per_class"] == 16


def test_the_summary_is_percent_mean_and_std_over_seeds():
    def run(**values):
        return {"splits": {"test_id": {"accuracy": values.get("a", 0.5)}, "test_ood": {
            k: v for k, v in (("accuracy", values.get("o")), ("agreement", values.get("g"))) if v is not None}}}

    rows = {"KD": [run(a=0.5, o=0.25), run(a=0.75, o=0.5)], "e2KD": [run(a=0.9, g=0.125)]}
    got = demo.summary_table(rows)
    sd = 100 * statistics.stdev([0.5, 0.75])
    assert got == ("| model | ID acc | ID agree | OOD acc | OOD agree | ID expl-sim | OOD expl-sim |\n"
                   "|---|---|---|---|---|---|---|\n"
                   f"| KD | 62.5 ± {sd:.1f} | — | 37.5 ± {sd:.1f} | — | — | — |\n"
                   "| e2KD | 90.0 | — | — | 12.5 | — | — |")
