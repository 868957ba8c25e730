"""Multi-process training with DDP (gloo on CPU): the e2KD double backward gives the gradients of a
single process on the same global batch, and ``torchrun -m e2kd ...`` runs end to end."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

import e2kd
from e2kd.distill import Distiller
from e2kd.explaining import explained_forward
from e2kd.testing import TinyCNN

from .conftest import TINY, end_spawned_worker

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 8


def one_step(case: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """One SGD step of e2KD on this process's share of a fixed global batch; the student's new weights."""
    torch.manual_seed(0)
    if case == "bcos":
        teacher = e2kd.get_model_builder("bcos_small", widths=[4, 6]).build(3).double()
        student = e2kd.get_model_builder("bcos_small", widths=[4, 6]).build(3).double()
        explainer = e2kd.get_explainer("bcos")
    else:
        teacher, student = TinyCNN(width=6).double(), TinyCNN(width=4).double()
        explainer = e2kd.get_explainer("gradcam")
    # BatchNorm is per process (SyncBatchNorm has no double backward): compare with batch-independent normalisation
    student.eval()
    x = torch.rand(GLOBAL_BATCH, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    forward = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(student)
    replay = {}
    if case == "frozen":
        logits, maps, _ = explained_forward(teacher, x, explainer)
        replay = {"teacher_logits": logits[share], "teacher_maps": maps[share, 0]}
        teacher = None
    distiller = Distiller(
        teacher,
        student,
        explainer=explainer,
        similarity=e2kd.get_similarity("cosine"),
        lam=2.0,
        student_forward=forward,
    )
    out = distiller(x[share], **replay)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def _initial_student(case: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    if case == "bcos":
        e2kd.get_model_builder("bcos_small", widths=[4, 6]).build(3)
        return e2kd.get_model_builder("bcos_small", widths=[4, 6]).build(3).double().state_dict()
    TinyCNN(width=6)
    return TinyCNN(width=4).double().state_dict()


def evaluate_on(rank: int, world: int) -> dict:
    """evaluate_model of a fixed random student and teacher on the synthetic test splits."""
    from e2kd.config import load_config_dict
    from e2kd.data import dataset_of
    from e2kd.evaluate import evaluate_model
    from e2kd.plan import plan_run
    from e2kd.runtime import Runtime

    metrics = [
        "accuracy",
        "agreement",
        "kl_divergence",
        "explanation_similarity",
        "epg",
        "explanation_iou",
        "group_accuracy",
        "micro_f1",
        {"name": "shift_equivariance", "options": {"max_shift": 2}},
        {"name": "deletion", "options": {"patch_size": 4, "steps": 4}},
        {"name": "insertion", "options": {"patch_size": 4, "patches_per_step": 3}},
        {"name": "road", "options": {"percentages": [20, 60], "noise": 0.0}},
        {"name": "model_randomisation", "options": {"layers": ["fc", "stem.0"]}},
    ]
    config = load_config_dict({**TINY, "data": {**TINY["data"], "test_per_class": 7}, "eval": {"metrics": metrics}})
    dataset = dataset_of(config)
    torch.manual_seed(3)
    model = e2kd.get_model_builder("small_resnet", widths=[4, 8]).build(3).eval()
    teacher = e2kd.get_model_builder("small_resnet", widths=[6, 8]).build(3).eval()
    return evaluate_model(
        plan_run(config, "evaluate", dataset),
        model,
        teacher,
        runtime=Runtime(torch.device("cpu"), rank=rank, world_size=world),
    )


def _eval_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = evaluate_on(rank, world)
        torch.save(results, f"{out}.{rank}")
        dist.barrier()  # an orderly shutdown: no process leaves while the other still talks to it
    except BaseException:
        dist.destroy_process_group()
        raise
    end_spawned_worker()


def test_evaluation_split_over_processes_equals_one_process(tmp_path):
    """Each process evaluates every 2nd sample (21 per split: uneven shares) and the metric states
    merge to the values of one process over all samples, on every process."""
    single = evaluate_on(0, 1)
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "eval")), nprocs=2, join=True)
    for rank in (0, 1):
        merged = torch.load(f"{tmp_path / 'eval'}.{rank}", weights_only=False)
        assert merged["skipped"] == single["skipped"]
        for split, values in single["splits"].items():
            flat_single = e2kd.evaluate.flatten_metrics(values)
            flat_merged = e2kd.evaluate.flatten_metrics(merged["splits"][split])
            assert flat_merged.keys() == flat_single.keys()
            for key, value in flat_single.items():
                assert flat_merged[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (split, key)


def _worker(rank: int, world: int, init_file: str, case: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params = one_step(case, rank, world)
        if rank == 0:
            torch.save(params, out)
        dist.barrier()  # an orderly shutdown: no process leaves while the other still talks to it
    except BaseException:
        dist.destroy_process_group()
        raise
    end_spawned_worker()


@pytest.mark.parametrize("case", ["gradcam", "frozen", "bcos"])
def test_two_processes_step_like_one_process_on_the_global_batch(case, tmp_path):
    single = one_step(case)
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), case, str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-6, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    # the step moved the weights by far more than the tolerance (two untouched models would also agree)
    untrained = _initial_student(case)
    assert max(float((single[k] - untrained[k]).abs().max()) for k in single if single[k].is_floating_point()) > 1e-3


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def _torchrun(*args):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "e2kd", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.slow
def test_torchrun_train_teacher_and_distill(tmp_path):
    train = {**TINY["train"], "epochs": 1, "batch_size": 3}
    teacher = _write(tmp_path / "t.yaml", {**TINY, "train": train, "out_dir": str(tmp_path / "t")})
    run = _torchrun("train-teacher", str(teacher))
    assert run.returncode == 0, run.stderr[-3000:]
    student = _write(
        tmp_path / "s.yaml",
        {
            **TINY,
            "train": {**train, "loggers": ["csv", "mlflow"]},
            "model": {"name": "small_resnet", "options": {"widths": [4, 4]}},
            "teacher": {**TINY["model"], "checkpoint": str(tmp_path / "t" / "model.pt")},
            "out_dir": str(tmp_path / "s"),
        },
    )
    run = _torchrun("distill", str(student))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("run directory:") == 1  # only the main process reports
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["history"][0]["explanation"] > 0 and set(metrics["splits"]) == {"test_id", "test_ood"}
    # 18 training images, batch 3 per process, 2 processes: 9 per process -> 3 steps
    steps = list(csv.DictReader((tmp_path / "s" / "steps.csv").open()))
    assert [int(r["step"]) for r in steps] == [1, 2, 3]
    # trackers log from the main process only: one MLflow run, each step once, with the global batch's loss
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [tracked] = client.search_runs([client.get_experiment_by_name("e2kd").experiment_id])
    history = client.get_metric_history(tracked.info.run_id, "step/loss")
    assert [(m.step, m.value) for m in history] == [(int(r["step"]), float(r["loss"])) for r in steps]
    # evaluation under torchrun: split over the processes, the main process writes; same values as one process
    before = json.loads((tmp_path / "s" / "metrics.json").read_text())["splits"]
    run = _torchrun("evaluate", str(tmp_path / "s"), "--out", str(tmp_path / "report"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("== s") == 1 and (tmp_path / "report" / "explanations.png").is_file()
    after = json.loads((tmp_path / "s" / "metrics.json").read_text())["splits"]
    assert after.keys() == before.keys() and all(
        after[k][m] == pytest.approx(before[k][m], rel=1e-6) for k in before for m in before[k]
    )
    # a frozen teacher: the processes share the cache's shards
    frozen = _write(
        tmp_path / "f.yaml",
        {**yaml.safe_load(student.read_text()), "out_dir": str(tmp_path / "f"), "distill": {"teacher_mode": "frozen"}},
    )
    run = _torchrun("distill", str(frozen))
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "f" / "metrics.json").read_text())["history"][0]["explanation"] > 0
    # precompute split over two processes writes the files one process writes
    shards = {}
    for name, launch in (("one", None), ("two", _torchrun)):
        args = [
            "precompute",
            str(frozen),
            "--set",
            f"distill.cache_dir={tmp_path / name}",
            "--set",
            "distill.shard_size=4",
        ]
        if launch is None:
            from e2kd.cli import main

            assert main(args) == 0
        else:
            run = launch(*args)
            assert run.returncode == 0, run.stderr[-3000:]
        index = json.loads((tmp_path / name / "index.json").read_text())
        assert index["complete"] and not list((tmp_path / name).glob("index.part-*"))
        shards[name] = {k: (v["logits"]["sha256"], v["maps"]["sha256"]) for k, v in index["shards"].items()}
    assert len(shards["one"]) == 5 and shards["one"] == shards["two"]  # 18 images, 4 per shard


@pytest.mark.slow
def test_torchrun_trains_from_the_decoded_cache_built_by_the_main_process(tmp_path):
    """Two processes, data.cache: decoded: the main process builds each split's cache while the other
    waits, both train from it through the device view and evaluate from it; one report."""
    from e2kd.data.miniature import write_image_folder

    write_image_folder(tmp_path / "img", ["a", "b", "c"], {"train": 4, "val": 2}, size=(20, 40), seed=3)
    data = {
        "name": "image_folder",
        "options": {"root": str(tmp_path / "img"), "image_size": 16},
        "cache": "decoded",
        "cache_dir": str(tmp_path / "caches"),
    }
    train = {**TINY["train"], "epochs": 1, "batch_size": 2, "color_jitter": 0.2}
    config = _write(tmp_path / "t.yaml", {**TINY, "data": data, "train": train, "out_dir": str(tmp_path / "t")})
    run = _torchrun("train-teacher", str(config))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("run directory:") == 1
    assert sorted(p.name.split("-")[2] for p in (tmp_path / "caches").iterdir()) == ["train", "val"]
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"val"} and len(metrics["history"]) == 1
