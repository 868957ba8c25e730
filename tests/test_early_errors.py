"""Mistakes are caught before anything is written: one line naming the file and the field (and, for
model problems, teacher or student); the fixed config then runs in the same folder."""

import pytest
import yaml

from e2kd.cli import main

from .conftest import TINY


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def _teacher(tmp_path):
    cfg = _write(tmp_path / "t.yaml", {**TINY, "train": {**TINY["train"], "epochs": 1}, "out_dir": str(tmp_path / "t")})
    assert main(["train-teacher", str(cfg)]) == 0
    return {**TINY["model"], "checkpoint": str(tmp_path / "t" / "model.pt")}


def _student(tmp_path, teacher, **sections):
    data = {
        **TINY,
        "model": {"name": "small_resnet", "options": {"widths": [4, 4]}},
        "teacher": teacher,
        "train": {**TINY["train"], "epochs": 1},
        "out_dir": str(tmp_path / "s"),
        **sections,
    }
    return _write(tmp_path / "s.yaml", data)


def _fails_with(capsys, args, *fragments):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_nested_metric_option_typo_fails_at_load_and_the_fix_runs(tmp_path, capsys):
    teacher = _teacher(tmp_path)
    bad = {
        "metrics": [
            "accuracy",
            {
                "name": "explanation_similarity",
                "options": {"similarity": "jsd", "similarity_options": {"temprature": 2}},
            },
        ]
    }
    cfg = _student(tmp_path, teacher, eval=bad)
    _fails_with(
        capsys, ["distill", str(cfg)], f"{cfg}: eval.metrics.1.options: ", "temprature", "did you mean 'temperature'"
    )
    assert not (tmp_path / "s").exists()
    bad["metrics"][1]["options"]["similarity"] = "not_a_similarity"
    _fails_with(
        capsys,
        ["distill", str(_student(tmp_path, teacher, eval=bad))],
        "eval.metrics.1.options: ",
        "unknown similarity 'not_a_similarity'",
    )
    good = {
        "metrics": [
            "accuracy",
            {
                "name": "explanation_similarity",
                "options": {"similarity": "jsd", "similarity_options": {"temperature": 2}},
            },
        ]
    }
    assert main(["distill", str(_student(tmp_path, teacher, eval=good))]) == 0


def test_non_differentiable_plugin_with_lam_fails_at_load(tmp_path, capsys):
    teacher = _teacher(tmp_path)
    cfg = _student(tmp_path, teacher, distill={"lam": 1.0, "similarity": "spearman"})
    _fails_with(
        capsys, ["distill", str(cfg)], f"{cfg}: distill.similarity: similarity 'spearman' is not differentiable"
    )
    cfg = _student(tmp_path, teacher, distill={"lam": 1.0, "similarity": "topk_overlap"})
    _fails_with(capsys, ["distill", str(cfg)], "distill.similarity: similarity 'topk_overlap' is not differentiable")
    assert not (tmp_path / "s").exists()
    assert main(["distill", str(_student(tmp_path, teacher, distill={"lam": 0.0, "similarity": "spearman"}))]) == 0


def test_missing_layer_names_teacher_or_student_and_leaves_no_run_dir(tmp_path, capsys):
    teacher = _teacher(tmp_path)
    cfg = _student(
        tmp_path,
        teacher,
        distill={"explainer": {"name": "gradcam", "options": {"layer": "stages.1"}}},
        model={"name": "small_resnet", "options": {"widths": [4]}},
    )
    _fails_with(
        capsys,
        ["distill", str(cfg)],
        f"{cfg}: distill.explainer: the student does not fit: ",
        "no layer 'stages.1'",
    )
    assert not (tmp_path / "s").exists()
    cfg = _student(
        tmp_path,
        {**teacher, "options": {"widths": [4]}, "checkpoint": None},
        distill={"explainer": {"name": "gradcam", "options": {"layer": "stages.1"}}},
    )
    teacher_one_stage = _write(
        tmp_path / "t1.yaml",
        {
            **TINY,
            "model": {"name": "small_resnet", "options": {"widths": [4]}},
            "train": {**TINY["train"], "epochs": 1},
            "out_dir": str(tmp_path / "t1"),
        },
    )
    assert main(["train-teacher", str(teacher_one_stage)]) == 0
    data = yaml.safe_load(cfg.read_text())
    data["teacher"]["checkpoint"] = str(tmp_path / "t1" / "model.pt")
    _fails_with(capsys, ["distill", str(_write(cfg, data))], "distill.explainer: the teacher does not fit")
    assert not (tmp_path / "s").exists()


def test_a_run_dir_with_nothing_trained_is_taken_over(tmp_path):
    stale = tmp_path / "r"
    stale.mkdir()
    (stale / "config.yaml").write_text(yaml.safe_dump({**TINY, "seed": 7}))  # another config, nothing trained
    cfg = _write(tmp_path / "r.yaml", {**TINY, "train": {**TINY["train"], "epochs": 1}, "out_dir": str(stale)})
    assert main(["train-teacher", str(cfg)]) == 0
    assert yaml.safe_load((stale / "config.yaml").read_text())["seed"] == 0


def test_evaluation_similarity_defaults_to_the_training_one_with_its_options(tmp_path):
    """explanation_similarity without options scores with distill.similarity (jsd, temperature 2)."""
    import json

    import torch

    import e2kd
    from e2kd.explaining import explained_forward

    teacher = _teacher(tmp_path)
    cfg = _student(
        tmp_path,
        teacher,
        distill={"lam": 1.0, "similarity": {"name": "jsd", "options": {"temperature": 2.0}}},
        eval={"metrics": ["explanation_similarity"], "splits": ["test_ood"]},
    )
    assert main(["distill", str(cfg)]) == 0
    reported = json.loads((tmp_path / "s" / "metrics.json").read_text())["splits"]["test_ood"]["explanation_similarity"]
    run = e2kd.load_run(tmp_path / "s")
    data = run.split("test_ood")
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    explainer = e2kd.get_explainer("gradcam")
    _, t_maps, targets = explained_forward(run.teacher, images, explainer)
    _, s_maps, _ = explained_forward(run.model, images, explainer, targets)
    expected = e2kd.get_similarity("jsd", temperature=2.0)(s_maps[:, 0], t_maps[:, 0]).mean().item()
    cosine = e2kd.get_similarity("cosine")(s_maps[:, 0], t_maps[:, 0]).mean().item()
    assert reported == pytest.approx(expected, rel=1e-5) and abs(expected - cosine) > 1e-3
