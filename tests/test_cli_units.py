"""The command line in-process, its back ends replaced by recorders: what each sub-command passes on
(parsed seeds, metrics, shards, folders, flags) and prints, its one-line errors, and the reference in
docs/cli.md, which must list every command and option with its help as the parser has them.

``python -m tests.test_cli_units`` rewrites docs/cli.md from the parser."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from e2kd import cli
from e2kd.errors import ConfigError, DataError

from .test_sweep_units import BASE

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


@pytest.fixture
def rank(monkeypatch):
    """Set RANK (a torchrun worker's rank); unset by default."""
    monkeypatch.delenv("RANK", raising=False)
    return lambda value: monkeypatch.setenv("RANK", str(value))


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**BASE, "out_dir": str(tmp_path / "from_yaml")}))
    return path


def _record(monkeypatch, module, name, result):
    """Replace ``module.name`` by a function that records its arguments and returns ``result``."""
    calls = []

    def recorder(*args, **kwargs):
        calls.append((args, kwargs))
        return result

    monkeypatch.setattr(module, name, recorder)
    return calls


RESULTS = {
    "splits": {
        "test_id": {"accuracy": 0.123456, "agreement": 1.0},
        "test_ood": {"accuracy": 0.5, "acc": {"y0_g1": 0.25}},
    },
    "skipped": {"epg": "dataset has no boxes", "agreement": "needs teacher"},
}
RESULT_LINES = [
    "test_id: accuracy 0.1235, agreement 1",
    "test_ood: accuracy 0.5, acc.y0_g1 0.25",
    "(skipped metric epg: dataset has no boxes)",
    "(skipped metric agreement: needs teacher)",
]


def test_is_main_reads_the_torchrun_rank(rank):
    assert cli._is_main()
    rank(0)
    assert cli._is_main()
    rank(1)
    assert not cli._is_main()


def test_results_print_one_line_per_split_on_the_main_process_only(rank, capsys):
    cli._print_results(RESULTS)
    assert capsys.readouterr().out.splitlines() == RESULT_LINES
    cli._print_results({"splits": {"val": {"accuracy": 1 / 3}}})  # no skipped metrics
    assert capsys.readouterr().out == "val: accuracy 0.3333\n"
    rank(2)
    cli._print_results(RESULTS)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("command, function", [("train-teacher", "train_teacher"), ("distill", "distill")])
def test_training_commands_pass_the_loaded_config_and_rerun_and_print_results(
    command, function, config_file, tmp_path, monkeypatch, rank, capsys
):
    from e2kd import experiment

    calls = _record(monkeypatch, experiment, function, RESULTS)
    assert cli.main([command, str(config_file), "--set", "train.lr=0.5", "--set", "seed=7"]) == 0
    (config,), kwargs = calls[0]
    assert kwargs == {"rerun": False}
    assert (config.train.lr, config.seed, config.out_dir) == (0.5, 7, (tmp_path / "from_yaml").resolve())
    assert capsys.readouterr().out.splitlines() == RESULT_LINES + [f"run directory: {config.out_dir}"]

    monkeypatch.chdir(tmp_path)
    assert cli.main([command, str(config_file), "--out", "yes", "--rerun"]) == 0
    (config,), kwargs = calls[1]
    assert kwargs == {"rerun": True} and config.out_dir == tmp_path / "yes" and config.seed == 0
    capsys.readouterr()
    rank(1)  # another torchrun worker trains too, but prints nothing
    assert cli.main([command, str(config_file)]) == 0
    assert len(calls) == 3 and capsys.readouterr().out == ""


def test_out_expands_the_home_folder(config_file, tmp_path, monkeypatch):
    from e2kd import experiment

    calls = _record(monkeypatch, experiment, "distill", {"splits": {}})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.main(["distill", str(config_file), "--out", "~/run"]) == 0
    assert calls[0][0][0].out_dir == tmp_path / "home" / "run"


def test_precompute_passes_force_and_describes_the_cache(config_file, monkeypatch, rank, capsys):
    from e2kd import experiment

    class Cache:
        root = Path("/c/teacher-cache-abc")
        index = {
            "dtype": "float16",
            "fingerprint": {"explainer": {"name": "gradcam"}, "teacher": {"weights_sha256": "0123456789abcdef"}},
        }

        def __len__(self):
            return 42

    cache = Cache()
    calls = _record(monkeypatch, experiment, "precompute", cache)
    assert cli.main(["precompute", str(config_file)]) == 0
    assert calls[0][1] == {"force": False} and calls[0][0][0].seed == 0
    assert capsys.readouterr().out == (
        "teacher cache: /c/teacher-cache-abc (42 samples, float16, explainer gradcam, teacher weights 0123456789ab)\n"
    )
    rank(1)
    assert cli.main(["precompute", str(config_file), "--force"]) == 0
    assert calls[1][1] == {"force": True} and capsys.readouterr().out == ""


def test_prepare_passes_force_and_describes_each_cache(config_file, monkeypatch, rank, capsys):
    from e2kd import experiment

    class Cache:
        def __init__(self, name, n, size):
            self.root, self.n, self.index = Path(f"/c/decoded-{name}"), n, {"bytes": size, "short_side": 256}

        def __len__(self):
            return self.n

    caches = {"train": Cache("t", 7, 3 * 2**29), "val": Cache("v", 2, 2**20)}
    calls = _record(monkeypatch, experiment, "prepare", caches)
    assert cli.main(["prepare", str(config_file)]) == 0
    assert calls[0][1] == {"force": False} and calls[0][0][0].seed == 0
    assert capsys.readouterr().out == (
        "decoded cache of train: /c/decoded-t (7 images, short side 256 px, 1.50 GiB)\n"
        "decoded cache of val: /c/decoded-v (2 images, short side 256 px, 0.00 GiB)\n"
        "set data.cache: decoded to train and evaluate from them\n"
    )
    assert cli.main(["prepare", str(config_file), "--set", "data.cache=decoded"]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1]
        == "decoded cache of val: /c/decoded-v (2 images, short side 256 px, 0.00 GiB)"
    )
    rank(1)
    assert cli.main(["prepare", str(config_file), "--force"]) == 0
    assert calls[2][1] == {"force": True} and capsys.readouterr().out == ""


def test_evaluate_passes_runs_out_and_metrics_and_lists_what_it_wrote(tmp_path, monkeypatch, rank, capsys):
    from e2kd import report

    answer = {
        "results": {"kd": RESULTS, "e2kd": {"splits": {"val": {"accuracy": 1.0}}}},
        "out": str(tmp_path / "r"),
        "figures": {"grid": str(tmp_path / "r" / "grid.png")},
    }
    calls = _record(monkeypatch, report, "evaluate_report", answer)
    assert cli.main(["evaluate", "a", "b", "--out", "r", "--metrics", " accuracy, ,epg ,"]) == 0
    (runs, out), kwargs = calls[0]
    assert runs == [Path("a"), Path("b")] and out == Path("r") and kwargs["metrics"] == ["accuracy", "epg"]
    assert kwargs["log"]("anything") is None
    assert capsys.readouterr().out.splitlines() == [
        "== kd",
        *RESULT_LINES,
        "== e2kd",
        "val: accuracy 1",
        f"wrote {tmp_path}/r/metrics.json, {tmp_path}/r/report.md, {tmp_path}/r/grid.png",
    ]
    rank(1)
    assert cli.main(["evaluate", "a"]) == 0
    (runs, out), kwargs = calls[1]
    assert runs == [Path("a")] and out is None and kwargs["metrics"] is None and capsys.readouterr().out == ""


def test_demo_passes_seeds_and_quick(monkeypatch):
    from e2kd import demo

    calls = _record(monkeypatch, demo, "run_demo", None)
    assert cli.main(["demo", "--seeds", "3, 1,", "--out", "d", "--quick"]) == 0
    assert calls[0] == ((Path("d"), [3, 1]), {"quick": True})
    assert cli.main(["demo"]) == 0
    assert calls[1] == ((Path("demo_out"), [0, 1, 2]), {"quick": False})


def test_reproduce_passes_seeds_claims_and_real_folders(tmp_path, monkeypatch, capsys):
    from e2kd import reproduce

    calls = _record(monkeypatch, reproduce, "run_reproduce", None)
    assert cli.main(["reproduce", "--out", str(tmp_path), "--seeds", "4,5", "--claims", "voc, few_data,"]) == 0
    assert calls[0] == ((tmp_path, [4, 5]), {"quick": False, "claims": ["voc", "few_data"], "real": None})
    assert (
        capsys.readouterr().out == f"wrote {tmp_path / 'reproduce.md'}, reproduce.json and the figures "
        f"(reproduce.png, shift.png)\n"
    )
    assert cli.main(["reproduce", "--quick"]) == 0
    assert calls[1] == ((Path("reproduce_out"), [0, 1, 2]), {"quick": True, "claims": None, "real": None})

    (tmp_path / "inet").mkdir()
    (tmp_path / "voc").mkdir()
    (tmp_path / "wb").mkdir()
    (tmp_path / "r=34.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert (
        cli.main(
            [
                "reproduce",
                "--imagenet",
                "inet",
                "--voc",
                str(tmp_path / "voc"),
                "--teacher",
                " few_data = r=34.pth ",
                "--set",
                "train.epochs=1",
                "--set",
                "seed=2",
            ]
        )
        == 0
    )
    real = calls[2][1]["real"]
    assert real == reproduce.RealData(
        {"imagenet": tmp_path / "inet", "voc": tmp_path / "voc"},
        {"few_data": tmp_path / "r=34.pth"},
        ("train.epochs=1", "seed=2"),
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cli.main(["reproduce", "--waterbirds", "~/wb"]) == 0
    assert calls[3][1]["real"] == reproduce.RealData({"waterbirds": tmp_path / "wb"}, {}, ())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", ","], "--seeds: give at least one seed, e.g. --seeds 0,1,2"),
        (
            ["--imagenet", "nowhere"],
            "--imagenet {tmp}/nowhere: not a folder (give the root of your copy, see docs/datasets.md)",
        ),
        (["--voc", "a_file"], "--voc {tmp}/a_file: not a folder (give the root of your copy, see docs/datasets.md)"),
        (
            ["--imagenet", "inet", "--teacher", "few_data"],
            "--teacher 'few_data': expected CLAIM=FILE, e.g. --teacher few_data=/models/resnet34.pth",
        ),
        (
            ["--imagenet", "inet", "--teacher", "few_data= "],
            "--teacher 'few_data= ': expected CLAIM=FILE, e.g. --teacher few_data=/models/resnet34.pth",
        ),
        (
            ["--imagenet", "inet", "--teacher", "frozen=a_file"],
            "--teacher 'frozen=a_file': 'frozen' is not a claim with a "
            "teacher (one of: few_data, spurious, voc, cnn_to_vit)",
        ),
        (
            ["--imagenet", "inet", "--teacher", "spurious=a_file"],
            "--teacher 'spurious=a_file': spurious runs on --waterbirds DIR, which was not given",
        ),
        (
            ["--imagenet", "inet", "--teacher", "few_data=inet"],
            "--teacher 'few_data=inet': {tmp}/inet is not a file (nor a weight name <source>:<spec>)",
        ),
        (
            ["--teacher", "few_data=a_file"],
            "--teacher 'few_data=a_file': few_data runs on --imagenet DIR, which was not given",
        ),
        (
            ["--set", "train.epochs=1"],
            "--set applies to full-size runs on real folders (--imagenet, --waterbirds, --voc); "
            "the miniatures have fixed settings",
        ),
        (
            ["--imagenet", "inet", "--quick"],
            "--quick shrinks the miniatures; shrink full-size runs with --set (e.g. --set train.epochs=1)",
        ),
    ],
)
def test_reproduce_mistakes_are_one_line_before_anything_runs(argv, message, tmp_path, monkeypatch, capsys):
    from e2kd import reproduce

    calls = _record(monkeypatch, reproduce, "run_reproduce", None)
    (tmp_path / "inet").mkdir()
    (tmp_path / "a_file").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["reproduce", *argv]) == 2
    assert capsys.readouterr().err == f"e2kd: error: {message.format(tmp=tmp_path)}\n" and calls == []


def test_sweep_passes_its_arguments_and_prints_the_table(tmp_path, monkeypatch, capsys):
    from e2kd import sweep

    rows = [{"status": "done"}, {"status": "failed"}, {"status": "done"}]
    calls = _record(monkeypatch, sweep, "run_sweep", rows)
    (tmp_path / "sweep.md").write_text("| the | table |\n")
    assert (
        cli.main(
            [
                "sweep",
                "base.yaml",
                "--grid",
                "a=1,2",
                "--grid",
                "b=x",
                "--seeds",
                "0, 9",
                "--out",
                str(tmp_path),
                "--shard",
                "1/3",
                "--set",
                "c=1",
                "--plot-metric",
                "val/accuracy",
                "--rerun",
            ]
        )
        == 0
    )
    assert calls[0] == (
        (Path("base.yaml"), ["a=1,2", "b=x"], [0, 9], tmp_path),
        {"shard": (1, 3), "overrides": ["c=1"], "plot_metric": "val/accuracy", "rerun": True},
    )
    assert (
        capsys.readouterr().out == f"2/3 runs finished; wrote {tmp_path / 'sweep.csv'}, sweep.md, sweep.png\n"
        "| the | table |\n\n"
    )
    calls.clear()
    rows[:] = [{"status": "failed"}]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sweep").mkdir(parents=True)
    (tmp_path / "runs" / "sweep" / "sweep.md").write_text("")
    assert cli.main(["sweep", "base.yaml", "--grid", "a=1"]) == 0
    assert calls[0] == (
        (Path("base.yaml"), ["a=1"], [0], Path("runs/sweep")),
        {"shard": (0, 1), "overrides": [], "plot_metric": None, "rerun": False},
    )
    assert capsys.readouterr().out.startswith("0/1 runs finished; wrote runs/sweep/sweep.csv, sweep.md\n")


@pytest.mark.parametrize("shard", ["1/1", "2/1", "-1/2", "x/2", "1", "1/2/3", "0/0", ""])
def test_a_shard_outside_0_to_n_is_refused(shard, monkeypatch, capsys):
    from e2kd import sweep

    calls = _record(monkeypatch, sweep, "run_sweep", [])
    assert cli.main(["sweep", "base.yaml", "--grid", "a=1", f"--shard={shard}"]) == 2
    assert capsys.readouterr().err == f"e2kd: error: --shard {shard!r}: expected I/N with 0 <= I < N, e.g. 0/2\n"
    assert calls == []


class _Item(SimpleNamespace):
    def to_json(self):
        return {"kind": self.kind, "name": self.name, "where": Path("/p")}


def test_plugins_table_aligns_five_columns_and_lists_problems_of_the_kind(monkeypatch, capsys):
    from e2kd import registry

    items = [
        _Item(
            kind="explainer",
            name="gradcam",
            distribution="e2kd",
            version="1.2",
            plugin="explainers",
            capabilities={"trainable": True, "channels": 1},
            description="Grad-CAM",
            status="ok",
        ),
        _Item(
            kind="similarity",
            name="cos",
            distribution="third-party",
            version=None,
            plugin="tp",
            capabilities={},
            description="cosine",
            status="shadowed",
        ),
    ]
    problems = [
        _Item(kind=None, name=None, message="plugin 'x' failed to import: boom"),
        _Item(kind="explainer", name="e", message="explainer 'e' clashes"),
        _Item(kind="metric", name="m", message="metric 'm' misdeclared"),
    ]
    kinds = []
    monkeypatch.setattr(registry, "list_plugins", lambda kind=None: kinds.append(kind) or items)
    monkeypatch.setattr(registry, "plugin_problems", lambda: problems)
    assert cli.main(["plugins"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "KIND        NAME     DISTRIBUTION  ENTRY POINT  CAPABILITIES" + " " * 15 + "DESCRIPTION",
        "explainer   gradcam  e2kd 1.2      explainers   trainable=True channels=1  Grad-CAM",
        "similarity  cos      third-party   tp" + " " * 38 + "cosine  [shadowed]",
        "",
        "3 plugin problem(s) (the other plugins work; E2KD_DEBUG=1 shows import tracebacks):",
        "  - plugin 'x' failed to import: boom",
        "  - explainer 'e' clashes",
        "  - metric 'm' misdeclared",
    ]
    assert cli.main(["plugins", "--kind", "explainer", "--json"]) == 0
    assert kinds == [None, "explainer"]
    listed = [
        {"kind": "explainer", "name": "gradcam", "where": "/p"},
        {"kind": "similarity", "name": "cos", "where": "/p"},
        {"kind": None, "name": None, "where": "/p"},
        {"kind": "explainer", "name": "e", "where": "/p"},
    ]
    assert capsys.readouterr().out == json.dumps(listed, indent=2) + "\n"  # paths as text, indented
    problems[:] = []
    assert cli.main(["plugins", "--kind", "metric"]) == 0
    assert "problem" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["distil"],
            "e2kd: error: unknown command 'distil'; did you mean 'distill'? (known: plugins, weights, train-teacher, "
            "distill, precompute, prepare, evaluate, export, sweep, demo, reproduce)",
        ),
        (
            ["zzz"],
            "e2kd: error: unknown command 'zzz' (known: plugins, weights, train-teacher, distill, precompute, prepare, "
            "evaluate, export, sweep, demo, reproduce)",
        ),
        (
            ["plugins", "--kind", "metrics"],
            "e2kd plugins: error: unknown choice 'metrics'; did you mean 'metric'? (known: "
            "explainer, similarity, metric, model, dataset, weights, tracker)",
        ),
        (["demo", "--speed"], "e2kd: error: unrecognized arguments: --speed (see e2kd --help)"),
        ([], "e2kd: error: the following arguments are required: command (see e2kd --help)"),
    ],
)
def test_parser_mistakes_are_exactly_one_line(argv, line, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and capsys.readouterr() == ("", line + "\n")


def test_one_line_keeps_the_last_line_of_a_worker_traceback():
    assert cli._one_line(DataError("  plain message \n")) == "plain message"
    wrapped = (
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\ne2kd.errors.DataError: a.png: cannot decode: bad: header'
    )
    assert cli._one_line(DataError(wrapped)) == "a.png: cannot decode: bad: header"
    assert cli._one_line(DataError("Traceback (most recent call last):\nno colon here")) == "no colon here"


def test_errors_and_interrupts_become_exit_codes_and_the_process_group_is_closed(monkeypatch, capsys):
    from e2kd import demo

    closed = []
    fake = SimpleNamespace(
        is_available=lambda: True, is_initialized=lambda: True, destroy_process_group=lambda: closed.append(True)
    )
    monkeypatch.setitem(sys.modules, "torch.distributed", fake)

    def fail(error):
        def run(*args, **kwargs):
            raise error

        monkeypatch.setattr(demo, "run_demo", run)

    fail(ConfigError("x.yaml: train.lr: must be > 0"))
    assert cli.main(["demo"]) == 2 and capsys.readouterr().err == "e2kd: error: x.yaml: train.lr: must be > 0\n"
    fail(KeyboardInterrupt())
    assert cli.main(["demo"]) == 130
    assert capsys.readouterr().err == "e2kd: interrupted; rerun the same command to resume\n"
    fail(ValueError("a bug of ours"))  # not a user's mistake: the traceback is kept
    with pytest.raises(ValueError, match="a bug of ours"):
        cli.main(["demo"])
    assert closed == [True, True, True]
    fake.is_initialized = lambda: False
    fail(KeyboardInterrupt())
    cli.main(["demo"])
    fake.is_available, fake.is_initialized = (lambda: False), (lambda: True)
    cli.main(["demo"])
    assert closed == [True, True, True]


def test_module_entry_point_exits_with_mains_code(monkeypatch):
    import runpy

    monkeypatch.setattr(cli, "main", lambda argv=None: 7)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("e2kd.__main__", run_name="__main__")
    assert exit_.value.code == 7


# -- docs/cli.md: the reference, generated from the parser ------------------------------------------------------------


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def reference() -> str:
    """docs/cli.md: every sub-command with its help and options (name, default, help)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    lines = [
        "# Command line reference",
        "",
        "Generated from the parser (`python -m tests.test_cli_units`; `tests/test_cli_units.py` fails when it",
        f"differs). `{parser.prog} COMMAND --help` prints the same. {parser.description}",
        "Mistakes are one line on stderr with exit code 2; an interrupted run exits with 130 and resumes when",
        "the same command is run again.",
        "",
    ]
    for name, command in sub.choices.items():
        lines += [f"## `{parser.prog} {name}`", "", helps[name], "", "| argument | default | help |", "|---|---|---|"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = ", ".join(action.option_strings) or action.metavar or action.dest
            if action.option_strings and action.nargs != 0:
                what += " " + (action.metavar or action.dest.upper())
            if action.choices:
                what = what.rsplit(" ", 1)[0] + " {" + ",".join(action.choices) + "}"
            if action.nargs == "+":
                what += " ..."
            default = "" if action.default in (None, False, [], argparse.SUPPRESS) else f"`{action.default}`"
            flags = " (required)" if action.required and action.option_strings else ""
            assert action.help, f"{name} {what}: give it a help text"
            lines.append(f"| `{_cell(what)}`{flags} | {_cell(default)} | {_cell(action.help)} |")
        for group in command._action_groups[2:]:
            lines += ["", f"*{group.title}*: {group.description}"]
        lines.append("")
    return "\n".join(lines)


def test_the_command_line_reference_is_the_parsers():
    assert DOC.read_text() == reference(), "docs/cli.md is stale: python -m tests.test_cli_units"


if __name__ == "__main__":
    DOC.write_text(reference())
    print(f"wrote {DOC}")
