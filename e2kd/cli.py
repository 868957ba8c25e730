"""Command line: ``e2kd plugins | train-teacher | distill | evaluate | demo | reproduce | ...``."""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .errors import ConfigError, E2KDError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="experiment YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set distill.lam=0 (repeatable)",
    )
    p.add_argument("--out", type=Path, help="run directory (overrides out_dir)")


def _add_rerun(
    p: argparse.ArgumentParser,
    help: str = "train again even if the run directory holds a finished run of this config (its results are replaced)",
) -> None:
    p.add_argument("--rerun", action="store_true", help=help)


def _load(args: argparse.Namespace):
    from .config import load_config

    config = load_config(args.config, list(args.overrides))
    # --out is a path, never parsed as YAML (a folder named "yes" or "[x]" stays that folder)
    return config.model_copy(update={"out_dir": args.out.expanduser().resolve()}) if args.out else config


def _is_main() -> bool:
    """Under torchrun only the main process (RANK 0) reports."""
    from .runtime import is_main_process

    return is_main_process()


def _print_results(results: dict) -> None:
    from .evaluate import flatten_metrics

    if not _is_main():
        return
    for split, values in results["splits"].items():
        text = ", ".join(f"{k} {v:.4g}" for k, v in flatten_metrics(values).items() if ".curve." not in k)
        print(f"{split}: {text}")
    for name, why in results.get("skipped", {}).items():
        print(f"(skipped metric {name}: {why})")


def cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import list_plugins, plugin_problems

    items = list_plugins(args.kind)
    problems = [p for p in plugin_problems() if args.kind is None or p.kind in (None, args.kind)]
    if args.json:
        print(json.dumps([i.to_json() for i in items] + [p.to_json() for p in problems], indent=2, default=str))
        return 0
    rows = [("KIND", "NAME", "DISTRIBUTION", "ENTRY POINT", "CAPABILITIES", "DESCRIPTION")]
    for i in items:
        caps = " ".join(f"{k}={v}" for k, v in i.capabilities.items())
        dist = f"{i.distribution} {i.version}" if i.version else i.distribution
        rows.append(
            (i.kind, i.name, dist, i.plugin, caps, i.description + ("" if i.status == "ok" else f"  [{i.status}]"))
        )
    widths = [max(len(str(r[c])) for r in rows) for c in range(5)]
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in range(5)) + "  " + r[5])
    if problems:
        print(f"\n{len(problems)} plugin problem(s) (the other plugins work; E2KD_DEBUG=1 shows import tracebacks):")
        for p in problems:
            print(f"  - {p.message}")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from .weights import compare, fetch, known_names, lock_path

    if args.action == "fetch":
        lock = args.lock or lock_path()
        for w in fetch(args.names, lock=lock):
            revision = f" @ {w.revision}" if w.revision else ""
            print(f"{w.name}{revision}: {w.path} (SHA-256 {w.sha256[:12]}…)")
        print(f"lock file: {lock}")
        return 0
    if args.action == "list":
        for name in known_names(args.names):
            print(name)
        return 0
    if len(args.names) != 2:
        raise ConfigError("e2kd weights compare takes two weight files or names")
    result = compare(*args.names)
    equal = not (result["only_first"] or result["only_second"] or result["shape_differs"] or result["differing"])
    print(
        json.dumps(result, indent=2)
        if args.json
        else ("equal" if equal else "different") + f": {result['tensors']} shared tensors, "
        f"largest difference {result['max_abs_difference']:.3g}, {len(result['only_first'])} only in the first, "
        f"{len(result['only_second'])} only in the second, {len(result['shape_differs'])} of another shape"
    )
    return 0 if equal else 1


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run, push_to_hub

    out = export_run(args.run, args.out, force=args.force)
    print(f"exported: {out} (config.json, model.safetensors, README.md)")
    if args.push:
        print(f"pushed: {push_to_hub(out, args.push, private=args.private)}")
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from .experiment import train_teacher

    config = _load(args)
    _print_results(train_teacher(config, rerun=args.rerun))
    if _is_main():
        print(f"run directory: {config.out_dir}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .experiment import distill

    config = _load(args)
    _print_results(distill(config, rerun=args.rerun))
    if _is_main():
        print(f"run directory: {config.out_dir}")
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from .experiment import precompute

    cache = precompute(_load(args), force=args.force)
    if not _is_main():
        return 0
    fp = cache.index["fingerprint"]
    print(
        f"teacher cache: {cache.root} ({len(cache)} samples, {cache.index['dtype']}, "
        f"explainer {fp['explainer']['name']}, teacher weights {fp['teacher']['weights_sha256'][:12]})"
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .experiment import prepare

    config = _load(args)
    caches = prepare(config, force=args.force)
    if not _is_main():
        return 0
    for split, cache in caches.items():
        gib = cache.index["bytes"] / 2**30
        print(
            f"decoded cache of {split}: {cache.root} ({len(cache)} images, short side "
            f"{cache.index['short_side']} px, {gib:.2f} GiB)"
        )
    if config.data.cache != "decoded":
        print("set data.cache: decoded to train and evaluate from them")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .report import evaluate_report

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    report = evaluate_report(args.run_dirs, args.out, metrics=metrics, log=lambda _: None)
    if not _is_main():
        return 0
    for name, results in report["results"].items():
        print(f"== {name}")
        _print_results(results)
    print(
        "wrote "
        + ", ".join(
            [str(Path(report["out"]) / n) for n in ("metrics.json", "report.md")] + list(report["figures"].values())
        )
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    run_demo(args.out, seeds, quick=args.quick)
    return 0


def _real_data(args: argparse.Namespace):
    """--imagenet/--waterbirds/--voc folders, --teacher CLAIM=FILE and --set, checked; None without folders."""
    from .reproduce import CLAIMS, RealData
    from .weights import is_weight_name

    folders = {
        name: getattr(args, name).expanduser().resolve()
        for name in ("imagenet", "waterbirds", "voc")
        if getattr(args, name) is not None
    }
    for name, folder in folders.items():
        if not folder.is_dir():
            raise ConfigError(f"--{name} {folder}: not a folder (give the root of your copy, see docs/datasets.md)")
    on = {c.root: c.paper.dataset for c in CLAIMS if c.paper is not None}
    teachers = {}
    for item in args.teachers:
        key, sep, file = item.partition("=")
        key = key.strip()
        if not sep or not file.strip():
            raise ConfigError(f"--teacher {item!r}: expected CLAIM=FILE, e.g. --teacher few_data=/models/resnet34.pth")
        if key not in on:
            raise ConfigError(f"--teacher {item!r}: {key!r} is not a claim with a teacher (one of: {', '.join(on)})")
        if on[key] not in folders:
            raise ConfigError(f"--teacher {item!r}: {key} runs on --{on[key]} DIR, which was not given")
        if is_weight_name(file.strip()):  # e.g. few_data=torchvision:ResNet34_Weights.IMAGENET1K_V1
            teachers[key] = file.strip()
            continue
        path = Path(file.strip()).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"--teacher {item!r}: {path} is not a file (nor a weight name <source>:<spec>)")
        teachers[key] = path
    if not folders:
        if args.overrides:
            raise ConfigError(
                "--set applies to full-size runs on real folders (--imagenet, --waterbirds, --voc); "
                "the miniatures have fixed settings"
            )
        return None
    if args.quick:
        raise ConfigError(
            "--quick shrinks the miniatures; shrink full-size runs with --set (e.g. --set train.epochs=1)"
        )
    return RealData(folders, teachers, tuple(args.overrides))


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import run_reproduce

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    claims = [c.strip() for c in args.claims.split(",") if c.strip()] if args.claims else None
    if not seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    run_reproduce(args.out, seeds, quick=args.quick, claims=claims, real=_real_data(args))
    print(f"wrote {args.out / 'reproduce.md'}, reproduce.json and the figures (reproduce.png, shift.png)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    try:
        index, count = (int(v) for v in args.shard.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        raise ConfigError(f"--shard {args.shard!r}: expected I/N with 0 <= I < N, e.g. 0/2") from None
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = run_sweep(
        args.config,
        args.grid,
        seeds,
        args.out,
        shard=(index, count),
        overrides=args.overrides,
        plot_metric=args.plot_metric,
        rerun=args.rerun,
    )
    done = sum(r["status"] == "done" for r in rows)
    print(
        f"{done}/{len(rows)} runs finished; wrote {args.out / 'sweep.csv'}, sweep.md" + (", sweep.png" if done else "")
    )
    print((args.out / "sweep.md").read_text())
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: no usage block, a "did you mean" for a mistyped choice."""

    def error(self, message: str) -> NoReturn:
        bad = re.search(r"invalid choice: '([^']*)'", message)
        if bad:
            choices = [str(c) for a in self._actions if a.choices for c in a.choices]
            hint = difflib.get_close_matches(bad.group(1), choices, n=1)
            what = "command" if message.startswith("argument command") else "choice"
            message = (
                f"unknown {what} {bad.group(1)!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" (known: {', '.join(choices)})"
            )
        else:
            message += f" (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="e2kd", description="Explanation-enhanced knowledge distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "plugins", help="list registered explainers, similarities, metrics, models, datasets, weight sources, trackers"
    )
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument(
        "--kind",
        choices=["explainer", "similarity", "metric", "model", "dataset", "weights", "tracker"],
        help="list only the items of this kind",
    )
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser(
        "weights", help="fetch named weights into the libraries' caches and lock them; list names; compare two"
    )
    p.add_argument(
        "action",
        choices=["fetch", "list", "compare"],
        help="fetch NAME...: download (or find) and lock; list SOURCE: the names a source knows; compare A B",
    )
    p.add_argument(
        "names", nargs="+", metavar="NAME", help="weight names (<source>:<spec>); a source for list; files for compare"
    )
    p.add_argument("--lock", type=Path, help="lock file to write (default: $E2KD_WEIGHTS_LOCK or ./e2kd-weights.lock)")
    p.add_argument("--json", action="store_true", help="compare: print the comparison as JSON")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("train-teacher", help="train config.model with cross-entropy")
    _add_config_args(p)
    _add_rerun(p)
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("distill", help="distill config.teacher into config.model (KD + explanation term)")
    _add_config_args(p)
    _add_rerun(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "precompute",
        help="run the teacher once over the training set and cache its logits and "
        "explanations (for distill.teacher_mode: frozen); resumes after a kill",
    )
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild a cache that was made for another setting")
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser(
        "prepare",
        help="decode the training and evaluation splits once into uint8 memory-mapped caches (for data.cache: decoded); "
        "resumes after a kill",
    )
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild the cache from scratch (stale or damaged)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "evaluate", help="evaluate finished runs: metrics.json, report.md, explanation grid, shift curve"
    )
    p.add_argument(
        "run_dirs",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="finished run directories (several: one report comparing them)",
    )
    p.add_argument("--out", type=Path, help="report directory (default: the run itself, or e2kd_report for several)")
    p.add_argument(
        "--metrics",
        help="comma-separated metric names replacing the config's eval.metrics, "
        "e.g. accuracy,agreement,epg,explanation_iou,group_accuracy,shift_equivariance",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write a run's student for timm / the Hugging Face hub (optionally push it)")
    p.add_argument("run", type=Path, metavar="RUN", help="a finished run directory")
    p.add_argument("--out", type=Path, help="output folder (default: RUN/export)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--push", metavar="REPO", help="upload the folder to this hub repository (needs a login)")
    p.add_argument("--private", action="store_true", help="with --push: create the repository private")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "sweep",
        help="run the cross product of --grid values x --seeds; resumable; writes "
        "sweep.csv, sweep.md (mean ± std) and sweep.png",
    )
    p.add_argument("config", type=Path, help="base experiment YAML file")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        required=True,
        help="a swept key and its values (repeatable), e.g. --grid distill.similarity=cosine,pearson",
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base config value for every run (repeatable)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="sweep directory (default: runs/sweep)")
    p.add_argument("--shard", default="0/1", help="run only runs i, i+N, ... (I/N), to split a sweep over processes")
    p.add_argument("--plot-metric", help="SPLIT/METRIC for sweep.png (default: test_ood/accuracy)")
    _add_rerun(p, "train every run of this shard again, finished ones too")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="KD vs e2KD on built-in synthetic data (about 2 minutes on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out)")
    p.add_argument(
        "--seeds", default="0,1,2", help="comma-separated student seeds (default: 0,1,2; the table shows mean ± std)"
    )
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds, numbers meaningless)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "reproduce",
        help="each of the paper's claims (a miniature, or full size on your data), KD vs "
        "e2KD over seeds, with computed verdicts (reproduce.md)",
    )
    p.add_argument("--out", type=Path, default=Path("reproduce_out"), help="output directory (default: reproduce_out)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds (default: 0,1,2)")
    p.add_argument(
        "--claims",
        help="comma-separated subset: few_data, spurious, voc, cnn_to_vit, frozen, faithfulness, bias100, bias100_bcos (default: all)",
    )
    p.add_argument("--quick", action="store_true", help="small data and few epochs: a smoke run (minutes)")
    real = p.add_argument_group(
        "full size on real data",
        "the claims on a given folder run with the paper's settings (e2kd/configs) instead of the miniature",
    )
    real.add_argument(
        "--imagenet", type=Path, metavar="DIR", help="ImageNet root (train/, val/): few_data, frozen, cnn_to_vit"
    )
    real.add_argument("--waterbirds", type=Path, metavar="DIR", help="Waterbirds root (metadata.csv): spurious")
    real.add_argument("--voc", type=Path, metavar="DIR", help="VOC root (VOCdevkit/VOC2007): voc")
    real.add_argument(
        "--teacher",
        dest="teachers",
        action="append",
        default=[],
        metavar="CLAIM=FILE",
        help="teacher checkpoint (file or weight name) of a claim: few_data (also frozen), spurious, cnn_to_vit, "
        "voc (voc trains the guided teacher when none is given); repeatable",
    )
    real.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value in every full-size run, e.g. --set train.batch_size=128 (repeatable)",
    )
    p.set_defaults(func=cmd_reproduce)
    return parser


def _one_line(exc: Exception) -> str:
    """The message of an e2kd error; one raised in a DataLoader worker arrives wrapped with the
    worker's traceback, whose last line is the original message."""
    text = str(exc).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except E2KDError as exc:
        print(f"e2kd: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("e2kd: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        distributed = sys.modules.get("torch.distributed")
        if distributed is not None and distributed.is_available() and distributed.is_initialized():
            distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
