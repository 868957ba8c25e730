"""``e2kd reproduce``: verdicts are computed from the paired numbers, and the quick run runs every claim."""

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

from e2kd import reproduce
from e2kd.cli import main
from e2kd.config import read_config_file
from e2kd.data.miniature import write_image_folder, write_voc, write_waterbirds
from e2kd.errors import ConfigError
from e2kd.reproduce import Measure, report, verdict

from .test_datasets import VOC_IMAGES
from .test_early_errors import _fails_with


@pytest.mark.parametrize(
    "differences, expected",
    [
        ([0.1, 0.2, -0.05], "holds here"),  # mean 0.083 > standard error 0.073, two of three seeds agree
        ([0.041, -0.032, 0.007], "does not hold here"),  # mean 0.005 < standard error 0.021: noise
        ([0.3, -0.1, -0.1], "does not hold here"),  # mean > 0 but one seed of three
        ([-0.1, -0.2, 0.05], "does not hold here"),
        ([0.0, 0.0, 0.0], "does not hold here"),  # no difference is no effect
        ([0.01], "holds here"),
    ],
)
def test_verdict_rule(differences, expected):
    assert verdict(differences) == expected


def test_measure_reads_values_keys_and_the_mean_of_a_curve():
    results = {
        "splits": {
            "test": {
                "accuracy": 0.5,
                "group_accuracy": {"out_of_distribution": 0.25},
                "shift_equivariance": {"shift_0": 1.0, "shift_1": 0.2, "shift_2": 0.4},
            }
        }
    }
    assert Measure("a", "test", "accuracy").read(results) == 0.5
    assert Measure("b", "test", "group_accuracy", "out_of_distribution").read(results) == 0.25
    assert Measure("c", "test", "shift_equivariance", "mean_shift").read(results) == pytest.approx(0.3)
    closer = Measure("d", "test", "group_accuracy", "out_of_distribution", towards_teacher=True)
    teacher = {"splits": {"test": {"group_accuracy": {"out_of_distribution": 0.75}}}}
    assert closer.read(results, teacher) == -0.5
    with pytest.raises(ValueError, match="needs the teacher"):
        closer.read(results)


def test_the_faithfulness_claim_measures_each_student_against_the_teacher_evaluated_once(tmp_path, monkeypatch):
    """Its value per run is -|student AUC - teacher AUC|, the teacher evaluated (under the students'
    metrics) once per claim; e2KD closer to the teacher than KD gives positive differences."""
    claim = next(c for c in reproduce.CLAIMS if c.key == "faithfulness")
    assert claim.root == "few_data" and [m.towards_teacher for m in claim.measures] == [True, True]
    monkeypatch.setattr(reproduce, "train_teacher", lambda config, **kw: {"splits": {"val": {"accuracy": 1.0}}})
    aucs = {("KD", 0): 0.2, ("e2KD", 0): 0.35, ("KD", 1): 0.6, ("e2KD", 1): 0.45}

    def fake_distill(config, **kw):
        auc = aucs[("e2KD" if config.distill.lam else "KD", config.seed)]
        return {"splits": {"val": {"deletion": {"auc": auc}, "insertion": {"auc": 1 - auc}}}}

    evaluated = []

    def fake_teacher_results(run):
        evaluated.append(run)
        return {"splits": {"val": {"deletion": {"auc": 0.4}, "insertion": {"auc": 0.5}}}}

    monkeypatch.setattr(reproduce, "distill", fake_distill)
    monkeypatch.setattr(reproduce, "load_run", lambda path: path)
    monkeypatch.setattr(reproduce, "teacher_results", fake_teacher_results)
    (tmp_path / "data").mkdir()
    configs = reproduce.miniature_configs(claim, tmp_path, [0, 1], 0.25)
    result = reproduce.run_claim(claim, configs, log=lambda _: None)
    assert evaluated == [configs[0]["KD"].out_dir]
    deletion, insertion = result["rows"]
    assert deletion["KD"] == pytest.approx([-0.2, -0.2]) and deletion["e2KD"] == pytest.approx([-0.05, -0.05])
    assert deletion["differences"] == pytest.approx([0.15, 0.15]) and deletion["verdict"] == "holds here"
    assert insertion["KD"] == pytest.approx([-0.3, -0.1]) and insertion["e2KD"] == pytest.approx([-0.15, -0.05])
    assert result["teacher"]["val"] == {"accuracy": 1.0, "deletion.auc": 0.4, "insertion.auc": 0.5}


def test_verdicts_follow_the_numbers_not_the_hope(tmp_path, monkeypatch):
    """The same claim judged on made-up student results: the verdict follows the paired
    differences of every seed. The seeds differ, and in the last case the first seed alone would
    say the opposite of all three."""
    claim = next(c for c in reproduce.CLAIMS if c.key == "few_data")
    monkeypatch.setattr(reproduce, "train_teacher", lambda config, **kw: {})
    cases = (
        ([0.2, 0.1, 0.05], "holds here"),
        ([-0.1, -0.1, -0.05], "does not hold here"),
        ([0.1, 0.05, -0.4], "does not hold here"),
    )
    for gains, expected in cases:

        def fake_distill(config, gains=gains, **kw):
            kd = 0.5 + 0.03 * config.seed
            value = kd + gains[config.seed] if config.distill.lam > 0 else kd
            return {"splits": {"val": {"accuracy": value, "agreement": value}}}

        monkeypatch.setattr(reproduce, "distill", fake_distill)
        (tmp_path / "data").mkdir(exist_ok=True)  # data "already written"
        configs = reproduce.miniature_configs(claim, tmp_path, [0, 1, 2], 0.1)
        result = reproduce.run_claim(claim, configs, log=lambda _: None)
        for row in result["rows"]:
            assert row["verdict"] == expected, gains
            assert row["KD"] == pytest.approx([0.5, 0.53, 0.56])
            assert row["differences"] == pytest.approx(gains)
    text = report([result], [0, 1, 2], quick=True, seconds=1.0)
    assert "| accuracy |" in text and "+10.0, +5.0, -40.0" in text and "**does not hold here**" in text


def test_reproduce_errors_are_one_line(tmp_path, capsys):
    _fails_with(
        capsys,
        ["reproduce", "--quick", "--claims", "few_data,nope", "--out", str(tmp_path)],
        "--claims: unknown claim 'nope' (known: few_data, spurious, voc, cnn_to_vit, frozen, faithfulness, bias100, "
        "bias100_bcos)",
    )
    _fails_with(capsys, ["reproduce", "--quick", "--seeds", ",", "--out", str(tmp_path)], "--seeds")


@pytest.mark.slow
def test_quick_reproduce_runs_every_claim_and_computes_its_verdicts(tmp_path, capsys):
    assert main(["reproduce", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "reproduce.json").read_text())
    assert [c["key"] for c in results["claims"]] == [
        "few_data",
        "spurious",
        "voc",
        "cnn_to_vit",
        "frozen",
        "faithfulness",
        "bias100",
        "bias100_bcos",
    ]
    text = (tmp_path / "reproduce.md").read_text()
    assert (tmp_path / "reproduce.png").stat().st_size > 0 and (tmp_path / "shift.png").stat().st_size > 0
    vit = results["claims"][3]
    assert set(vit["curves"]) == {"teacher", "KD", "e2KD"} and len(vit["curves"]["e2KD"]) == 3
    for claim in results["claims"]:
        for row in claim["rows"]:
            base, other = row["baseline"], row["variant"]
            assert len(row[base]) == len(row[other]) == 3
            assert row["differences"] == pytest.approx([b - a for a, b in zip(row[base], row[other])])
            assert row["verdict"] == verdict(row["differences"])
            assert f"| {row['measure']} |" in text
    # the frozen claim reuses the few-data claim's teacher and KD students
    few, frozen = results["claims"][0], results["claims"][4]
    assert few["rows"][0]["KD"] == frozen["rows"][0]["KD"]
    assert [r["variant"] for r in results["claims"][6]["rows"]] == list(reproduce.claims.BIAS100_VARIANTS)
    faithful = results["claims"][5]  # its KD students are the few-data claim's, measured against the teacher
    assert faithful["teacher"]["val"]["deletion.auc"] > 0 and all(v <= 0 for v in faithful["rows"][0]["KD"])


# -- full size on real folders: the paper's configs, pointed at a copy in the real on-disk format ------------

SMALL = [
    "--set",
    "data.options.image_size=32",
    "--set",
    "train.epochs=1",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.warmup_epochs=0",
    "--set",
    "data.num_workers=0",
    "--set",
    "train.progress=false",
]


def _timm_teacher(path: Path, arch: str, num_classes: int, nest: bool = False) -> Path:
    """A checkpoint as users hold it: timm's state dict, or a DDP training checkpoint that nests it."""
    torch.manual_seed(0)
    state = timm.create_model(arch, pretrained=False, num_classes=num_classes).state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}} if nest else state, path)
    return path


def _stored(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


@pytest.mark.slow
def test_reproduce_on_an_imagenet_folder_runs_the_paper_config_with_the_given_teacher(tmp_path, capsys):
    folder = tmp_path / "imagenet"
    write_image_folder(folder, ["n01", "n02", "n03"], {"train": 5, "val": 2}, seed=0)
    teacher = _timm_teacher(tmp_path / "resnet34.pth", "resnet34", 3)
    out = tmp_path / "out"
    imagenet = ["--set", "data.options.shots=3", "--set", "data.options.holdout_per_class=1"]
    assert (
        main(
            [
                "reproduce",
                "--imagenet",
                str(folder),
                "--teacher",
                f"few_data={teacher}",
                "--seeds",
                "0",
                "--out",
                str(out),
                *SMALL,
                *imagenet,
            ]
        )
        == 0
    )
    assert "skipping cnn_to_vit: no teacher (--teacher cnn_to_vit=FILE" in capsys.readouterr().out
    results = json.loads((out / "reproduce.json").read_text())
    assert [c["key"] for c in results["claims"]] == ["few_data", "frozen"]
    runs = out / "few_data_imagenet"
    # each student is the packaged paper config, with only the folder, teacher, seed, variant and --set changed
    paper = read_config_file("imagenet_50shot_r34_r18")
    for run, variant in (
        ("kd_seed0", {"lam": 0.0}),
        ("e2kd_seed0", {"lam": 1.0}),
        ("e2kd_frozen_seed0", {"lam": 1.0, "teacher_mode": "frozen"}),
    ):
        stored = _stored(runs / run)
        assert stored["data"]["options"]["root"] == str(folder.resolve())
        assert stored["data"]["options"]["shots"] == 3 and stored["data"]["seed"] == paper["data"]["seed"]
        assert stored["teacher"]["checkpoint"] == str(teacher.resolve())
        assert stored["teacher"]["options"]["arch"] == "resnet34" and stored["model"]["options"]["arch"] == "resnet18"
        assert stored["train"]["optimizer"] == paper["train"]["optimizer"] == "adamw"
        assert stored["train"]["epochs"] == 1 and stored["train"]["augment"] == "resized_crop_flip"
        assert {k: stored["distill"][k] for k in variant} == variant
        assert stored["distill"]["explainer"] == {"name": "gradcam", "options": {"layer": "layer4"}}
    # the report's numbers are the runs' own
    few, frozen = results["claims"]
    kd = json.loads((runs / "kd_seed0" / "metrics.json").read_text())["splits"]["val"]
    e2 = json.loads((runs / "e2kd_seed0" / "metrics.json").read_text())["splits"]["val"]
    assert few["rows"][0]["KD"] == [kd["accuracy"]] and few["rows"][1]["e2KD"] == [e2["agreement"]]
    assert few["rows"][1]["differences"] == pytest.approx([e2["agreement"] - kd["agreement"]])
    assert frozen["rows"][0]["KD"] == few["rows"][0]["KD"]  # the frozen claim reuses the KD run
    text = (out / "reproduce.md").read_text()
    assert "on the data listed per claim below" in text
    assert f"imagenet at {folder.resolve()}, paper settings e2kd/configs/imagenet_50shot_r34_r18.yaml" in text
    assert "--set train.epochs=1" in text

    # CNN -> ViT on the same folder, from a B-cos DenseNet-169 file: the students' shift-equivariance
    # curves reach the report (no teacher curve: a given checkpoint is not evaluated)
    from e2kd.models import build_model

    dn169 = tmp_path / "densenet_169.pth"
    torch.save(build_model("bcos_v2_densenet169", None, 3).state_dict(), dn169)
    vit = [
        "--set",
        "model.options={img_size: 32, patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2}",
        "--set",
        "eval.metrics=[accuracy, {name: shift_equivariance, options: {max_shift: 8, step: 4}}]",
    ]
    assert (
        main(
            [
                "reproduce",
                "--imagenet",
                str(folder),
                "--teacher",
                f"cnn_to_vit={dn169}",
                "--claims",
                "cnn_to_vit",
                "--seeds",
                "0",
                "--out",
                str(tmp_path / "vit"),
                *SMALL,
                *imagenet,
                *vit,
            ]
        )
        == 0
    )
    claim = json.loads((tmp_path / "vit" / "reproduce.json").read_text())["claims"][0]
    curve = json.loads((tmp_path / "vit" / "cnn_to_vit_imagenet" / "e2kd_seed0" / "metrics.json").read_text())
    curve = curve["splits"]["val"]["shift_equivariance"]
    assert set(claim["curves"]) == {"KD", "e2KD"} and claim["curves"]["e2KD"] == [curve]
    assert claim["rows"][0]["e2KD"] == [pytest.approx((curve["shift_4"] + curve["shift_8"]) / 2)]
    assert (tmp_path / "vit" / "shift.png").stat().st_size > 0


@pytest.mark.slow
def test_reproduce_on_waterbirds_and_voc_folders(tmp_path, capsys):
    """Waterbirds with a nested DDP checkpoint as the teacher; VOC without one, so the guided
    teacher is trained from its packaged config on the same folder first."""
    waterbirds, voc = tmp_path / "waterbirds", tmp_path / "voc"
    write_waterbirds(
        waterbirds,
        {
            "train": {(0, 0): 4, (1, 1): 4},
            "val": {g: 1 for g in ((0, 1), (1, 0), (0, 0), (1, 1))},
            "test": {(0, 1): 2, (1, 0): 2, (0, 0): 1, (1, 1): 1},
        },
        seed=1,
    )
    write_voc(voc, {"trainval": VOC_IMAGES["train"], "test": VOC_IMAGES["val"]})
    teacher = _timm_teacher(tmp_path / "wb_r50.ckpt", "resnet50", 2, nest=True)
    out = tmp_path / "out"
    assert (
        main(
            [
                "reproduce",
                "--waterbirds",
                str(waterbirds),
                "--voc",
                str(voc),
                "--teacher",
                f"spurious={teacher}",
                "--seeds",
                "0",
                "--out",
                str(out),
                *SMALL,
            ]
        )
        == 0
    )
    results = json.loads((out / "reproduce.json").read_text())
    assert [c["key"] for c in results["claims"]] == ["spurious", "voc"]
    guided = _stored(out / "voc_voc" / "teacher")
    assert guided["model"]["name"] == "bcos_resnet50" and guided["train"]["guidance"]["loss"] == "energy"
    student = _stored(out / "voc_voc" / "e2kd_seed0")
    assert student["teacher"]["checkpoint"] == str(out.resolve() / "voc_voc" / "teacher" / "model.pt")
    voc_row = results["claims"][1]["rows"][0]
    metrics = json.loads((out / "voc_voc" / "e2kd_seed0" / "metrics.json").read_text())
    assert voc_row["measure"] == "EPG" and voc_row["e2KD"] == [metrics["splits"]["test"]["epg"]]
    assert "micro_f1" in results["claims"][1]["teacher"]["test"]
    spurious = json.loads((out / "spurious_waterbirds" / "kd_seed0" / "metrics.json").read_text())
    assert results["claims"][0]["rows"][0]["KD"] == [
        spurious["splits"]["test"]["group_accuracy"]["out_of_distribution"]
    ]


def test_reproduce_real_data_errors_are_one_line_and_come_before_any_run(tmp_path, capsys):
    folder = tmp_path / "imagenet"
    write_image_folder(folder, ["n01", "n02"], {"train": 3, "val": 1}, seed=0)
    out = tmp_path / "out"
    base = ["reproduce", "--out", str(out), "--seeds", "0"]
    _fails_with(capsys, [*base, "--imagenet", str(tmp_path / "nope")], "--imagenet", "not a folder")
    _fails_with(capsys, [*base, "--imagenet", str(folder)], "nothing to run", "--teacher CLAIM=FILE")
    _fails_with(
        capsys,
        [*base, "--imagenet", str(folder), "--claims", "few_data"],
        "few_data on --imagenet",
        "needs its teacher: --teacher few_data=FILE (a timm/torchvision ResNet-34",
    )
    _fails_with(
        capsys,
        [*base, "--imagenet", str(folder), "--teacher", "frozen=x.pth"],
        "'frozen' is not a claim with a teacher (one of: few_data, spurious, voc, cnn_to_vit)",
    )
    _fails_with(
        capsys,
        [*base, "--imagenet", str(folder), "--teacher", f"spurious={folder}"],
        "spurious runs on --waterbirds DIR, which was not given",
    )
    _fails_with(capsys, [*base, "--imagenet", str(folder), "--teacher", "few_data"], "expected CLAIM=FILE")
    _fails_with(
        capsys, [*base, "--imagenet", str(folder), "--teacher", f"few_data={tmp_path / 'r34.pth'}"], "is not a file"
    )
    _fails_with(capsys, [*base, "--set", "train.epochs=1"], "--set applies to full-size runs on real folders")
    wrong = _timm_teacher(tmp_path / "resnet50.pth", "resnet50", 2)
    _fails_with(capsys, [*base, "--imagenet", str(folder), "--quick", "--teacher", f"few_data={wrong}"], "--quick")
    # a checkpoint of the wrong architecture fails at once, naming the keys, before anything trains
    _fails_with(
        capsys,
        [
            *base,
            "--imagenet",
            str(folder),
            "--teacher",
            f"few_data={wrong}",
            "--set",
            "data.options.shots=2",
            "--set",
            "data.options.holdout_per_class=1",
        ],
        "resnet50.pth",
        "unexpected",
    )
    _fails_with(
        capsys,
        [*base, "--imagenet", str(folder), "--teacher", f"few_data={wrong}", "--set", "data.options.shot=2"],
        "data.options",
        "shot",
    )
    assert not any(out.glob("*/*_seed0"))


# -- the miniature plan: what every claim trains, checked without training ---------------------------

PLAN = Path(__file__).parent / "data" / "reproduce_plan.json"


def _plan(root: Path, scale: float, seeds=(0, 1)) -> dict:
    return {
        claim.key: reproduce.miniature_configs(claim, root / claim.root, list(seeds), scale)
        for claim in reproduce.CLAIMS
    }


def _without(config, *fields) -> dict:
    data = config.model_dump(mode="json")
    for field in fields:
        data.pop(field)
    return data


def test_every_claims_students_differ_only_in_their_variant_and_learn_from_its_teacher(tmp_path):
    for key, per_seed in _plan(tmp_path, 0.25).items():
        claim = next(c for c in reproduce.CLAIMS if c.key == key)
        root = (tmp_path / claim.root).resolve()
        teachers = {seed: configs["teacher"] for seed, configs in per_seed.items()}
        assert teachers[0].model_dump() == teachers[1].model_dump(), key  # one teacher for every seed
        teacher = teachers[0]
        assert teacher.seed == 0 and teacher.out_dir == root / "teacher", key
        out_dirs = set()
        for seed, configs in per_seed.items():
            base, *others = claim.variants
            assert configs[base].distill.lam == 0.0 and all(configs[v].distill.lam == 1.0 for v in others), key
            for variant in claim.variants:
                student = configs[variant]
                assert student.seed == seed and student.data.seed == seed, (key, variant)
                assert student.source == f"reproduce {key} {variant}"
                assert student.teacher.checkpoint == teacher.out_dir / "model.pt"
                assert (student.teacher.name, student.teacher.options) == (teacher.model.name, teacher.model.options)
                assert student.distill.teacher_mode == ("frozen" if variant == "e2KD frozen" else "live")
                assert student.out_dir.parent == root and student.out_dir.name.endswith(f"_seed{seed}")
                out_dirs.add(student.out_dir)
                # the variant is the distill block: everything else is the baseline's
                same = ("distill", "out_dir")
                assert _without(student, *same) == _without(configs[base], *same), (key, variant)
            if key not in ("spurious", "bias100", "bias100_bcos"):  # those teachers see unbiased data
                assert configs[base].data.options["root"] == teacher.data.options["root"], key
        assert len(out_dirs) == 2 * len(claim.variants), key  # a folder per (variant, seed)


def test_quick_runs_fewer_epochs_on_less_data_than_the_full_plan(tmp_path):
    quick, full = _plan(tmp_path / "quick", 0.25, seeds=(0,)), _plan(tmp_path / "full", 1.0, seeds=(0,))
    for key in quick:
        for name, config in quick[key][0].items():
            assert 1 <= config.train.epochs < full[key][0][name].train.epochs, (key, name)
    for folder in ("few_data", "spurious", "voc", "cnn_to_vit"):
        images = [
            len(list((tmp_path / scale / folder).rglob("*.png")))
            + len(list((tmp_path / scale / folder).rglob("*.jpg")))
            for scale in ("quick", "full")
        ]
        assert 0 < images[0] < images[1], folder


def _tree_digest(folder: Path) -> str:
    """SHA-256 over every file under ``folder`` in path order: the decoded pixels of a PNG (lossless,
    so the same whatever zlib wrote), the size of a JPEG (its pixels depend on the libjpeg version),
    the bytes of anything else (annotations, lists, metadata)."""
    import hashlib

    from PIL import Image

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix in (".png", ".jpg"):
            with Image.open(path) as image:
                content = f"{image.mode} {image.size}".encode() + (image.tobytes() if path.suffix == ".png" else b"")
        else:
            content = path.read_bytes()
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + content)
    return digest.hexdigest()


def _plan_snapshot(root: Path) -> dict:
    """Both scales' plans (seed 0; seeds are checked above) with the folder made relative, and per
    claim the number of image files its data holds and their digest (:func:`_tree_digest`)."""
    snapshot = {}
    for scale, name in ((0.25, "quick"), (1.0, "full")):
        plan = _plan(root / name, scale, seeds=(0,))
        snapshot[name] = {
            key: {
                variant: json.loads(
                    json.dumps(config.model_dump(mode="json", exclude_defaults=True)).replace(
                        str((root / name).resolve()), "ROOT"
                    )
                )
                for variant, config in per_seed[0].items()
            }
            for key, per_seed in plan.items()
        }
        snapshot[name]["images"] = {
            folder.name: sum(p.suffix in (".png", ".jpg") for p in folder.rglob("*"))
            for folder in sorted((root / name).iterdir())
        }
        snapshot[name]["data_sha256"] = {
            folder.name: _tree_digest(folder) for folder in sorted((root / name).iterdir())
        }
    return snapshot


def test_the_miniature_plan_is_the_one_the_documented_verdicts_came_from(tmp_path):
    """docs/results.md reports verdicts of this plan: a change to a claim's data, models, epochs or
    options changes the experiment, so it must be made on purpose — regenerate the snapshot with
    ``python -m tests.test_reproduce`` and rerun ``e2kd reproduce`` for the docs."""
    assert _plan_snapshot(tmp_path) == json.loads(PLAN.read_text())


# -- verdict, report and the run itself, on made-up numbers ----------------------------------------


@pytest.mark.parametrize(
    "differences, expected",
    [
        (
            [0.4, 0.4, 0.0, 0.0],
            "does not hold here",
        ),  # half the seeds positive (a zero is no gain), though mean > error
        ([0.3, 0.01], "holds here"),  # both seeds positive: mean 0.155 > standard error 0.145
        ([0.2, 0.2, 0.2, -0.05], "holds here"),  # 3 of 4 positive, mean 0.1375 > 0.0625
        ([0.3, 0.3, -0.3], "does not hold here"),  # mean 0.1 < standard error 0.2 (sd / sqrt(3))
    ],
)
def test_verdict_rule_at_its_edges(differences, expected):
    assert verdict(differences) == expected


def test_verdict_needs_a_difference():
    with pytest.raises(ValueError, match="^no paired differences$"):
        verdict([])


def test_the_report_of_made_up_claims_line_by_line():
    claims = [
        {
            "key": "few_data",
            "title": "Few data",
            "data": reproduce.MINIATURE,
            "teacher": {"val": {"accuracy": 0.8, "agreement": 0.75, "curve": {"shift_1": 1.0}}},
            "rows": [
                {
                    "measure": "accuracy",
                    "paper": "49.8 -> 54.9",
                    "baseline": "KD",
                    "variant": "e2KD",
                    "KD": [0.5, 0.6],
                    "e2KD": [0.55, 0.7],
                    "differences": [0.05, 0.1],
                    "verdict": "holds here",
                }
            ],
        },
        {
            "key": "voc",
            "title": "VOC",
            "data": "voc at /data/voc",
            "teacher": {},
            "rows": [
                {
                    "measure": "EPG",
                    "paper": "60.1 -> 71.1",
                    "baseline": "KD",
                    "variant": "e2KD",
                    "KD": [0.4],
                    "e2KD": [0.3],
                    "differences": [-0.1],
                    "verdict": "does not hold here",
                }
            ],
        },
    ]
    text = report(claims, [0, 1], quick=False, seconds=90.0, overrides=["train.epochs=1", "seed=2"])
    assert text == "\n".join(
        [
            "# e2kd reproduce",
            "",
            "Full run on the data listed per claim below; seeds 0, 1; 1.5 min. Values in percent, mean ± std over seeds; "
            f"Δ = e2KD − KD per seed (paired). Verdict rule: {reproduce.RULE}.",
            "",
            "| claim | measure | paper (KD → e2KD) | KD | e2KD | Δ per seed | verdict |",
            "|---|---|---|---|---|---|---|",
            "| Few data (e2KD vs KD) | accuracy | 49.8 -> 54.9 | 55.0 ± 7.1 | 62.5 ± 10.6 | +5.0, +10.0 | **holds here** |",
            "| VOC (e2KD vs KD) | EPG | 60.1 -> 71.1 | 40.0 | 30.0 | -10.0 | **does not hold here** |",
            "",
            "Data and teachers (the teacher is the same for every seed of a claim):",
            "",
            "- few_data: shape images (miniature); teacher: val accuracy 80.0, val agreement 75.0",
            "- voc: voc at /data/voc; teacher: a given checkpoint (not evaluated here)",
            "",
            "Full-size runs with --set train.epochs=1 --set seed=2.",
            "",
        ]
    )
    quick = report(
        [{**claims[0], "data": reproduce.MINIATURE}, {**claims[1], "data": reproduce.MINIATURE}],
        [3],
        quick=True,
        seconds=600.0,
    )
    assert quick.splitlines()[2].startswith(
        "Quick (smoke) run on shape images in the paper's data formats; seeds 3; 10.0 min."
    )
    assert quick.endswith("teacher: a given checkpoint (not evaluated here)\n")
    no_data_key = [{k: v for k, v in c.items() if k != "data"} for c in claims]
    text = report(no_data_key, [0], quick=True, seconds=1.0)  # a claim without a data line is a miniature
    assert "on shape images" in text and "- few_data: shape images (miniature); teacher: val accuracy 80.0" in text


def _fake_runs(monkeypatch, gains):
    """train_teacher and distill replaced by made-up results: the teacher's, and per student a value
    of its seed and variant (e2KD = KD + gains[seed]), with a shift curve of the same value. Returns
    the configs run, in order."""
    calls = []

    def train_teacher(config, **kw):
        calls.append(config)
        return {"splits": {"val": {"accuracy": 0.9, "shift_equivariance": {"shift_0": 1.0, "shift_4": 0.5}}}}

    def distill(config, **kw):
        value = 0.5 + 0.03 * config.seed + (gains[config.seed] if config.distill.lam > 0 else 0.0)
        calls.append(config)
        return {
            "splits": {
                "val": {
                    "accuracy": value,
                    "agreement": value - 0.1,
                    "shift_equivariance": {"shift_0": 1.0, "shift_4": value, "shift_8": value / 2},
                }
            }
        }

    monkeypatch.setattr(reproduce, "train_teacher", train_teacher)
    monkeypatch.setattr(reproduce, "distill", distill)
    return calls


def test_run_claim_pairs_each_seeds_runs_and_keeps_the_curves_teacher_first(tmp_path, monkeypatch):
    claim = next(c for c in reproduce.CLAIMS if c.key == "cnn_to_vit")
    calls = _fake_runs(monkeypatch, {0: 0.1, 1: -0.02})
    (tmp_path / "data").mkdir()
    logged = []
    result = reproduce.run_claim(claim, reproduce.miniature_configs(claim, tmp_path, [0, 1], 0.25), logged.append)
    assert [c.out_dir.name for c in calls] == ["teacher", "kd_seed0", "e2kd_seed0", "kd_seed1", "e2kd_seed1"]
    assert logged == [
        "[e2kd reproduce] cnn_to_vit: KD, seed 0",
        "[e2kd reproduce] cnn_to_vit: e2KD, seed 0",
        "[e2kd reproduce] cnn_to_vit: KD, seed 1",
        "[e2kd reproduce] cnn_to_vit: e2KD, seed 1",
    ]
    (row,) = result["rows"]
    kd = [0.75 * 0.5, 0.75 * 0.53]  # the mean over the non-zero shifts: (v + v / 2) / 2
    assert row["KD"] == pytest.approx(kd) and row["e2KD"] == pytest.approx([0.75 * 0.6, 0.75 * 0.51])
    assert row["differences"] == pytest.approx([0.075, -0.015]) and row["verdict"] == verdict(row["differences"])
    assert list(result["curves"]) == ["teacher", "KD", "e2KD"]
    assert result["curves"]["teacher"] == [{"shift_0": 1.0, "shift_4": 0.5}]
    assert [c["shift_4"] for c in result["curves"]["e2KD"]] == pytest.approx([0.6, 0.51])
    assert result["teacher"] == {"val": {"accuracy": 0.9}}  # the curve is not a number of the report
    assert {k: result[k] for k in ("key", "title", "variants", "data")} == {
        "key": "cnn_to_vit",
        "title": claim.title,
        "variants": ["KD", "e2KD"],
        "data": reproduce.MINIATURE,
    }
    # a given teacher checkpoint (no teacher config): nothing trained, no teacher curve or numbers
    configs = reproduce.miniature_configs(claim, tmp_path, [0], 0.25)
    del configs[0]["teacher"]
    calls.clear()
    given = reproduce.run_claim(claim, configs, logged.append, data="imagenet at /x")
    assert [c.out_dir.name for c in calls] == ["kd_seed0", "e2kd_seed0"] and list(given["curves"]) == ["KD", "e2KD"]
    assert given["teacher"] == {} and given["data"] == "imagenet at /x"


def test_run_reproduce_writes_the_report_the_results_and_the_figures(tmp_path, monkeypatch):
    from e2kd import viz

    calls = _fake_runs(monkeypatch, {0: 0.1, 1: 0.05})
    plots = []
    for name in ("plot_paired", "plot_curves"):
        real = getattr(viz, name)
        monkeypatch.setattr(
            viz,
            name,
            lambda data, path, _real=real, _name=name, **kw: (
                plots.append((_name, data, path.name, kw)) or _real(data, path, **kw)
            ),
        )
    logged = []
    results = reproduce.run_reproduce(
        tmp_path, seeds=(0, 1), quick=True, claims=["few_data", "cnn_to_vit"], log=logged.append
    )
    stored = json.loads((tmp_path / "reproduce.json").read_text())
    assert stored == json.loads(json.dumps(results))
    assert (stored["seeds"], stored["quick"], stored["rule"], stored["overrides"]) == ([0, 1], True, reproduce.RULE, [])
    assert [c["key"] for c in stored["claims"]] == ["few_data", "cnn_to_vit"]
    few = stored["claims"][0]
    assert [r["measure"] for r in few["rows"]] == ["accuracy", "agreement"]
    assert few["rows"][0]["KD"] == pytest.approx([0.5, 0.53]) and few["rows"][0]["differences"] == pytest.approx(
        [0.1, 0.05]
    )
    text = (tmp_path / "reproduce.md").read_text()
    # the report of these results (its time line aside: the run's own duration)
    assert text.splitlines()[3:] == report(results["claims"], [0, 1], True, 0.0).splitlines()[3:]
    assert logged[-1] == text and text.startswith("# e2kd reproduce\n\nQuick (smoke) run on shape images")
    for figure in ("reproduce.png", "shift.png"):
        assert (tmp_path / figure).stat().st_size > 1000
    assert (tmp_path / "few_data" / "data").is_dir() and (tmp_path / "cnn_to_vit" / "data").is_dir()
    students = {c.train.epochs for c in calls if c.out_dir.name != "teacher"}
    assert students == {reproduce.claims._epochs(0.25, 120), reproduce.claims._epochs(0.25, 40)}  # the quick scale
    assert isinstance(stored["seconds"], float) and 0 < stored["seconds"] < 600
    assert stored["seconds"] == round(stored["seconds"], 1)
    (paired, rows, path, kw), (curves, lines, shift_path, shift_kw) = plots
    assert (paired, path, curves, shift_path) == ("plot_paired", "reproduce.png", "plot_curves", "shift.png")
    assert rows[0] == ("few_data: accuracy (e2KD)", pytest.approx([10.0, 5.0]), True)
    assert kw == {
        "xlabel": "e2KD − KD per seed (points); bar: mean, green: holds here",
        "title": "e2kd reproduce: paired differences",
    }
    assert list(lines) == ["teacher", "KD", "e2KD"]  # at the teacher's shifts, each the mean over seeds
    assert lines["e2KD"] == ([0, 4], pytest.approx([1.0, (0.6 + 0.58) / 2]))
    assert shift_kw == {
        "xlabel": "diagonal shift (px)",
        "ylabel": "cosine on the overlap",
        "title": "cnn_to_vit: shift equivariance of explanations",
    }
    with pytest.raises(ValueError, match="^at least one seed$"):
        reproduce.run_reproduce(tmp_path, seeds=())


def test_real_folder_claims_skip_those_without_a_teacher_and_say_so(tmp_path):
    real = reproduce.RealData({"imagenet": tmp_path}, {"few_data": tmp_path / "r34.pth"})
    logged = []
    chosen = reproduce.select_claims(None, real, logged.append)
    assert [c.key for c in chosen] == ["few_data", "frozen"]  # frozen shares few_data's teacher
    assert logged == [
        "[e2kd reproduce] skipping cnn_to_vit: no teacher (--teacher cnn_to_vit=FILE: "
        f"{reproduce.CLAIMS[3].paper.teacher})"
    ]
    later = reproduce.RealData({"imagenet": tmp_path}, {"cnn_to_vit": tmp_path / "dn169.pth"})
    assert [c.key for c in reproduce.select_claims(None, later, logged.append)] == ["cnn_to_vit"]
    with pytest.raises(ConfigError) as err:
        reproduce.select_claims(None, reproduce.RealData({"imagenet": tmp_path}, {}), logged.append)
    assert str(err.value) == (
        "nothing to run on the given folders: give the teachers with --teacher CLAIM=FILE "
        "(e.g. --teacher few_data=/models/resnet34.pth)"
    )
    assert [c.key for c in reproduce.select_claims(None, None)] == [c.key for c in reproduce.CLAIMS]
    assert reproduce.claims._epochs(0.01, 30) == 1  # at least one epoch


if __name__ == "__main__":  # python -m tests.test_reproduce: record the current plan as the reference
    import tempfile

    with tempfile.TemporaryDirectory() as where:
        PLAN.parent.mkdir(exist_ok=True)
        PLAN.write_text(json.dumps(_plan_snapshot(Path(where)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {PLAN}")
