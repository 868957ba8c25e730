"""Weights by name, with no network: the caches the libraries would have written are built here, in
temporary folders, with random weights; each name resolves, loads and gives the logits of the weights
written. Missing names, wrong hashes and changed locks are one line each."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from e2kd.config import load_config_dict
from e2kd.digests import file_sha256
from e2kd.errors import ConfigError, ModelError, WeightsNotCached
from e2kd.models import build_model
from e2kd.runs import produced_by
from e2kd.weights import compare, fetch, is_weight_name, read_lock, resolve

REPO = "timm/resnet18.a1_in1k"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty library caches (HF_HOME, TORCH_HOME) and lock file, offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("E2KD_WEIGHTS_LOCK", str(tmp_path / "e2kd-weights.lock"))
    return tmp_path


def hub_snapshot(root: Path, repo: str, revision: str, state: dict[str, torch.Tensor], *, main: bool = True) -> Path:
    """The Hugging Face hub cache layout: models--ORG--NAME/snapshots/REV/{config.json,model.safetensors}
    and refs/main naming the revision (as huggingface_hub writes it after a download)."""
    folder = root / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 10}))
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    if main:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(revision)
    return snapshot / "model.safetensors"


def hub_file(root: Path, stem: str, state: dict[str, torch.Tensor]) -> Path:
    """A file in torch.hub's checkpoint folder named ``<stem>-<first 10 hex of its SHA-256>.pth``."""
    folder = root / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / "scratch"
    torch.save(state, scratch)
    path = folder / f"{stem}-{file_sha256(scratch)[:10]}.pth"
    scratch.rename(path)
    return path


def timm_resnet18(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet18", num_classes=10).eval()


def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def e2kd_logits(checkpoint: str) -> torch.Tensor:
    model = build_model("timm", {"arch": "resnet18"}, 10, checkpoint).eval()
    with torch.no_grad():
        return model(images())


def expected_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model((images() - MEAN) / STD)


def test_hf_hub_name_resolves_to_the_cached_snapshot_and_loads_its_weights(caches):
    source = timm_resnet18(1)
    path = hub_snapshot(caches, REPO, "a" * 40, source.state_dict())
    hub_snapshot(caches, REPO, "b" * 40, timm_resnet18(2).state_dict(), main=False)  # another revision
    found = resolve(f"hf-hub:{REPO}")
    assert found.path == path and found.revision == "a" * 40 and found.sha256 == file_sha256(path)
    assert torch.equal(e2kd_logits(f"hf-hub:{REPO}"), expected_logits(source))
    # a pinned revision, and timm's pretrained tag (whose hub repository is this one), resolve too
    assert resolve(f"hf-hub:{REPO}@{'b' * 40}").revision == "b" * 40
    assert not torch.equal(e2kd_logits(f"hf-hub:{REPO}@{'b' * 40}"), expected_logits(source))
    assert resolve("timm:resnet18.a1_in1k").path == path


def test_missing_names_are_one_line_naming_the_fetch_command(caches):
    with pytest.raises(WeightsNotCached) as caught:
        resolve(f"hf-hub:{REPO}")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"hf-hub:{REPO}: {REPO} (model.safetensors or pytorch_model.bin)")
    assert "downloads are off (HF_HUB_OFFLINE=1)" in message and f"`e2kd weights fetch hf-hub:{REPO}`" in message
    with pytest.raises(WeightsNotCached, match=r"^torchvision:ResNet18_Weights.IMAGENET1K_V1: resnet18-f37072fd.pth "):
        resolve("torchvision:ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(
        ModelError,
        match=r"^torchvision:ResNet18_Weight.IMAGENET1K_V1: torchvision has no weights .*did you mean 'ResNet18_Weights.IMAGENET1K_V1'\?$",
    ):
        resolve("torchvision:ResNet18_Weight.IMAGENET1K_V1")
    with pytest.raises(ModelError, match=r"^timm:resnet18.nope: timm has no pretrained weights of that name"):
        resolve("timm:resnet18.nope")
    with pytest.raises(
        ModelError, match=r"^bcos-v2:resnet_43: no B-cos-v2 release of that name; did you mean 'resnet_34'\?$"
    ):
        resolve("bcos-v2:resnet_43")
    with pytest.raises(
        ModelError, match=r"^nohub:x: unknown weight source 'nohub' \(known: bcos-v2, hf-hub, timm, torchvision;"
    ):
        resolve("nohub:x")


def test_torchvision_file_loads_into_the_timm_resnet(caches, monkeypatch):
    """The paper's teacher route: a torchvision ResNet state dict in torch.hub's folder, into timm's ResNet."""
    torch.manual_seed(3)
    source = torchvision.models.resnet18(num_classes=10).eval()
    path = hub_file(caches, "resnet18", source.state_dict())
    # torchvision's enum names a real file whose hash random weights cannot have: point it at this one
    weights = types.SimpleNamespace(url=f"https://download.pytorch.org/models/{path.name}")
    monkeypatch.setattr(torchvision.models, "get_weight", lambda name: weights)
    assert resolve("torchvision:ResNet18_Weights.IMAGENET1K_V1").path == path
    assert torch.equal(e2kd_logits("torchvision:ResNet18_Weights.IMAGENET1K_V1"), expected_logits(source))
    # not cached and downloads allowed: torch.hub fetches it into its folder
    data, fetched = path.read_bytes(), []
    path.unlink()

    def download(url, dst, progress):
        fetched.append(url)
        Path(dst).write_bytes(data)

    monkeypatch.setattr("torch.hub.download_url_to_file", download)
    assert resolve("torchvision:ResNet18_Weights.IMAGENET1K_V1", download=True).path == path
    assert fetched == [weights.url]


def test_a_file_whose_name_hash_is_wrong_is_refused_in_one_line(caches):
    folder = caches / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(timm_resnet18(0).state_dict(), folder / "resnet18-f37072fd.pth")  # torchvision's real name
    with pytest.raises(
        ModelError,
        match=r"^checkpoint .*resnet18-f37072fd.pth: its name says SHA-256 f37072fd…, the file's is [0-9a-f]{8}…; the download is incomplete or corrupt",
    ):
        resolve("torchvision:ResNet18_Weights.IMAGENET1K_V1")
    torch.save({}, folder / "resnet_34-a63425a03e.pth")
    with pytest.raises(ModelError, match=r"resnet_34-a63425a03e.pth: its name says SHA-256 a63425a03e…"):
        resolve("bcos-v2:resnet_34")


def test_bcos_release_name_loads_into_the_bcos_v2_builder(caches, monkeypatch):
    from e2kd_plugins.bcos import releases

    torch.manual_seed(4)
    source = build_model("bcos_v2_resnet18", {}, 10).eval()
    path = hub_file(caches, "resnet_18", source.state_dict())
    monkeypatch.setattr(releases, "RELEASE_FILES", (path.name, *releases.RELEASE_FILES[1:]))
    assert resolve("bcos-v2:resnet_18").path == path
    loaded = build_model("bcos_v2_resnet18", {}, 10, "bcos-v2:resnet_18").eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_fetch_locks_revision_and_hash_and_a_changed_cache_is_refused(caches):
    path = hub_snapshot(caches, REPO, "a" * 40, timm_resnet18(1).state_dict())
    [locked] = fetch([f"hf-hub:{REPO}"])
    assert read_lock()[f"hf-hub:{REPO}"] == {
        "revision": "a" * 40,
        "sha256": file_sha256(path),
        "origin": f"https://huggingface.co/{REPO}",
    }
    # main moves on: the locked name still resolves to the locked revision
    newer = hub_snapshot(caches, REPO, "c" * 40, timm_resnet18(2).state_dict())
    assert resolve(f"hf-hub:{REPO}").path == path and resolve(f"hf-hub:{REPO}", locked=False).path == newer
    # the locked file changed in the cache: one line, naming both hashes and the fix
    save_file({k: v.contiguous() for k, v in timm_resnet18(5).state_dict().items()}, path)
    with pytest.raises(ModelError) as caught:
        resolve(f"hf-hub:{REPO}")
    message = str(caught.value)
    assert "\n" not in message and f"has SHA-256 {file_sha256(path)[:12]}…, the lock file" in message
    assert f"says {locked.sha256[:12]}…; run `e2kd weights fetch hf-hub:{REPO}`" in message
    fetch([f"hf-hub:{REPO}"])  # re-fetching re-resolves main and rewrites the entry
    assert read_lock()[f"hf-hub:{REPO}"]["revision"] == "c" * 40


def test_a_damaged_lock_file_is_one_line(caches):
    (caches / "e2kd-weights.lock").write_text("{not json")
    with pytest.raises(ConfigError, match=r"e2kd-weights.lock: not an e2kd weights lock file \(delete it"):
        resolve(f"hf-hub:{REPO}")


def test_runs_record_the_resolved_weights_and_notice_a_changed_file(caches):
    path = hub_snapshot(caches, REPO, "a" * 40, timm_resnet18(1).state_dict())
    config = load_config_dict(
        {
            "data": {"name": "synthetic"},
            "model": {"name": "timm", "options": {"arch": "resnet18"}},
            "teacher": {"name": "timm", "options": {"arch": "resnet18"}, "checkpoint": f"hf-hub:{REPO}"},
            "distill": {},
        }
    )
    assert config.teacher.checkpoint == f"hf-hub:{REPO}" and config.teacher.checkpoint_path is None
    record = produced_by(config)
    sha = file_sha256(path)
    assert record["checkpoints"] == {"teacher": sha}
    assert record["weights"] == {
        "teacher": {
            "name": f"hf-hub:{REPO}",
            "revision": "a" * 40,
            "sha256": sha,
            "origin": f"https://huggingface.co/{REPO}",
        }
    }
    hub_snapshot(caches, REPO, "d" * 40, timm_resnet18(2).state_dict())  # main now names another file
    assert produced_by(config)["weights"]["teacher"]["revision"] == "d" * 40
    # a path stays a path (absolute), and runs without names record no weights section
    plain = load_config_dict({"model": {"name": "small_resnet", "checkpoint": "m.pt"}})
    assert isinstance(plain.model.checkpoint, Path) and plain.model.checkpoint.is_absolute()
    assert "weights" not in produced_by(plain)


def test_weight_names_are_told_from_paths():
    assert is_weight_name("hf-hub:timm/resnet34.tv_in1k") and is_weight_name("bcos-v2:resnet_34")
    for path in ("C:\\models\\r34.pth", "models/r34.pth", "https://x.org/r34.pth", "/abs/r:34.pth", "hf-hub: x"):
        assert not is_weight_name(path), path


def test_compare_tells_equal_tensors_in_other_formats_from_different_ones(tmp_path):
    state = timm_resnet18(1).state_dict()
    torch.save(state, tmp_path / "a.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "a.safetensors")
    same = compare(tmp_path / "a.pth", tmp_path / "a.safetensors")
    assert same["tensors"] == len(state) and same["max_abs_difference"] == 0 and not same["differing"]
    changed = dict(state, **{"fc.bias": state["fc.bias"] + torch.arange(10) * 0.5})
    del changed["fc.weight"]
    torch.save(changed, tmp_path / "b.pth")
    diff = compare(tmp_path / "a.pth", tmp_path / "b.pth")
    assert diff["differing"] == ["fc.bias"] and diff["max_abs_difference"] == pytest.approx(4.5)
    assert diff["only_first"] == ["fc.weight"] and diff["only_second"] == []


def test_cli_fetch_and_compare(caches, capsys):
    from e2kd.cli import main

    path = hub_snapshot(caches, REPO, "a" * 40, timm_resnet18(1).state_dict())
    lock = caches / "custom.lock"
    assert main(["weights", "fetch", f"hf-hub:{REPO}", "--lock", str(lock)]) == 0
    out = capsys.readouterr().out
    assert f"hf-hub:{REPO} @ {'a' * 40}: {path} (SHA-256 {file_sha256(path)[:12]}…)" in out
    assert json.loads(lock.read_text())["weights"][f"hf-hub:{REPO}"]["sha256"] == file_sha256(path)
    other = hub_snapshot(caches, "timm/resnet18.tv_in1k", "b" * 40, timm_resnet18(2).state_dict())
    assert main(["weights", "fetch", "hf-hub:timm/resnet18.tv_in1k", "--lock", str(lock)]) == 0  # added to it
    entries = json.loads(lock.read_text())["weights"]
    assert {k: v["sha256"] for k, v in entries.items()} == {
        f"hf-hub:{REPO}": file_sha256(path),
        "hf-hub:timm/resnet18.tv_in1k": file_sha256(other),
    }
    assert not (caches / "e2kd-weights.lock").exists()  # the default lock is not touched
    assert main(["weights", "fetch", "hf-hub:timm/missing"]) == 2
    assert capsys.readouterr().err.startswith("e2kd: error: hf-hub:timm/missing: timm/missing (model.safetensors")
    torch.save(timm_resnet18(1).state_dict(), caches / "a.pth")
    assert main(["weights", "compare", f"hf-hub:{REPO}", str(caches / "a.pth")]) == 0
    assert capsys.readouterr().out.startswith("equal: 122 shared tensors, largest difference 0")


def test_under_torchrun_the_main_process_resolves_weight_names_first(monkeypatch, tmp_path):
    import contextlib

    from e2kd import experiment

    events = []

    class Processes:
        world_size = 2

        @contextlib.contextmanager
        def main_first(self):
            events.append("main first")
            yield
            events.append("then the others")

    monkeypatch.setattr(experiment, "resolve_weights", events.append)
    config = load_config_dict(
        {
            "model": {"name": "small_resnet", "checkpoint": str(tmp_path / "start.pt")},  # a file: not resolved
            "teacher": {"name": "timm", "options": {"arch": "resnet18"}, "checkpoint": f"hf-hub:{REPO}"},
            "distill": {},
        }
    )
    experiment._weights_on_main_first(config, Processes())
    assert events == ["main first", f"hf-hub:{REPO}", "then the others"]
    Processes.world_size = 1
    experiment._weights_on_main_first(config, Processes())
    assert len(events) == 3  # one process: resolved where the models are built


def test_torch_hub_files_are_downloaded_when_allowed_and_fetched_again_when_damaged(caches, monkeypatch):
    import urllib.error

    import torch.hub

    from e2kd.weights import torch_hub_file

    state = timm_resnet18(6).state_dict()
    source = hub_file(caches / "elsewhere", "resnet18", state)  # a good file, named by its own hash
    url = f"https://example.org/weights/{source.name}"
    calls = []

    def download(url_, dst, progress):
        calls.append((url_, Path(dst).parent.is_dir(), progress))
        Path(dst).write_bytes(source.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    path = caches / "torch" / "hub" / "checkpoints" / source.name
    assert not path.parent.exists()
    with pytest.raises(WeightsNotCached, match=rf"^{source.name} is not in torch.hub's cache {path.parent}$"):
        torch_hub_file(url, download=False)
    found = torch_hub_file(url, download=True)
    assert (found.path, found.revision, found.origin) == (path, None, url) and calls == [(url, True, True)]
    assert torch_hub_file(url, download=True).path == path and len(calls) == 1  # cached: not downloaded again
    path.write_bytes(b"truncated")  # damaged: a download replaces it, the cache alone refuses it
    with pytest.raises(ModelError, match="the download is incomplete or corrupt"):
        torch_hub_file(url, download=False)
    torch_hub_file(url, download=True)
    assert path.read_bytes() == source.read_bytes() and len(calls) == 2
    path.unlink()

    def offline_download(url_, dst, progress):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline_download)
    with pytest.raises(WeightsNotCached, match=rf"^{url} could not be fetched \(<urlopen error no route to host>\)$"):
        torch_hub_file(url, download=True)


def test_a_failed_download_names_the_fetch_command(caches, monkeypatch):
    from e2kd_plugins.bcos import releases

    monkeypatch.delenv("HF_HUB_OFFLINE")
    seen = []

    def fail(url, *, download):
        seen.append(download)
        raise WeightsNotCached(f"{url} could not be fetched (offline)")

    monkeypatch.setattr(releases, "torch_hub_file", fail)
    with pytest.raises(WeightsNotCached) as caught:
        resolve("bcos-v2:resnet_34")
    assert str(caught.value) == (
        f"bcos-v2:resnet_34: {releases.RELEASE_URL}/resnet_34-a63425a03e.pth could not be fetched (offline); it could "
        "not be downloaded — run `e2kd weights fetch bcos-v2:resnet_34` on a machine with internet (sharing HF_HOME "
        "/ TORCH_HOME with this one)"
    )
    with pytest.raises(WeightsNotCached, match="; downloads are off"):
        resolve("bcos-v2:resnet_34", download=False)
    monkeypatch.setenv("E2KD_OFFLINE", " Yes ")
    with pytest.raises(WeightsNotCached, match="; downloads are off"):
        resolve("bcos-v2:resnet_34")
    assert seen == [True, False, False]
    with pytest.raises(ModelError, match=r"^'hf-hub: x' is not a weight name \(<source>:<spec>, e.g. hf-hub:timm/"):
        resolve("hf-hub: x")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"HF_HUB_CACHE": "~/hubcache", "HF_HOME": "/h"}, "~/hubcache"),
        ({"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}, "/h/hub"),
        ({"XDG_CACHE_HOME": "/x"}, "/x/huggingface/hub"),
        ({}, "~/.cache/huggingface/hub"),
    ],
)
def test_the_hub_cache_follows_huggingface_hubs_rule(monkeypatch, env, expected):
    from e2kd.weights import hf_hub_cache

    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert hf_hub_cache() == Path(expected).expanduser()


def test_hub_answers_become_one_line_errors_and_fallbacks(caches, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from e2kd.weights import hf_hub_file

    calls, answers = [], {}

    def download(repo_id, filename, *, revision, cache_dir, local_files_only):
        calls.append((filename, revision, local_files_only))
        answer = answers[filename]
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    bin_file = str(caches / "snap" / ("e" * 40) / "pytorch_model.bin")
    for first in (LocalEntryNotFoundError("no"), EntryNotFoundError("no")):  # not cached / not in the repo
        answers.update({"model.safetensors": first, "pytorch_model.bin": bin_file})
        found = hf_hub_file(REPO, revision="v1", download=True)
        assert (str(found.path), found.revision) == (bin_file, "e" * 40)
    assert calls[-2:] == [("model.safetensors", "v1", False), ("pytorch_model.bin", "v1", False)]
    hf_hub_file(REPO, revision=None, download=False)
    assert calls[-1] == ("pytorch_model.bin", None, True)
    answers["pytorch_model.bin"] = LocalEntryNotFoundError("no")
    with pytest.raises(WeightsNotCached, match=rf"^{REPO}@v1 \(model.safetensors or pytorch_model.bin\) is not in"):
        hf_hub_file(REPO, revision="v1", download=True)
    import httpx

    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/x"))
    for error, message in (
        (
            RepositoryNotFoundError("x", response=response),
            rf"^hf-hub:{REPO}: no such repository on the hub \(or it is private: `hf auth login`\)$",
        ),
        (RevisionNotFoundError("x", response=response), rf"^hf-hub:{REPO}: the hub has no revision 'v9'$"),
        (HFValidationError("bad id"), rf"^hf-hub:{REPO}: not a hub repository id \(bad id\)$"),
    ):
        answers["model.safetensors"] = error
        with pytest.raises(ModelError, match=message):
            hf_hub_file(REPO, revision="v9", download=True)


def test_lock_file_content_and_comparisons_at_the_edges(caches, tmp_path):
    path = hub_snapshot(caches, REPO, "a" * 40, timm_resnet18(1).state_dict())
    fetch([f"hf-hub:{REPO}"])
    assert json.loads((caches / "e2kd-weights.lock").read_text()) == {
        "version": 1,
        "weights": {
            f"hf-hub:{REPO}": {
                "revision": "a" * 40,
                "sha256": file_sha256(path),
                "origin": f"https://huggingface.co/{REPO}",
            }
        },
    }
    torch.save({"empty": torch.zeros(0), "w": torch.zeros(3)}, tmp_path / "a.pth")
    torch.save({"empty": torch.zeros(0), "w": torch.tensor([0.0, 0.25, 0.0])}, tmp_path / "b.pth")
    result = compare(tmp_path / "a.pth", tmp_path / "b.pth")
    assert result["differing"] == ["w"] and result["max_abs_difference"] == 0.25  # an empty tensor differs by 0
    torch.save({"other": torch.zeros(2)}, tmp_path / "c.pth")
    assert compare(tmp_path / "a.pth", tmp_path / "c.pth")["max_abs_difference"] == 0.0  # nothing shared


def test_sources_pass_the_revision_and_the_download_permission_on(caches, monkeypatch):
    """hf-hub and timm names reach the hub with the locked or pinned revision, the tag's file name, and
    whether a download is allowed; a repository id without an owner is one line."""
    import huggingface_hub

    calls = []

    def download(repo_id, filename, *, revision, cache_dir, local_files_only):
        calls.append((repo_id, filename, revision, local_files_only))
        return str(caches / "snapshots" / "c0ffee" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    resolve_file = lambda name, **kw: resolve(name, **kw).path  # noqa: E731
    monkeypatch.setattr("e2kd.weights.cached_file_sha256", lambda path: "0" * 64)
    resolve_file(f"hf-hub:{REPO}@v2", download=True)
    resolve_file("timm:resnet18.a1_in1k", download=False)
    resolve_file("timm:resnet18.a1_in1k", download=True)
    assert calls == [
        (REPO, "model.safetensors", "v2", False),
        (REPO, "model.safetensors", None, True),
        (REPO, "model.safetensors", None, False),
    ]
    # the few tags timm loads from a URL are kept in torch.hub's folder
    with pytest.raises(
        WeightsNotCached,
        match=r"^timm:vit_huge_patch16_gap_448.in1k_ijepa: IN1K-vit.h.16-448px-300e.pth.tar is not in torch.hub's cache",
    ):
        resolve("timm:vit_huge_patch16_gap_448.in1k_ijepa", download=False)
    import torch.hub

    fetched = []

    def download(url, dst, progress):
        fetched.append(url)
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    found = resolve("timm:vit_huge_patch16_gap_448.in1k_ijepa", download=True)
    assert fetched == ["https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.16-448px-300e.pth.tar"]
    assert found.path.read_bytes() == b"weights" and found.origin == fetched[0]
    (caches / "e2kd-weights.lock").write_text(
        json.dumps({"weights": {"timm:resnet18.a1_in1k": {"revision": "locked", "sha256": "0" * 64}}})
    )
    resolve_file("timm:resnet18.a1_in1k")
    assert calls[-1] == (REPO, "model.safetensors", "locked", True)
    with pytest.raises(ModelError, match=r"^hf-hub:resnet18: give the repository as ORG/NAME \(e.g. hf-hub:timm/"):
        resolve("hf-hub:resnet18")


def test_unknown_names_without_a_close_match_end_the_line_cleanly(caches):
    with pytest.raises(ModelError) as caught:
        resolve("torchvision:Nothing.LIKE_IT")
    assert str(caught.value).endswith("(ENUM.MEMBER, e.g. ResNet34_Weights.IMAGENET1K_V1)")
    with pytest.raises(ModelError) as caught:
        resolve("bcos-v2:zzz")
    assert str(caught.value) == f"bcos-v2:zzz: no B-cos-v2 release of that name (known: {', '.join(_releases())})"


def _releases() -> list[str]:
    from e2kd_plugins.bcos.releases import release_files

    return list(release_files())


def test_weights_list_prints_the_names_a_source_knows(capsys):
    from e2kd.cli import main

    assert main(["weights", "list", "bcos-v2", "hf-hub"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [f"bcos-v2:{n}" for n in _releases()] and "bcos-v2:resnet_34" in printed
    assert "bcos-v2:densenet_121_long" in printed and len(printed) == 26
    assert main(["weights", "list", "torchvision"]) == 0
    assert "torchvision:ResNet34_Weights.IMAGENET1K_V1" in capsys.readouterr().out.split()
    assert main(["weights", "list", "torchvisio"]) == 2
    assert capsys.readouterr().err.startswith("e2kd: error: unknown weight source 'torchvisio' (known: bcos-v2,")
