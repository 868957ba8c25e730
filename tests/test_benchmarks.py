"""Smoke tests: the benchmarks run end to end on tiny settings (timings are not checked)."""

import json
import os
import runpy
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(tmp_path, script: str, *args: str, timeout: int = 300) -> dict:
    """Run ``benchmarks/<script>`` with ``args`` and return the JSON it wrote."""
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return json.loads(out.read_text())


def test_distill_step_benchmark_smoke(tmp_path):
    result = _bench(
        tmp_path,
        "bench_distill_step.py",
        "--teacher-arch",
        "resnet18",
        "--image-size",
        "64",
        "--batch-size",
        "2",
        "--num-classes",
        "5",
        "--repeats",
        "2",
        "--warmup",
        "0",
    )
    for key in (
        "ratio_e2kd_over_kd",
        "ratio_frozen_e2kd_over_frozen_kd",
        "ratio_frozen_e2kd_over_live_e2kd",
        "ratio_e2kd_over_hand_e2kd",
        "ratio_kd_over_hand_kd",
        "ratio_e2kd_every_over_kd",
        "ratio_e2kd_closed_over_kd",
        "ratio_e2kd_upsampled_over_kd",
    ):
        assert result[key] > 0
    assert all(len(t) == 2 for t in result["step_times_s"].values())
    times, k = result["step_times_s"], result["explain_every"]
    median = statistics.median
    assert result["ratio_e2kd_over_kd"] == pytest.approx(median(times["e2kd"]) / median(times["kd"]))
    # a cycle of K steps: one explaining (its own and the e2kd mode's steps), K - 1 plain ones
    explaining = [t for i, t in enumerate(times["e2kd_every"]) if i % k == 0] + times["e2kd"]
    plain = [t for i, t in enumerate(times["e2kd_every"]) if i % k != 0]
    cycle = (median(explaining) + (k - 1) * median(plain)) / k
    assert result["ratio_e2kd_every_over_kd"] == pytest.approx(cycle / median(times["kd"]))


def test_distill_step_benchmark_bcos_smoke(tmp_path):
    result = _bench(
        tmp_path,
        "bench_distill_step.py",
        "--family",
        "bcos",
        "--arch",
        "resnet18",
        "--teacher-arch",
        "resnet18",
        "--image-size",
        "32",
        "--batch-size",
        "2",
        "--num-classes",
        "5",
        "--repeats",
        "1",
        "--warmup",
        "0",
    )
    assert set(result["step_times_s"]) == {"kd", "e2kd", "e2kd_every"}
    assert result["ratio_e2kd_over_kd"] > 0 and result["ratio_e2kd_over_hand_e2kd"] is None


def test_localisation_benchmark_smoke(tmp_path):
    result = _bench(tmp_path, "bench_localisation.py", "--n", "200", "--size", "16", "--repeats", "1")
    assert result["maps"] == 200 and result["speedup_batch_over_loop"] > 0


def test_explainers_benchmark_smoke(tmp_path):
    result = _bench(
        tmp_path,
        "bench_explainers.py",
        "--image-size",
        "32",
        "--batch-size",
        "2",
        "--repeats",
        "1",
        "--throughput-batch",
        "1",
        timeout=600,
    )
    assert set(result["step_ratios"]) == {
        "gradcam",
        "gradient",
        "input_x_gradient",
        "integrated_gradients",
        "bcos",
        "rollout",
    }
    assert all(r["ratio_e2kd_over_kd"] > 0 for r in result["step_ratios"].values())
    assert result["gradcam_throughput"]["ours_over_captum"] > 0


def test_loader_benchmark_smoke(tmp_path):
    result = _bench(
        tmp_path,
        "bench_loader.py",
        "--images",
        "20",
        "--size",
        "48",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--repeats",
        "1",
    )
    rates = result["workers_0"]["images_per_s"]
    assert set(rates) == {"e2kd train", "hand train", "e2kd eval", "hand eval"} and all(v > 0 for v in rates.values())


def test_epoch_benchmark_smoke(tmp_path):
    result = _bench(
        tmp_path,
        "bench_epoch.py",
        "--classes",
        "2",
        "--per-class",
        "4",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--cache",
        "none,decoded",
        "--modes",
        "e2kd_frozen",  # (one mode: every mode is the same command with other settings)
    )
    assert result["e2kd_frozen"]["steps"] == 2 and result["e2kd_frozen_decoded"]["median_images_per_s"] > 0
    assert set(result) >= {"e2kd_frozen", "e2kd_frozen_decoded", "prepare_s"}
    assert all(0 <= result[k]["data_wait_share"] < 1 for k in ("e2kd_frozen", "e2kd_frozen_decoded"))


def test_data_path_benchmark_smoke(tmp_path):
    result = _bench(
        tmp_path,
        "bench_data_path.py",
        "--images",
        "20",
        "--min-side",
        "30",
        "--max-side",
        "60",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--repeats",
        "1",
    )
    rates = result["images_per_s"]
    assert set(rates) == {
        "jpeg (e2kd)",
        "jpeg (by hand)",
        "decoded + device view",
        "decoded + device view, 1 thread",
        "jpeg bytes, decoded + device view",
        "tensors + v2 per item (by hand)",
    }
    assert all(v > 0 for v in rates.values()) and result["decoded_cache"]["bytes"] > 0
    assert set(result["cpu_kernel_us_per_image"]) == {
        "uint8_resized_crop_strided",
        "uint8_resized_crop_channels_last_copy",
        "to_float_touched_batch",
        "to_float_fresh_batch",
    }
    assert all(v > 0 for v in result["cpu_kernel_us_per_image"].values())
    assert result["ratio_two_threads_over_one"] > 0


def test_view_parity_benchmark_smoke(tmp_path):
    result = _bench(
        tmp_path,
        "bench_view_parity.py",
        "--seeds",
        "2",
        "--per-class",
        "3",
        "--val-per-class",
        "2",
        "--side",
        "24",
        "--image-size",
        "16",
        "--epochs",
        "1",
    )
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    assert all(0 <= r["item_view"] <= 1 and 0 <= r["device_view"] <= 1 for r in result["runs"])
    differences = [r["device_view"] - r["item_view"] for r in result["runs"]]
    assert result["mean_difference"] == pytest.approx(statistics.mean(differences))


def test_faithfulness_benchmark_smoke(tmp_path):
    """The Quantus comparison runs end to end (it checks the values equal before timing)."""
    from .conftest import dev_extra

    dev_extra("quantus")
    result = _bench(
        tmp_path,
        "bench_faithfulness.py",
        "--model",
        "linear",
        "--n",
        "4",
        "--size",
        "12",
        "--steps",
        "4",
        "--patch",
        "4",
        "--repeats",
        "1",
    )
    assert set(result["metrics"]) == {"deletion_pixels", "deletion_patches", "mprt", "road"}
    assert all(row["values_equal"] and row["speedup"] > 0 for row in result["metrics"].values())
    assert result["pixels_per_step"] == 24  # <= 144 px / 4 steps, and 3 x 24 divides 144 (Quantus' rule)


def _gpu_suite(tmp_path, *parts: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(tmp_path / "results"), *parts],
        env={**os.environ, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_gpu_suite_passes_each_benchmark_options_it_has_and_tests_that_exist(tmp_path, monkeypatch, capsys):
    """A lent GPU is rare: the suite's commands (printed by DRY_RUN) are checked here, so a misspelt
    option or a renamed test file is found before device time is spent on it."""
    run = _gpu_suite(tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    names = [line.split()[1] for line in lines if line.startswith("== ")]
    assert names[-3:] == ["step_b256_bf16_cl_r34", "epoch_b256", "tests"] and len(names) == 11
    commands = [line.split() for line in lines if not line.startswith("== ")]
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    checked = set()
    for words in commands:
        if "pytest" in words:
            files = [w for w in words if w.startswith("tests/")]
            assert files and all((ROOT / f).is_file() for f in files), files
            continue
        script = next(w for w in words if w.endswith(".py"))
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(SystemExit):
            runpy.run_path(str(ROOT / script), run_name="__main__")
        options = capsys.readouterr().out
        for flag in (w for w in words[words.index(script) + 1 :] if w.startswith("--")):
            assert f"{flag} " in options or f"{flag}\n" in options, (script, flag)
        checked.add(Path(script).name)
    assert checked == {"bench_distill_step.py", "bench_epoch.py", "bench_data_path.py"}


def test_the_gpu_suite_runs_the_parts_named_and_refuses_others(tmp_path):
    run = _gpu_suite(tmp_path, "tests", "data_path")
    assert [line.split()[1] for line in run.stdout.splitlines() if line.startswith("== ")] == ["data_path", "tests"]
    bad = _gpu_suite(tmp_path, "data")
    assert bad.returncode == 2 and not bad.stdout
    assert bad.stderr.strip() == "gpu_suite.sh: unknown part 'data' (known: steps epoch data_path epoch_b256 tests)"
