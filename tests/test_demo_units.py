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
        "seed": 0,
        "data": {"name": "synthetic", "options": {**test, "train_per_class": 200, "bias": 0.0}, "seed": 0},
        "model": {"name": "small_resnet", "options": {"widths": [24, 48, 96]}},
        "train": {"epochs": 6, "batch_size": 64, "lr": 3e-3},
        "eval": {"metrics": ["accuracy"]},
        "out_dir": "/o/teacher",
    }
    for variant, lam, mode, folder in (
        ("KD", 0.0, "live", "kd"),
        ("e2KD", 1.0, "live", "e2kd"),
        ("e2KD frozen", 1.0, "frozen", "e2kd_frozen"),
    ):
        assert configs[variant] == {
            "seed": 3,
            "data": {"name": "synthetic", "options": {**test, "train_per_class": 16, "bias": 0.95}, "seed": 3},
            "model": {"name": "small_resnet", "options": {"widths": [16, 32, 64]}},
            "teacher": {
                "name": "small_resnet",
                "options": {"widths": [24, 48, 96]},
                "checkpoint": "/o/teacher/model.pt",
            },
            "distill": {
                "lam": lam,
                "temperature": 1.0,
                "explainer": "gradcam",
                "similarity": "cosine",
                "teacher_mode": mode,
            },
            "train": {"epochs": 60, "batch_size": 32, "lr": 3e-3},
            "out_dir": f"/o/{folder}_seed3",
        }
    for config in configs.values():
        load_config_dict(config, source="demo")  # every one validates


def test_the_quick_demo_is_a_tenth_with_floors():
    configs = demo.demo_configs(Path("/o"), seed=0, quick=True)
    assert configs["teacher"]["data"]["options"] == {
        "num_classes": 4,
        "image_size": 32,
        "test_per_class": 10,
        "train_per_class": 20,
        "bias": 0.0,
    }
    assert configs["teacher"]["train"]["epochs"] == 1 and configs["KD"]["train"]["epochs"] == 2
    assert configs["KD"]["data"]["options"]["train_per_class"] == 16


def test_the_summary_is_percent_mean_and_std_over_seeds():
    def run(**values):
        return {
            "splits": {
                "test_id": {"accuracy": values.get("a", 0.5)},
                "test_ood": {
                    k: v for k, v in (("accuracy", values.get("o")), ("agreement", values.get("g"))) if v is not None
                },
            }
        }

    rows = {"KD": [run(a=0.5, o=0.25), run(a=0.75, o=0.5)], "e2KD": [run(a=0.9, g=0.125)]}
    got = demo.summary_table(rows)
    sd = 100 * statistics.stdev([0.5, 0.75])
    assert got == (
        "| model | ID acc | ID agree | OOD acc | OOD agree | ID expl-sim | OOD expl-sim |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| KD | 62.5 ± {sd:.1f} | — | 37.5 ± {sd:.1f} | — | — | — |\n"
        "| e2KD | 90.0 | — | — | 12.5 | — | — |"
    )


def test_run_demo_trains_in_order_writes_its_results_and_logs_the_differences(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    import torch

    trained, figures, logs = [], [], []

    def splits(variant, seed):
        base = {"KD": 0.5, "e2KD": 0.75, "e2KD frozen": 0.625}.get(variant, 0.9) + seed / 100
        return {
            "test_id": {"accuracy": base, "agreement": base / 2},
            "test_ood": {"accuracy": base / 4, "agreement": base / 8, "explanation_similarity": base / 5},
        }

    monkeypatch.setattr(
        demo,
        "train_teacher",
        lambda c: (trained.append(("teacher", c.seed, c.out_dir.name)), {"splits": splits("teacher", 0)})[1],
    )
    monkeypatch.setattr(
        demo,
        "distill",
        lambda c: (
            trained.append((c.distill.lam, c.distill.teacher_mode, c.seed)),
            {
                "splits": splits(
                    c.out_dir.name.rsplit("_seed", 1)[0]
                    .replace("e2kd_frozen", "e2KD frozen")
                    .replace("e2kd", "e2KD")
                    .replace("kd", "KD"),
                    c.seed,
                )
            },
        )[1],
    )
    items = [{"image": torch.full((3, 4, 4), i / 10), "label": i % 4} for i in range(8)]
    runs = {
        name: SimpleNamespace(
            teacher=f"T-{name}",
            model=f"M-{name}",
            class_names=["a", "b", "c", "d"],
            split=lambda s: items if s == "test_ood" else None,
        )
        for name in ("kd_seed4", "e2kd_seed4", "e2kd_frozen_seed4")
    }
    monkeypatch.setattr(demo, "load_run", lambda d: runs[Path(d).name])
    monkeypatch.setattr(
        demo,
        "explanation_figure",
        lambda models, images, labels, explainer, path, **kw: (
            figures.append((models, images.shape, labels.tolist(), explainer.name, path, kw)),
            path,
        )[1],
    )
    results = demo.run_demo(tmp_path, seeds=(4, 5), quick=True, log=logs.append)
    assert trained == [
        ("teacher", 0, "teacher"),
        (0.0, "live", 4),
        (1.0, "live", 4),
        (1.0, "frozen", 4),
        (0.0, "live", 5),
        (1.0, "live", 5),
        (1.0, "frozen", 5),
    ]
    rows = {
        "teacher": [{"splits": splits("teacher", 0)}],
        **{v: [{"splits": splits(v, s)} for s in (4, 5)] for v in ("KD", "e2KD", "e2KD frozen")},
    }
    table = demo.summary_table(rows)
    assert {k: v for k, v in results.items() if k != "seconds"} == {
        "seeds": [4, 5],
        "quick": True,
        "table_percent": table,
        "runs": {name: [r["splits"] for r in group] for name, group in rows.items()},
        "figure": str(tmp_path / "explanations.png"),
    }
    assert isinstance(results["seconds"], float) and 0 <= results["seconds"] < 60
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["table_percent"] == table and stored["seeds"] == [4, 5]
    assert (tmp_path / "results.md").read_text() == table + "\n"
    ((models, shape, labels, explainer, path, kw),) = figures
    assert models == {
        "teacher": "T-kd_seed4",
        "KD": "M-kd_seed4",
        "e2KD": "M-e2kd_seed4",
        "e2KD frozen": "M-e2kd_frozen_seed4",
    }
    assert shape == (6, 3, 4, 4) and labels == [0, 2, 0, 2, 0, 2] and explainer == "gradcam"
    assert path == tmp_path / "explanations.png"
    assert kw == {
        "reference": "teacher",
        "class_names": ["a", "b", "c", "d"],
        "title": "Grad-CAM for the teacher's class on out-of-distribution images (seed 4); red = wrong",
    }
    assert logs[0] == "[e2kd demo] training the teacher on unbiased data (20 images/class) ..."
    assert logs[1] == "[e2kd demo] distilling the KD student (seed 4, 16 images/class, 95% background bias) ..."
    assert logs[7:10] == ["", table, ""]
    # e2KD - KD: 0.25 more base in every metric; OOD similarity base / 5, OOD accuracy base / 4, ID agreement base / 2
    assert logs[10] == "e2KD - KD: OOD explanation similarity +5.0, OOD accuracy +6.2, ID agreement +12.5 points"
    assert logs[11] == "e2KD frozen - KD: OOD explanation similarity +2.5, OOD accuracy +3.1, ID agreement +6.2 points"
    assert logs[12].startswith(
        f"wrote {tmp_path / 'results.json'}, {tmp_path / 'results.md'} and {tmp_path / 'explanations.png'} in "
    ) and logs[12].endswith(" s")
    assert len(logs) == 13
