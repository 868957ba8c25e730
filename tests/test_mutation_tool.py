"""``make mutation`` (tools/mutation.py): scores computed from mutmut's results, and a smoke run."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("mutation_tool", ROOT / "tools" / "mutation.py")
mutation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation)


def test_scores_count_each_status_and_leave_equivalent_mutants_out(tmp_path):
    meta = tmp_path / "mutants" / "e2kd_plugins" / "metrics" / "m.py.meta"
    meta.parent.mkdir(parents=True)
    codes = {
        "m.x_f__mutmut_1": 1,
        "m.x_f__mutmut_2": 0,
        "m.x_f__mutmut_3": 0,
        "m.x_f__mutmut_4": 36,
        "m.x_f__mutmut_5": 33,
        "m.x_f__mutmut_6": 3,
    }
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    (rows,) = mutation.scores(tmp_path, ["e2kd_plugins/metrics/m.py"], {"m.x_f__mutmut_3": "symmetric"})
    assert rows["file"] == "plugins/metrics/m.py" and rows["mutants"] == 6
    assert rows["counts"] == {"killed": 2, "survived": 1, "equivalent": 1, "timeout": 1, "no tests": 1}
    assert rows["score"] == pytest.approx((2 + 1) / (6 - 1))  # a timeout is a noticed change
    assert rows["survivors"] == ["m.x_f__mutmut_2", "m.x_f__mutmut_5"]
    assert "| `plugins/metrics/m.py` | 6 | 2 | 1 | 1 | 1 | 1 | 60.0 % |" in mutation.table([rows])
    assert rows["timeouts"] == ["m.x_f__mutmut_4"]


def test_subprocess_tests_judge_the_matching_survivors_with_the_mutant_named_in_their_environment(tmp_path):
    """A test that passes only under mutant 3 (as its child process sees it): it kills 2, leaves 3
    surviving, and would kill 5 if it ran it (5 does not match), and 1, already killed, is not run."""
    meta = tmp_path / "mutants" / "e2kd" / "m.py.meta"
    meta.parent.mkdir(parents=True)
    codes = {
        "e2kd.m.x_f__mutmut_1": 1,
        "e2kd.m.x_f__mutmut_2": 0,
        "e2kd.m.x_f__mutmut_3": 33,
        "e2kd.m.x_g__mutmut_5": 0,
    }
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    (tmp_path / "mutants" / "test_child.py").write_text(
        "import os, subprocess, sys\n"
        "def test_a_child_process_sees_the_mutant():\n"
        "    child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ[\"MUTANT_UNDER_TEST\"])'],\n"
        "                           capture_output=True, text=True)\n"
        "    assert child.stdout.strip() == 'e2kd.m.x_f__mutmut_3'\n"
    )
    mutation.run_in_subprocesses(tmp_path, ["e2kd/m.py"], ["test_child.py"], ["*x_f*"], dict(os.environ))
    assert json.loads(meta.read_text())["exit_code_by_key"] == {
        **codes,
        "e2kd.m.x_f__mutmut_2": 1,
        "e2kd.m.x_f__mutmut_3": 0,
    }


def test_every_listed_equivalent_mutant_gives_a_reason():
    listed = json.loads((ROOT / "tools" / "mutation_equivalent.json").read_text())
    for name, reason in listed.items():
        assert name.startswith("_") or ("__mutmut_" in name and len(reason) > 20), name


@pytest.mark.slow
def test_mutation_command_runs_on_one_small_file(tmp_path):
    out = tmp_path / "scores.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "mutation.py"),
            "--files",
            "plugins/similarities/topk.py",
            "--tests",
            "tests/test_similarities.py",
            "--work",
            str(tmp_path / "work"),
            "--max-children",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["file"] == "plugins/similarities/topk.py" and row["mutants"] > 10
    counted = row["mutants"] - row["counts"].get("equivalent", 0)
    assert row["score"] == pytest.approx((row["counts"].get("killed", 0) + row["counts"].get("timeout", 0)) / counted)
    assert row["counts"].get("killed", 0) > 0
    assert "| `plugins/similarities/topk.py` |" in done.stdout
