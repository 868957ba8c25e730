"""Mutation testing of the package with mutmut: ``make mutation`` (or ``python tools/mutation.py``).

mutmut plants one small bug at a time (a flipped operator, a changed constant, a dropped argument)
and runs the tests that reach it; a mutant the tests do not notice *survived*. This script runs it
in a copy of the tree (``.mutation/``, so the checkout is never touched and the cache survives
between runs), then prints and writes the score per file: killed / (mutants - equivalent), where
the equivalent mutants — changes that cannot alter any result — are listed with their reason in
``tools/mutation_equivalent.json``.

    python tools/mutation.py                                  # the whole package (see docs/testing.md for the time)
    python tools/mutation.py --scope method                   # the method code (about 20 minutes on 2 cores)
    python tools/mutation.py --files plugins/similarities/cosine.py --tests tests/test_similarities.py
    python tools/mutation.py --recheck                        # after changing tests: survivors again
    python tools/mutation.py --report                         # the table of the last run, nothing run
    cd .mutation && python -m mutmut show NAME                # the diff of one mutant
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "tools" / "mutation_equivalent.json"

#: The method code: the loss, evaluation, the frozen cache, and every similarity, metric and explainer.
METHOD = [
    "e2kd/distill.py",
    "e2kd/explaining.py",
    "e2kd/labels.py",
    "e2kd/evaluate.py",
    "e2kd/frozen.py",
    "plugins/similarities/*.py",
    "plugins/metrics/*.py",
    "plugins/explainers/*.py",
]
#: The whole package: the core (datasets, checkpoints, guidance, mixup, the training loop, runtime,
#: upsampling, reproduce, config, registry, ...) and every built-in plugin.
PACKAGE = ["e2kd/*.py", "e2kd/data/*.py", "e2kd/reproduce/*.py", "plugins/*/*.py"]
SCOPES = {"package": PACKAGE, "method": METHOD}

#: Tests that cannot kill a mutant or must not run under mutmut: the notebook (executed in a kernel
#: process), the benchmarks' smoke tests (scripts outside the copied tree) and the mutation tool's
#: own smoke test (mutmut inside mutmut).
EXCLUDED_TESTS = {"tests/test_notebook.py", "tests/test_benchmarks.py", "tests/test_mutation_tool.py"}


def fast_tests() -> list[str]:
    """Every test file but :data:`EXCLUDED_TESTS`; run with ``-m "not slow"``. A mutant lives in the
    forked test process, so in-process tests kill mutants (a subprocess that imports e2kd from the
    working copy does too, at the cost of its start)."""
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if str(p.relative_to(ROOT)) not in EXCLUDED_TESTS
    )


STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    -24: "timeout",
    24: "timeout",
    152: "timeout",
    None: "not checked",
}


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


#: Folders copied into the working copy, under their import names: mutmut names a mutant after its
#: file's path, and the tests must import it by that name (plugins/ is the package e2kd_plugins).
COPIED = {"e2kd": "e2kd", "plugins": "e2kd_plugins", "tests": "tests", "examples": "examples", "docs": "docs"}


def _in_work(pattern: str) -> str:
    return COPIED["plugins"] + pattern[len("plugins") :] if pattern.startswith("plugins/") else pattern


def _in_repo(path: str) -> str:
    return "plugins" + path[len(COPIED["plugins"]) :] if path.startswith(COPIED["plugins"] + "/") else path


def prepare(work: Path, files: list[str], tests: list[str]) -> None:
    """Copy the sources and tests into ``work`` (mtimes kept: mutmut re-mutates what changed) and
    write its mutmut configuration."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder, name in COPIED.items():
        shutil.copytree(ROOT / folder, work / name, ignore=ignore, dirs_exist_ok=True)
    section = "\n".join(
        [
            "",
            "[tool.mutmut]",
            f"source_paths = {_toml_list(['e2kd', COPIED['plugins']])}",
            f"only_mutate = {_toml_list([_in_work(f) for f in files])}",
            f"pytest_add_cli_args_test_selection = {_toml_list(tests)}",
            # data files the tests read from the tree (example configs, the example plugin, packaged configs,
            # the docs generated from the code)
            f"also_copy = {_toml_list(['examples', 'e2kd/configs', 'docs'])}",
            'pytest_add_cli_args = ["-m", "not slow", "-p", "no:cacheprovider", "-q"]',
            # a CPU-time limit of 2 x 4 x (estimated test time + 5 s): an endless loop costs a minute, not an hour
            "timeout_multiplier = 4.0",
            "timeout_constant = 5.0",
            "",
        ]
    )
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + section)
    # mutmut maps tests to functions once and keeps the map: with other tests it would run none
    # (or the wrong ones), so a changed selection recollects it
    selection, stats = work / "tests-selected.txt", work / "mutants" / "mutmut-stats.json"
    if not selection.is_file() or selection.read_text() != "\n".join(tests):
        stats.unlink(missing_ok=True)
        selection.write_text("\n".join(tests))


def forget_stale(work: Path, files: list[str]) -> None:
    """A target left out of an earlier run is a plain copy in ``mutants/`` beside its old verdicts,
    which mutmut would take as up to date (and find no test for): remove both so it is mutated again."""
    for path in files:
        copy = work / "mutants" / path
        if copy.is_file() and "mutmut" not in copy.read_text():
            for stale in (copy, copy.with_name(copy.name + ".meta"), copy.with_name(copy.name + ".spans")):
                stale.unlink(missing_ok=True)


def targets(work: Path, patterns: list[str]) -> list[str]:
    """The working copy's files matching ``patterns`` (given as repository paths)."""
    found = sorted(
        str(p.relative_to(work)) for folder in ("e2kd", COPIED["plugins"]) for p in (work / folder).rglob("*.py")
    )
    return [
        f for f in found if any(fnmatch.fnmatch(f, _in_work(p)) for p in patterns) and not f.endswith("__init__.py")
    ]


def run_in_subprocesses(work: Path, files: list[str], tests: list[str], patterns: list[str], env: dict) -> None:
    """Run ``tests`` once more for each survivor (see :func:`scores`) whose name matches one of
    ``patterns``: tests whose code runs in child processes (``torchrun`` workers, ``mp.spawn``) that
    mutmut cannot trace, so it never pairs them with that code. The children import the mutated
    package (``PYTHONPATH``) and inherit the mutant's name; a failing test kills the mutant."""
    env = {**env, "PYTHONPATH": str(work / "mutants")}
    for path in files:
        for row in scores(work, [path], {}):  # (none for a file without results)
            chosen = [n for n in row["survivors"] if any(fnmatch.fnmatch(n, p) for p in patterns)]
            meta = work / "mutants" / f"{path}.meta"
            data = json.loads(meta.read_text())
            for i, name in enumerate(chosen, 1):
                done = subprocess.run(
                    [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "", *tests],
                    cwd=work / "mutants",
                    env={**env, "MUTANT_UNDER_TEST": name},
                    capture_output=True,
                    text=True,
                )
                if done.returncode not in (0, 1):
                    raise SystemExit(
                        f"mutation: the subprocess tests could not run ({done.returncode}):\n{done.stdout[-2000:]}"
                    )
                data["exit_code_by_key"][name] = done.returncode  # 1: a test failed, the mutant is killed
                print(
                    f"mutation: [{i}/{len(chosen)}] {name}: {'killed' if done.returncode else 'survived'} "
                    f"by the subprocess tests",
                    flush=True,
                )
                meta.write_text(json.dumps(data, indent=4))  # after each: an interrupted pass keeps its verdicts


def scores(work: Path, files: list[str], equivalent: dict[str, str]) -> list[dict]:
    """Per file: mutants by status, the equivalent ones, and the score over the non-equivalent."""
    rows = []
    for path in files:
        meta = work / "mutants" / f"{path}.meta"
        if not meta.is_file():
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts: dict[str, int] = {}
        survivors = []
        for name, code in sorted(codes.items()):
            status = STATUS.get(code, "suspicious")
            if status == "survived" and name in equivalent:
                status = "equivalent"
            counts[status] = counts.get(status, 0) + 1
            if status in ("survived", "no tests", "timeout", "suspicious", "not checked"):
                survivors.append((name, status))
        counted = len(codes) - counts.get("equivalent", 0)
        killed = counts.get("killed", 0) + counts.get("timeout", 0)  # a timeout is a noticed change
        rows.append(
            {
                "file": _in_repo(path),
                "mutants": len(codes),
                "counts": counts,
                "score": killed / counted if counted else 1.0,
                "survivors": [n for n, s in survivors if s != "timeout"],
                "timeouts": [n for n, s in survivors if s == "timeout"],
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| file | mutants | killed | timeout | equivalent | survived | no tests | score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["counts"]
        lines.append(
            f"| `{r['file']}` | {r['mutants']} | {c.get('killed', 0)} | {c.get('timeout', 0)} | "
            f"{c.get('equivalent', 0)} | {c.get('survived', 0)} | {c.get('no tests', 0)} | "
            f"{100 * r['score']:.1f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scope",
        choices=sorted(SCOPES),
        default="package",
        help="package: every module of e2kd and the built-in plugins (default); method: the method code",
    )
    parser.add_argument("--files", nargs="+", help="glob patterns of the files to mutate (instead of --scope)")
    parser.add_argument(
        "--tests",
        nargs="+",
        help="test files that may kill mutants (default: all but the notebook and this tool's smoke test)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / ".mutation", help="working copy (default: .mutation)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2, help="parallel test processes")
    parser.add_argument(
        "--recheck",
        action="store_true",
        help="recollect which tests reach which code, then run the "
        "surviving mutants again (mutmut keeps a verdict until its code changes, not when tests do)",
    )
    parser.add_argument(
        "--subprocess-tests",
        nargs="+",
        default=[],
        help="tests (node ids; slow ones too) that "
        "run the package in child processes, e.g. under torchrun: run once more for each survivor "
        "matching --subprocess-mutants",
    )
    parser.add_argument(
        "--subprocess-mutants",
        nargs="+",
        default=["*"],
        help="glob patterns of mutant names for --subprocess-tests (default: every survivor)",
    )
    parser.add_argument("--report", action="store_true", help="only print the scores of the last run")
    parser.add_argument("--json", type=Path, help="also write the scores here")
    args = parser.parse_args(argv)
    args.files = args.files or SCOPES[args.scope]
    args.tests = args.tests or fast_tests()

    work = args.work.resolve()
    if not args.report:
        work.mkdir(parents=True, exist_ok=True)
        prepare(work, args.files, args.tests)
        forget_stale(work, targets(work, args.files))
        # one thread per test process: the children are forked from a process that has run torch,
        # and a forked child can hang in an OpenMP pool its parent started
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        if args.recheck:
            (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
        run = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
        batches: list[list[str]] = [[]]  # first the mutants without a verdict (new or changed code)
        while batches:
            done = subprocess.run(run + batches.pop(0), cwd=work, env=env)
            if done.returncode != 0:
                print(f"mutation: mutmut exited with {done.returncode} (see its output above)", file=sys.stderr)
                return done.returncode
            if args.recheck:  # then every survivor (and timeout: a test that hung counts as a kill) again
                args.recheck = False
                survivors = [
                    n for r in scores(work, targets(work, args.files), {}) for n in r["survivors"] + r["timeouts"]
                ]
                batches = [survivors[i : i + 200] for i in range(0, len(survivors), 200)]
        if args.subprocess_tests:
            run_in_subprocesses(work, targets(work, args.files), args.subprocess_tests, args.subprocess_mutants, env)
    equivalent = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.is_file() else {}
    rows = scores(work, targets(work, args.files), {k: v for k, v in equivalent.items() if not k.startswith("_")})
    if not rows:
        print(f"mutation: no results in {work / 'mutants'}; run without --report first", file=sys.stderr)
        return 1
    print(table(rows))
    for r in rows:
        for name in r["survivors"]:
            print(f"  survived: {name}   (cd {work.name} && python -m mutmut show {name})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
