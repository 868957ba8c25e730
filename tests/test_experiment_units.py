"""The recipes of ``e2kd.experiment`` in-process, the training loop replaced by a recorder: the settings
each recipe hands the loop, the loss its step computes (against the same loss written out by hand or
built directly), its refusals before anything is written, the frozen-teacher cache it opens, reuses or
rebuilds, and what a finished run leaves behind."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from e2kd import experiment, mixup
from e2kd.config import load_config_dict
from e2kd.data import dataset_of, split_view
from e2kd.distill import Distiller
from e2kd.errors import ConfigError, StaleCacheError
from e2kd.frozen import fingerprint_hash
from e2kd.guidance import AnnotatedSamples, Guidance
from e2kd.models import build_from
from e2kd.plan import plan_run
from e2kd.registry import create
from e2kd.runtime import Runtime
from e2kd.train import make_optimizer, make_schedule

from .test_sweep_units import BASE

HISTORY = [{"epoch": 1, "loss": 1.5}]


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) and key != "options" else value
    return out


def _config(tmp_path, **sections):
    data = _merge({**BASE, "out_dir": str(tmp_path / "run")}, sections)
    return load_config_dict(data, source="exp.yaml")


@pytest.fixture
def loop(monkeypatch):
    """Replace the training loop by a recorder of what it was given (and the model's weights and
    the torch RNG as it received them); it "trains" by adding seeded noise to every weight."""
    calls = []

    def recording_fit(model, step, data, **kwargs):
        kwargs["tracking"].start()  # as fit does
        calls.append(
            SimpleNamespace(
                model=model,
                step=step,
                data=data,
                rng=torch.get_rng_state(),
                initial={k: v.clone() for k, v in model.state_dict().items()},
                **kwargs,
            )
        )
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        return HISTORY

    monkeypatch.setattr(experiment, "fit", recording_fit)
    return calls


class _Wrapped(nn.Module):
    """What the recording runtime's ``ddp`` hands back: the model, counting the forwards through it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.module(x)


@dataclass
class RecordingRuntime(Runtime):
    """A CPU runtime that records the models it wraps for training and whose buffers it syncs."""

    wrapped: list = field(default_factory=list)
    synced: list = field(default_factory=list)

    def ddp(self, model):
        self.wrapped.append(_Wrapped(model))
        return self.wrapped[-1]

    def sync_buffers(self, model):
        self.synced.append(model)


class _Runtimes(list):
    rank = 0  # the rank of the runtimes made from now on


@pytest.fixture
def runtimes(monkeypatch):
    """Every runtime the recipes ask ``runtime_of`` for, in order."""
    made = _Runtimes()
    monkeypatch.setattr(
        experiment,
        "runtime_of",
        lambda config: made.append(RecordingRuntime(torch.device("cpu"), rank=made.rank)) or made[-1],
    )
    return made


def _batch(dataset, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, dataset.image_size, dataset.image_size, generator=g)
    return {"image": images, "label": torch.tensor([0, 2, 1, 2][:n])}


@pytest.fixture
def evaluations(monkeypatch):
    """Record what each evaluation was given (then evaluate)."""
    seen = []
    real = experiment.evaluate_model

    def recording(plan, model, teacher, *, runtime, samples_of):
        seen.append(SimpleNamespace(plan=plan, model=model, teacher=teacher, runtime=runtime, samples_of=samples_of))
        return real(plan, model, teacher, runtime=runtime, samples_of=samples_of)

    monkeypatch.setattr(experiment, "evaluate_model", recording)
    return seen


@pytest.fixture
def builds(monkeypatch):
    """Record the keyword arguments of every frozen-cache build (then build)."""
    seen = []
    real = experiment.build_cache
    monkeypatch.setattr(experiment, "build_cache", lambda *a, **k: (seen.append(k), real(*a, **k))[1])
    return seen


@pytest.fixture
def teacher_file(tmp_path):
    """A teacher checkpoint (random weights, seed 11) beside which the frozen cache is made."""

    def write(config_data=None):
        config = _config(tmp_path, **(config_data or {}))
        torch.manual_seed(11)
        model = build_from(config.model, dataset_of(config), None)
        path = tmp_path / "teacher" / "model.pt"
        path.parent.mkdir(exist_ok=True)
        torch.save(model.state_dict(), path)
        return path

    return write


def _student_config(tmp_path, teacher, **sections):
    return _config(
        tmp_path, teacher={"name": "small_resnet", "options": {"widths": [4]}, "checkpoint": str(teacher)}, **sections
    )


# -- train_teacher ------------------------------------------------------------------------------------------------------

TEACHER_TRAIN = {
    "epochs": 3,
    "batch_size": 2,
    "lr": 0.05,
    "weight_decay": 0.01,
    "optimizer": "sgd",
    "schedule": "cosine",
    "warmup_epochs": 1,
    "checkpoint_every": 2,
    "augment": "flip",
    "color_jitter": 0.2,
}


def test_teacher_settings_reach_the_loop_and_the_trained_model_is_saved_and_evaluated(
    tmp_path, loop, runtimes, evaluations
):
    config = _config(tmp_path, seed=5, train=TEACHER_TRAIN, data={"num_workers": 1})
    results = experiment.train_teacher(config)
    (call,), (runtime,) = loop, runtimes
    out = tmp_path / "run"
    assert (call.epochs, call.batch_size, call.seed, call.num_workers, call.checkpoint_every) == (3, 2, 5, 1, 2)
    assert (call.checkpoint, call.tracking.folder, call.progress, call.desc) == (
        out / "checkpoint.pt",
        out,
        False,
        "teacher run",
    )
    assert [t.name for t in call.tracking.trackers] == ["csv"] and call.tracking.started == []  # started, closed
    assert call.runtime is runtime and runtime.synced == [call.model]
    assert [(e.model, e.teacher, e.runtime) for e in evaluations] == [(call.model, None, runtime)]
    assert evaluations[0].samples_of is None  # (data.cache: none: the dataset's own samples)

    made, by_hand = (
        call.optimizer_fn([nn.Parameter(torch.zeros(2))]),
        make_optimizer([nn.Parameter(torch.zeros(2))], "sgd", 0.05, 0.01),
    )
    assert type(made) is type(by_hand)
    assert [{k: v for k, v in g.items() if k != "params"} for g in made.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in by_hand.param_groups
    ]
    lrs = []
    for scheduler, optimizer in (
        (call.scheduler_fn(made, 31), made),
        (make_schedule(by_hand, "cosine", 31, 10), by_hand),
    ):
        lrs.append([])
        for _ in range(31):  # warm-up over the first epoch: 31 steps in 3 epochs, 10 whole steps each
            lrs[-1].append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    assert lrs[0] == lrs[1] and lrs[0][0] < lrs[0][10] == pytest.approx(0.05)

    dataset = dataset_of(config)
    view = split_view(dataset, "train", "train", augment="flip", color_jitter=0.2)
    assert len(call.data) == 6 and repr(call.data.transform.geometry) == repr(view.transform.geometry)
    assert repr(call.data.transform.colour) == repr(view.transform.colour)

    torch.manual_seed(5)  # the model starts from config.seed
    fresh = build_from(config.model, dataset, None).state_dict()
    assert all(torch.equal(call.initial[k], fresh[k]) for k in fresh)
    saved, trained = torch.load(out / "model.pt"), call.model.state_dict()  # the trained model
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    assert not torch.equal(saved["stem.0.weight"], call.initial["stem.0.weight"])
    written = json.loads((out / "metrics.json").read_text())
    assert written == json.loads(json.dumps(results)) and results["history"] == HISTORY
    assert set(results["splits"]) == set(dataset.eval_splits()) and results.get("skipped", {}) == {}
    for split, values in results["splits"].items():
        with torch.no_grad():
            images, labels = zip(*[(s["image"], s["label"]) for s in split_view(dataset, split, "eval")])
            want = (call.model.eval()(torch.stack(images)).argmax(1) == torch.tensor(labels)).float().mean().item()
        assert values["accuracy"] == pytest.approx(want)


def test_the_teacher_step_is_the_label_loss_through_the_training_wrapper(tmp_path, loop, runtimes):
    config = _config(tmp_path)
    experiment.train_teacher(config)
    model, batch = loop[0].model.eval(), _batch(dataset_of(config))
    terms = loop[0].step(batch, 0)
    assert set(terms) == {"loss"}
    (wrapped,) = runtimes[0].wrapped
    assert wrapped.module is model and wrapped.calls == 1  # gradients averaged over processes
    assert terms["loss"].item() == pytest.approx(
        F.cross_entropy(model(batch["image"]), batch["label"]).item(), rel=1e-6
    )


def test_the_mixup_step_mixes_images_and_labels_with_the_steps_draw(tmp_path, loop):
    config = _config(tmp_path, train={"mixup": 0.4})
    experiment.train_teacher(config)
    model, batch = loop[0].model.eval(), _batch(dataset_of(config))
    lam, perm = mixup.draw(0.4, 4, 0, 3)
    assert perm.tolist() != [0, 1, 2, 3] and 0 < lam < 1
    logits = model(lam * batch["image"] + (1 - lam) * batch["image"][perm])
    want = lam * F.cross_entropy(logits, batch["label"]) + (1 - lam) * F.cross_entropy(logits, batch["label"][perm])
    assert loop[0].step(batch, 3)["loss"].item() == pytest.approx(want.item(), rel=1e-6)


def test_the_guided_step_adds_the_weighted_guidance_term(tmp_path, loop):
    guidance = {"weight": 2.5, "loss": "l1", "annotated_fraction": 0.5}
    config = _config(tmp_path, seed=3, train={"guidance": guidance})
    experiment.train_teacher(config)
    call, dataset = loop[0], dataset_of(config)
    assert isinstance(call.data.samples, AnnotatedSamples)
    assert call.data.samples.annotated == AnnotatedSamples(dataset.samples("train"), 0.5, 3).annotated
    assert len(call.data.samples.annotated) == 3
    model, batch = call.model.eval(), _batch(dataset)
    masks = torch.zeros(4, 1, 16, 16)
    masks[:, :, :8, 2:9] = 1
    batch |= {"mask": masks, "annotated": torch.tensor([True, False, True, True])}
    terms = call.step(batch, 0)
    logits, term = Guidance(create("explainer", "gradcam"), "l1")(
        model, model, batch["image"], batch["label"], masks, batch["annotated"]
    )
    ce = F.cross_entropy(logits, batch["label"])
    assert set(terms) == {"loss", "ce", "guidance"} and term.item() > 0
    assert terms["guidance"].item() == pytest.approx(term.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(ce.item() + 2.5 * term.item(), rel=1e-5)


@pytest.mark.parametrize(
    "train, message",
    [
        (
            {"mixup": 0.2, "guidance": {}},
            "exp.yaml: train.mixup: mixed images have no boxes to guide towards; use either "
            "train.mixup or train.guidance",
        ),
        (
            {"guidance": {"explainer": {"name": "gradcam", "options": {"layer": "nowhere"}}}},
            "exp.yaml: train.guidance.explainer: gradcam: model SmallResNet has no layer 'nowhere'",
        ),
    ],
)
def test_teacher_refusals_come_before_the_run_directory(tmp_path, loop, train, message):
    with pytest.raises(ConfigError) as error:
        experiment.train_teacher(_config(tmp_path, train=train))
    assert str(error.value).startswith(message)
    assert not (tmp_path / "run").exists() and loop == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"train": {"guidance": {}}},
            "exp.yaml: train.guidance guides a model trained on labels (train-teacher); "
            "distill's explanation term is distill.lam",
        ),
        (
            {"train": {"mixup": 0.2}, "distill": {"teacher_mode": "frozen"}},
            "exp.yaml: train.mixup: a frozen teacher's outputs are stored for unmixed images; mixup needs teacher_mode: live "
            "(the teacher sees the same mixed image)",
        ),
        (
            {"train": {"mixup": 0.2}, "distill": {"ce_weight": 0.1}},
            "exp.yaml: train.mixup: a mixed image has two labels; distil with distill.ce_weight: 0 and explain_classes other "
            "than label",
        ),
        (
            {"train": {"mixup": 0.2}, "distill": {"explain_classes": "label"}},
            "exp.yaml: train.mixup: a mixed image has two labels; distil with distill.ce_weight: 0 and explain_classes other "
            "than label",
        ),
    ],
)
def test_distill_refusals_come_before_anything_is_loaded(tmp_path, loop, extra, message):
    config = _student_config(tmp_path, tmp_path / "no-teacher.pt", **extra)  # the teacher file is never read
    with pytest.raises(ConfigError) as error:
        experiment.distill(config)
    assert str(error.value) == message and not (tmp_path / "run").exists() and loop == []


# -- distill: the step, live and frozen -------------------------------------------------------------------------------


def _hand_built(config, teacher, student, **changes):
    d = config.distill
    return Distiller(
        teacher,
        student,
        explainer=create("explainer", "gradcam"),
        similarity=create("similarity", "cosine"),
        temperature=d.temperature,
        lam=d.lam,
        explain_every=d.explain_every,
        **changes,
    )


def test_the_live_step_is_the_distillers_loss_at_that_step_and_the_teacher_is_evaluated(
    tmp_path, loop, teacher_file, runtimes, evaluations
):
    config = _student_config(
        tmp_path,
        teacher_file(),
        seed=4,
        distill={"temperature": 2.0, "lam": 3.0, "explain_every": 2, "ce_weight": 0.5},
        eval={"metrics": ["accuracy", "agreement"]},
    )
    results = experiment.distill(config)
    (call,), (runtime,), dataset = loop, runtimes, dataset_of(config)
    assert call.desc == "distill run" and call.epochs == 1 and call.runtime is runtime
    assert results["history"] == HISTORY and runtime.synced == [call.model]
    assert [(e.model, e.runtime) for e in evaluations] == [(call.model, runtime)]
    evaluated_teacher = evaluations[0].teacher.state_dict()  # the teacher of the file, evaluated alongside
    assert all(torch.equal(evaluated_teacher[k], v) for k, v in torch.load(teacher_file()).items())
    assert not list(tmp_path.rglob("teacher-cache-*"))  # a live teacher needs no cache
    torch.manual_seed(4)
    fresh = build_from(config.model, dataset, None)
    assert all(torch.equal(call.initial[k], v) for k, v in fresh.state_dict().items())
    assert torch.equal(call.rng, torch.get_rng_state())  # training draws right after the student is built

    teacher = build_from(config.teacher, dataset, None)
    teacher.load_state_dict(torch.load(teacher_file()))
    student, batch = call.model.eval(), _batch(dataset)
    reference = _hand_built(config, teacher, student, ce_weight=0.5)
    for index in (0, 1):  # explained on even steps only
        terms, want = call.step(batch, index), reference(batch["image"], batch["label"], step=index)
        assert set(terms) == set(want) and (terms["explanation"] > 0) == (index == 0) and terms["ce"] > 0
        assert all(torch.allclose(terms[k], want[k], rtol=1e-5, atol=1e-7) for k in want)
    (wrapped,) = runtime.wrapped
    assert wrapped.module is student and wrapped.calls == 2  # the student runs through the training wrapper

    assert results.get("skipped", {}) == {}
    for split, values in results["splits"].items():
        images = torch.stack([s["image"] for s in split_view(dataset, split, "eval")])
        with torch.no_grad():
            same = (teacher.eval()(images).argmax(1) == student(images).argmax(1)).float().mean().item()
        assert values["agreement"] == pytest.approx(same)


def test_the_mixed_step_shows_teacher_and_student_the_same_mixed_images(tmp_path, loop, teacher_file):
    config = _student_config(tmp_path, teacher_file(), train={"mixup": 0.4}, distill={"lam": 1.0})
    experiment.distill(config)
    call, dataset = loop[0], dataset_of(config)
    teacher = build_from(config.teacher, dataset, None)
    teacher.load_state_dict(torch.load(teacher_file()))
    batch = _batch(dataset)
    lam, perm = mixup.draw(0.4, 4, 0, 5)
    mixed = lam * batch["image"] + (1 - lam) * batch["image"][perm]
    want = _hand_built(config, teacher, call.model.eval())(mixed, batch["label"], step=5)
    terms = call.step(batch, 5)
    assert all(torch.allclose(terms[k], want[k], rtol=1e-5, atol=1e-7) for k in want)


def test_the_frozen_step_replays_the_cached_teacher(tmp_path, loop, teacher_file):
    config = _student_config(tmp_path, teacher_file(), seed=2, distill={"teacher_mode": "frozen", "lam": 2.0})
    experiment.distill(config)
    call, dataset = loop[0], dataset_of(config)
    torch.manual_seed(2)
    build_from(config.model, dataset, None)
    assert torch.equal(call.rng, torch.get_rng_state())  # building the cache drew nothing training would see

    caches = list((tmp_path / "teacher").glob("teacher-cache-*"))
    assert len(caches) == 1 and len(caches[0].name) == len("teacher-cache-") + 12
    items = [call.data[i] for i in range(4)]
    batch = {
        k: torch.stack([torch.as_tensor(item[k]) for item in items])
        for k in ("image", "label", "teacher_logits", "teacher_map")
    }
    teacher = build_from(config.teacher, dataset, None)
    teacher.load_state_dict(torch.load(teacher_file()))
    whole = torch.stack([split_view(dataset, "train", "whole")[i]["image"] for i in range(4)])
    with torch.no_grad():  # the cache holds the teacher's outputs (fp16) for the whole training images
        assert torch.allclose(batch["teacher_logits"].float(), teacher.eval()(whole), atol=1e-2)
    student = call.model.eval()
    terms = call.step(batch, 0)
    want = _hand_built(config, None, student)(
        batch["image"],
        batch["label"],
        step=0,
        teacher_logits=batch["teacher_logits"],
        teacher_maps=batch["teacher_map"],
    )
    assert set(terms) == set(want) and terms["explanation"] > 0
    assert all(torch.allclose(terms[k], want[k], rtol=1e-5, atol=1e-7) for k in want)


# -- the frozen-teacher cache ------------------------------------------------------------------------------------------


def test_the_cache_is_built_once_reused_rebuilt_when_damaged_or_forced_and_refused_when_stale(
    tmp_path, monkeypatch, teacher_file
):
    builds = []
    real_build = experiment.build_cache
    monkeypatch.setattr(experiment, "build_cache", lambda *a, **k: (builds.append(k["force"]), real_build(*a, **k))[1])
    config = _student_config(
        tmp_path,
        teacher_file(),
        distill={"teacher_mode": "frozen", "shard_size": 4, "cache_dir": str(tmp_path / "cache")},
    )
    plan = plan_run(config, "distill")
    teacher = build_from(config.teacher, plan.dataset, None)
    first = experiment.prepare_cache(plan, teacher)
    assert first.root == tmp_path / "cache" and len(first) == 6 and builds == [False]
    assert experiment.prepare_cache(plan, teacher).root == first.root and builds == [False]
    shards = sorted((tmp_path / "cache").glob("shard-*.maps.npy"))
    assert len(shards) == 2
    shards[1].unlink()
    experiment.prepare_cache(plan, teacher)
    assert builds == [False, False]
    experiment.prepare_cache(plan, teacher, force=True)
    assert builds == [False, False, True]
    other = config.model_copy(update={"distill": config.distill.model_copy(update={"cache_dtype": "float32"})})
    with pytest.raises(StaleCacheError):
        experiment.prepare_cache(plan_run(other, "distill"), teacher)
    assert len(builds) == 3


def test_precompute_caches_the_teacher_of_the_file_under_a_name_from_its_fingerprint(
    tmp_path, teacher_file, builds, runtimes
):
    path = teacher_file()
    config = _student_config(
        tmp_path, path, data={"num_workers": 1}, distill={"teacher_mode": "frozen", "cache_dtype": "float32"}
    )
    cache = experiment.precompute(config)
    dataset = dataset_of(config)
    fp = cache.index["fingerprint"]
    assert cache.root == path.parent / f"teacher-cache-{fingerprint_hash(fp)[:12]}" and len(cache) == 6
    assert fp["dataset"] == {**dataset.identity("train"), "view": "whole", "image_size": 16}
    teacher = build_from(config.teacher, dataset, None)
    teacher.load_state_dict(torch.load(path))
    whole = torch.stack([split_view(dataset, "train", "whole")[i]["image"] for i in range(6)])
    with torch.no_grad():  # the file's teacher, stored in float32 as asked
        assert torch.allclose(torch.stack([cache[i][0] for i in range(6)]), teacher.eval()(whole), atol=1e-6)
    assert {k: fp["teacher"][k] for k in ("name", "options")} == {"name": "small_resnet", "options": {"widths": [4]}}
    assert cache.index["dtype"] == "float32"
    (built,) = builds
    assert (built["dtype"], built["shard_size"], built["batch_size"], built["num_workers"], built["force"]) == (
        "float32",
        512,
        4,
        1,
        False,
    )
    assert built["runtime"] is runtimes[0] and built["progress"] is False
    experiment.precompute(config)
    assert len(builds) == 1  # reused
    experiment.precompute(config, force=True)
    assert len(builds) == 2 and builds[1]["force"] is True


def test_a_frozen_distillation_builds_the_cache_with_the_runs_runtime(tmp_path, loop, teacher_file, builds, runtimes):
    config = _student_config(tmp_path, teacher_file(), distill={"teacher_mode": "frozen"})
    experiment.distill(config)
    assert len(runtimes) == 1 and builds[0]["runtime"] is runtimes[0] is loop[0].runtime


@pytest.mark.parametrize("recipe", ["train_teacher", "distill"])
def test_a_finished_run_is_reused_and_rerun_trains_again_from_scratch(
    tmp_path, loop, teacher_file, recipe, monkeypatch
):
    config = _student_config(tmp_path, teacher_file())
    first = getattr(experiment, recipe)(config)
    assert len(loop) == 1
    assert getattr(experiment, recipe)(config) == json.loads(json.dumps(first)) and len(loop) == 1
    seen, recording = [], experiment.fit
    monkeypatch.setattr(
        experiment,
        "fit",
        lambda *a, **k: (seen.append((tmp_path / "run" / "model.pt").exists()), recording(*a, **k))[1],
    )
    getattr(experiment, recipe)(config, rerun=True)
    assert len(loop) == 2 and seen == [False]  # the earlier results were removed before training


@pytest.mark.parametrize("recipe", ["train_teacher", "distill"])
def test_the_trained_model_starts_from_its_checkpoint(tmp_path, loop, teacher_file, recipe):
    start = build_from(_config(tmp_path).model, dataset_of(_config(tmp_path)), None).state_dict()
    start = {k: v + 0.5 if v.is_floating_point() else v for k, v in start.items()}
    torch.save(start, tmp_path / "start.pt")
    config = _student_config(tmp_path, teacher_file(), model={"checkpoint": str(tmp_path / "start.pt")})
    getattr(experiment, recipe)(config)
    assert all(torch.equal(loop[0].initial[k], v) for k, v in start.items())


def test_another_process_trains_but_writes_nothing(tmp_path, loop, runtimes, evaluations):
    runtimes.rank = 1
    config = _config(tmp_path)
    results = experiment.train_teacher(config)
    assert not (tmp_path / "run").exists()  # the main process makes it
    assert loop[0].tracking.folder is None and loop[0].tracking.trackers == []  # and logs
    assert results["history"] == HISTORY and runtimes[0].synced == [loop[0].model] and len(evaluations) == 1


def test_multi_label_data_distils_with_the_binary_kd_term(tmp_path, loop, teacher_file, monkeypatch):
    config = _student_config(tmp_path, teacher_file(), distill={"explain_classes": "top1"})
    dataset = dataset_of(config)
    monkeypatch.setattr(type(dataset), "label_type", "multi")
    monkeypatch.setattr(experiment, "evaluate_model", lambda *a, **k: {"splits": {}})
    experiment.distill(config)
    teacher = build_from(config.teacher, dataset, None)
    teacher.load_state_dict(torch.load(teacher_file()))
    student, batch = loop[0].model.eval(), _batch(dataset)
    terms = loop[0].step(batch, 0)
    want = _hand_built(config, teacher, student, kd="binary")(batch["image"], batch["label"], step=0)
    softmax = _hand_built(config, teacher, student, kd="softmax")(batch["image"], batch["label"], step=0)
    assert torch.allclose(terms["kd"], want["kd"]) and not torch.allclose(terms["kd"], softmax["kd"])


@pytest.mark.parametrize("mode", ["live", "frozen"])
def test_a_distillation_builds_each_item_once_and_checks_each_model_once(
    tmp_path, loop, teacher_file, mode, monkeypatch
):
    from collections import Counter

    from e2kd import registry
    from e2kd_plugins.explainers.gradcam import GradCAM

    config = _student_config(tmp_path, teacher_file(), distill={"teacher_mode": mode}, eval={"metrics": ["accuracy"]})
    created, checked = Counter(), []
    real_create, real_check = registry.registry().create, GradCAM.check_model
    monkeypatch.setattr(
        registry.registry(), "create", lambda k, n, o=None: (created.update([(k, n)]), real_create(k, n, o))[1]
    )
    monkeypatch.setattr(GradCAM, "check_model", lambda self, m: (checked.append(m), real_check(self, m))[1])
    experiment.distill(config)
    assert created == {
        ("dataset", "synthetic"): 1,
        ("model", "small_resnet"): 2,  # the teacher and the student
        ("explainer", "gradcam"): 1,
        ("similarity", "cosine"): 1,
        ("metric", "accuracy"): 1,
        ("tracker", "csv"): 1,
    }
    # the teacher and the student, once each
    student = [m for m in checked if m is loop[0].model]
    teacher = [m for m in checked if m is not loop[0].model]
    assert len(student) == 1 and len(teacher) == 1
    assert all(torch.equal(teacher[0].state_dict()[k], v) for k, v in torch.load(teacher_file()).items())


def test_a_frozen_teacher_the_explainer_cannot_explain_is_refused_before_the_cache(tmp_path, builds):
    config = _student_config(
        tmp_path,
        tmp_path / "unused.pt",
        distill={"teacher_mode": "frozen", "explainer": {"name": "gradcam", "options": {"layer": "stages.1"}}},
    )
    plan = plan_run(config, "distill")
    teacher = build_from(config.teacher, plan.dataset, None)  # one stage: no stages.1
    with pytest.raises(ConfigError) as error:
        experiment.prepare_cache(plan, teacher)
    assert str(error.value).startswith(
        "exp.yaml: distill.explainer: the teacher does not fit: gradcam: model SmallResNet has no layer 'stages.1'"
    )
    assert builds == [] and not list(tmp_path.rglob("teacher-cache-*"))


def test_the_cache_records_the_precision_the_teacher_ran_at(tmp_path, teacher_file):
    config = _student_config(tmp_path, teacher_file(), train={"precision": "bf16"}, distill={"teacher_mode": "frozen"})
    cache = experiment.precompute(config)
    assert cache.index["fingerprint"]["preprocessing"]["precision"] == "bf16"


def _folder_plan(tmp_path, **data):
    """A plan over a tiny JPEG folder (2 classes, 3 training images each), image size 16, seed 7."""
    from e2kd.data.miniature import write_image_folder

    root = tmp_path / "imgs"
    if not root.is_dir():
        write_image_folder(root, ["a", "b"], {"train": 3, "val": 1})
    config = _config(
        tmp_path,
        seed=7,
        data={"name": "image_folder", "options": {"root": str(root), "image_size": 16}, **data},
        train={"color_jitter": 0.2},
    )
    return plan_run(config, "train-teacher")


def test_the_view_runs_per_batch_from_a_cache_or_device_decoding_and_per_item_otherwise(tmp_path):
    from e2kd.data.batch_views import DeviceView

    plan = _folder_plan(tmp_path)
    plain = _folder_plan(tmp_path)
    plain.config.train.color_jitter = 0.0
    items = experiment.train_view(plain)  # per item in the loader workers, uint8 until the device
    assert not isinstance(items, DeviceView) and items[0]["image"].dtype == torch.uint8
    assert experiment.train_view(plan)[0]["image"].dtype == torch.float32  # (colour jitter works in float)
    cached = SimpleNamespace(samples=lambda: "the cache's samples")
    view = experiment.train_view(plan, decoded=cached)
    assert isinstance(view, DeviceView) and view.samples == "the cache's samples" and not view.encoded
    assert (view.kind, view.image_size, view.color_jitter, view.num_classes, view.seed) == (
        plan.dataset.default_augment,
        16,
        0.2,
        2,
        7,
    )
    files = experiment.train_view(_folder_plan(tmp_path, decode="device"))
    assert isinstance(files, DeviceView) and files.encoded and len(files) == 6
    assert files.samples[0]["image"].dim() == 1  # the file's bytes
    flipped = _folder_plan(tmp_path)
    flipped.config.train.augment = "flip"
    assert experiment.train_view(flipped, decoded=cached).kind == "flip"


def test_decoded_caches_are_prepared_with_the_runs_runtime_force_and_progress(tmp_path, monkeypatch):
    from e2kd.data.decoded import decoded_fingerprint, default_root

    plan = _folder_plan(tmp_path, cache="decoded", cache_dir=str(tmp_path / "cache"))
    built, opened = [], []
    monkeypatch.setattr(experiment, "build_decoded", lambda root, samples, fp, **kw: built.append((root, fp, kw)))
    monkeypatch.setattr(
        experiment.DecodedCache, "open", lambda root, fp, **kw: opened.append((root, fp, kw)) or "cache"
    )
    monkeypatch.setattr(experiment, "progress_enabled", lambda config: "progress of the config")
    assert experiment.prepare_decoded(plan, "val", force=True) == "cache"
    fingerprint = decoded_fingerprint(plan.dataset.identity("val"), 18)  # 16 px: a short side of 16·256/224
    root = default_root(fingerprint, tmp_path / "cache")
    assert built == [
        (root, fingerprint, {"short_side": 18, "num_workers": 0, "progress": "progress of the config", "force": True})
    ]
    assert opened == [(root, fingerprint, {"checksum": True, "progress": "progress of the config"})]
    recorded, cache = [], SimpleNamespace(samples=lambda: "the split's samples")
    monkeypatch.setattr(
        experiment, "prepare_decoded", lambda plan, split=None, **kw: recorded.append((split, kw)) or cache
    )
    run = Runtime(torch.device("cpu"))
    assert experiment._decoded(plan, run) is cache and recorded[-1] == (None, {"runtime": run})
    assert experiment._eval_samples(plan, run)("val") == "the split's samples"
    assert recorded[-1] == ("val", {"runtime": run})
    recorded.clear()
    experiment.prepare(plan.config, force=True)  # `e2kd prepare --force`: every split's cache rebuilt
    assert recorded == [("train", {"force": True}), ("val", {"force": True})]
