"""``e2kd export``: the exported student opens with timm's own loader (``local-dir:``) and with
e2kd's, and gives the run's logits exactly; the model card says what produced it."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from e2kd.cli import main
from e2kd.config import load_config_dict
from e2kd.errors import ConfigError
from e2kd.experiment import train_teacher
from e2kd.export import export_run, load_exported
from e2kd.runs import load_run

DATA = {"num_classes": 3, "image_size": 32, "train_per_class": 4, "test_per_class": 2}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A timm ResNet-18 trained one short epoch on three synthetic classes, with mean/std of its own."""
    out = tmp_path_factory.mktemp("run") / "r18"
    config = load_config_dict(
        {
            "seed": 1,
            "data": DATA,
            "model": {
                "name": "timm",
                "options": {"arch": "resnet18", "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25]},
            },
            "train": {"epochs": 1, "batch_size": 6, "progress": False},
            "out_dir": str(out),
        }
    )
    train_teacher(config)
    return out


def test_timm_loads_the_export_and_gives_the_runs_logits(finished_run, tmp_path):
    folder = export_run(finished_run, tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    run = load_run(finished_run)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = run.model(images)
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        cfg = model.pretrained_cfg
        mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
        assert torch.equal(model((images - mean) / std), expected)
        assert torch.equal(load_exported(folder)(images), expected)  # e2kd's loader: [0, 1] images
    assert cfg["mean"] == pytest.approx([0.4, 0.5, 0.6]) and cfg["std"] == pytest.approx([0.2, 0.3, 0.25])
    assert cfg["label_names"] == run.class_names and cfg["num_classes"] == 3 and tuple(cfg["input_size"]) == (3, 32, 32)
    assert cfg["crop_pct"] == pytest.approx(224 / 256, abs=1e-4)
    stored = load_file(folder / "model.safetensors")
    assert set(stored) == set(run.model.state_dict()) and "input_mean" not in stored


def test_model_card_reports_metrics_config_and_version(finished_run, tmp_path):
    card = (export_run(finished_run, tmp_path / "e") / "README.md").read_text()
    metrics = json.loads((finished_run / "metrics.json").read_text())
    accuracy = metrics["splits"]["test_id"]["accuracy"]
    assert card.startswith(
        "---\ntags:\n- image-classification\n- knowledge-distillation\n- e2kd\n- timm\nlibrary_name: timm\n---"
    )
    assert f"| test_id | accuracy | {accuracy:.4g} |" in card and "| test_ood | accuracy |" in card
    assert "## Teacher\n\nNone (trained with labels)." in card
    assert "arch: resnet18" in card and "A model made with e2kd 0.1.0: trained on labels." in card
    assert 'timm.create_model("local-dir:THIS_FOLDER", pretrained=True)' in card


def test_card_names_the_teacher_by_name_and_hash(finished_run):
    from e2kd.export import model_card

    config = load_config_dict(
        {
            "data": DATA,
            "model": {"name": "small_resnet"},
            "teacher": {"name": "timm", "options": {"arch": "resnet34"}, "checkpoint": "timm:resnet34.tv_in1k"},
            "distill": {},
        }
    )
    env = {
        "produced_by": {
            "checkpoints": {"teacher": "ab" * 32},
            "weights": {"teacher": {"name": "timm:resnet34.tv_in1k", "revision": "c" * 40, "sha256": "ab" * 32}},
        }
    }
    card = model_card(config, {"test": {"accuracy": 0.5}}, env, "student")
    assert f"- weights: `timm:resnet34.tv_in1k` (revision `{'c' * 40}`)\n- SHA-256: `{'ab' * 32}`" in card
    assert "library_name" not in card and "timm.create_model" not in card  # an e2kd-only architecture
    assert "A model made with e2kd 0.1.0: distilled with e2KD, explanation-enhanced" in card
    config.distill.lam = 0.0
    assert "distilled with plain KD." in model_card(config, {}, env, "student")


def test_export_refuses_what_it_cannot_do_in_one_line(finished_run, tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match=r"not a finished run \(no config.yaml\); train it first$"):
        export_run(tmp_path)
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"taken: exists and is not empty; choose another --out or pass --force"):
        export_run(finished_run, target)
    assert (target / "keep.txt").read_text() == "mine"
    assert main(["export", str(finished_run), "--out", str(target), "--force"]) == 0
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()
    capsys.readouterr()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export", str(finished_run), "--out", str(tmp_path / "p"), "--push", "me/student"]) == 2
    err = capsys.readouterr().err
    assert err == "e2kd: error: --push me/student: downloads and uploads are off (HF_HUB_OFFLINE=1); unset it to push\n"
    assert (tmp_path / "p" / "model.safetensors").is_file()  # the export itself is kept


def test_push_uploads_the_folder_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    from e2kd.export import push_to_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo, private, exist_ok):
            calls.append(("create", repo, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", folder_path, repo_id))

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_to_hub(tmp_path, "me/student", private=True) == "https://huggingface.co/me/student"
    assert calls == [("create", "me/student", True, True), ("upload", str(tmp_path), "me/student")]


def test_the_model_card_in_full():
    """Every line of a card, written out by hand for a small distillation run."""
    from e2kd.config import dump_config
    from e2kd.export import model_card

    config = load_config_dict(
        {
            "data": DATA,
            "model": {"name": "timm", "options": {"arch": "resnet18"}},
            "teacher": {"name": "timm", "options": {"arch": "resnet34"}, "checkpoint": "hf-hub:timm/resnet34.tv_in1k"},
            "distill": {"lam": 2.0},
        }
    )
    env = {
        "packages": {"torch": "2.1", "timm": None, "numpy": "2.0"},
        "produced_by": {"checkpoints": {"teacher": "f" * 64}, "weights": {"teacher": {"revision": "r1"}}},
    }
    metrics = {"splits": {"val": {"accuracy": 0.123456, "agree": True, "curve": [1, 2]}}, "history": [{"loss": 1}]}
    expected = "\n".join(
        [
            "---",
            "tags:",
            "- image-classification",
            "- knowledge-distillation",
            "- e2kd",
            "- timm",
            "library_name: timm",
            "---",
            "",
            "# r18",
            "",
            "A model made with e2kd 0.1.0: distilled with e2KD, explanation-enhanced knowledge distillation "
            "(Good Teachers Explain, ECCV 2024).",
            "",
            "## Load it",
            "",
            "```python",
            "import timm",
            'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True)  # or "hf-hub:REPO" once pushed',
            "# inputs normalised with pretrained_cfg mean/std (config.json)",
            "```",
            "",
            "```python",
            "from e2kd.export import load_exported",
            'model = load_exported("THIS_FOLDER")  # takes [0, 1] images',
            "```",
            "",
            "## Teacher",
            "",
            '- model: `timm` {"arch": "resnet34"}',
            "- weights: `hf-hub:timm/resnet34.tv_in1k` (revision `r1`)",
            f"- SHA-256: `{'f' * 64}`",
            "",
            "## Metrics",
            "",
            "| split | metric | value |",
            "|---|---|---|",
            "| val | accuracy | 0.1235 |",
            "",
            "## Config",
            "",
            "```yaml",
            dump_config(config).strip(),
            "```",
            "",
            "## Environment",
            "",
            "torch 2.1, numpy 2.0",
            "",
        ]
    )
    assert model_card(config, metrics, env, "r18") == expected
    bare = model_card(config.model_copy(update={"teacher": None}), {}, {}, "r18")
    assert "## Teacher\n\nNone (trained with labels).\n\n## Metrics\n\nNo metrics recorded.\n\n## Config\n" in bare
    assert "## Environment" not in bare
    unrecorded = model_card(config, {}, {}, "r18")  # an env.json without a record
    assert "- weights: `hf-hub:timm/resnet34.tv_in1k`\n- SHA-256: not recorded\n" in unrecorded


def test_config_json_in_full(finished_run, tmp_path):
    folder = export_run(finished_run)  # the default folder: RUN/export
    assert folder == finished_run / "export"
    classes = load_run(finished_run).class_names
    expected = {
        "architecture": "resnet18",
        "num_classes": 3,
        "num_features": 512,
        "model_args": {},
        "pretrained_cfg": {
            "input_size": [3, 32, 32],
            "interpolation": "bilinear",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": pytest.approx([0.4, 0.5, 0.6]),
            "std": pytest.approx([0.2, 0.3, 0.25]),
            "num_classes": 3,
            "first_conv": "conv1",
            "classifier": "fc",
        },
        "label_names": classes,
        "e2kd": {
            "version": "0.1.0",
            "builder": "timm",
            "options": {"arch": "resnet18", "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25]},
            "inputs": "e2kd models take [0, 1] images; timm's takes them normalised with pretrained_cfg mean/std",
        },
    }
    text = (folder / "config.json").read_text()
    assert json.loads(text) == expected and text == json.dumps(json.loads(text), indent=2) + "\n"
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    card = (folder / "README.md").read_text()
    assert "\n# r18\n" in card and "- SHA-256" not in card  # the card names the run; no teacher
    versions = json.loads((finished_run / "env.json").read_text())["packages"]
    assert f"## Environment\n\ne2kd 0.1.0, torch {versions['torch']}, " in card  # read from the run's env.json
    export_run(finished_run, tmp_path / "deep" / "er" / "out")  # missing parents are made
    assert (tmp_path / "deep" / "er" / "out" / "model.safetensors").is_file()


def test_a_student_of_an_e2kd_builder_exports_for_e2kds_loader(tmp_path):
    from e2kd.export import hub_config

    config = load_config_dict(
        {
            "seed": 3,
            "data": DATA,
            "model": {"name": "small_resnet", "options": {"widths": [4, 8]}},
            "train": {"epochs": 1, "batch_size": 6, "progress": False},
            "out_dir": str(tmp_path / "small"),
        }
    )
    train_teacher(config)
    folder = export_run(tmp_path / "small")
    stored = json.loads((folder / "config.json").read_text())
    assert stored["architecture"] == "small_resnet" and "model_args" not in stored
    assert stored["pretrained_cfg"]["mean"] == [0.0, 0.0, 0.0] and stored["pretrained_cfg"]["std"] == [1.0, 1.0, 1.0]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(load_exported(folder)(images), load_run(tmp_path / "small").model(images))
    assert hub_config(config, load_exported(folder), ["a", "b", "c"], 32)["label_names"] == ["a", "b", "c"]
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 3}))
    from e2kd.errors import ModelError

    with pytest.raises(ModelError, match=r"export: no e2kd section in config.json \(not exported by `e2kd export`\)$"):
        load_exported(folder)


def test_a_failed_export_leaves_neither_a_half_folder_nor_a_staging_one(finished_run, tmp_path, monkeypatch):
    from pathlib import Path

    real = Path.write_bytes

    def fail_on_card(self, data):
        if self.name == "README.md":
            raise OSError("disk full")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", fail_on_card)
    with pytest.raises(OSError, match="disk full"):
        export_run(finished_run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_push_is_one_line_and_keeps_the_export(tmp_path, monkeypatch):
    import huggingface_hub

    from e2kd.export import push_to_hub

    class Refused:
        def create_repo(self, repo, private, exist_ok):
            raise PermissionError("401 Unauthorized\nmore detail")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", Refused)
    with pytest.raises(ConfigError) as caught:
        push_to_hub(tmp_path, "me/student")
    assert str(caught.value) == (
        f"--push me/student: the upload failed (PermissionError: 401 Unauthorized); the export in {tmp_path} is "
        f"complete — log in (`hf auth login`) and push again"
    )


def test_config_json_takes_the_timm_arch_and_kwargs_from_the_builders_options():
    from e2kd.export import hub_config
    from e2kd.models import build_model

    options = {"arch": "resnet10t", "kwargs": {"drop_rate": 0.25}}
    config = load_config_dict({"data": DATA, "model": {"name": "timm", "options": options}})
    stored = hub_config(config, build_model("timm", options, 3), ["a", "b", "c"], 32)
    assert stored["architecture"] == "resnet10t" and stored["model_args"] == {"drop_rate": 0.25}
    assert stored["pretrained_cfg"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # the arch's own


def test_push_names_its_commit_and_needs_huggingface_hub(tmp_path, monkeypatch):
    import sys

    import huggingface_hub

    from e2kd.export import push_to_hub

    commits = []

    class Api:
        def create_repo(self, repo, private, exist_ok):
            pass

        def upload_folder(self, folder_path, repo_id, commit_message):
            commits.append(commit_message)
            raise PermissionError()

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    with pytest.raises(ConfigError, match=r"^--push me/s: the upload failed \(PermissionError: \); the export in"):
        push_to_hub(tmp_path, "me/s")
    assert commits == ["e2kd export"]
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ConfigError, match=r"^--push needs huggingface_hub \(pip install huggingface_hub\)$"):
        push_to_hub(tmp_path, "me/s")
