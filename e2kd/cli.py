"""Command line: ``e2kd plugins | train-teacher | distill | evaluate | demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .errors import E2KDError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="experiment YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set distill.lam=0 (repeatable)")
    p.add_argument("--out", type=Path, help="run directory (overrides out_dir)")


def _load(args: argparse.Namespace):
    from .config import load_config

    overrides = list(args.overrides) + ([f"out_dir={args.out}"] if args.out else [])
    return load_config(args.config, overrides)


def _print_results(results: dict) -> None:
    for split, values in results["splits"].items():
        text = ", ".join(f"{k} {100 * v:.1f}%" for k, v in values.items())
        print(f"{split}: {text}")
    for name, why in results.get("skipped", {}).items():
        print(f"(skipped metric {name}: {why})")


def cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import list_plugins

    items = list_plugins(args.kind)
    if args.json:
        print(json.dumps([i.to_json() for i in items], indent=2, default=str))
        return 0
    rows = [("KIND", "NAME", "DISTRIBUTION", "CAPABILITIES", "DESCRIPTION")]
    for i in items:
        caps = " ".join(f"{k}={v}" for k, v in i.capabilities.items())
        rows.append((i.kind, i.name, i.distribution, caps, i.description))
    widths = [max(len(str(r[c])) for r in rows) for c in range(4)]
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in range(4)) + "  " + r[4])
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from .experiment import train_teacher

    config = _load(args)
    _print_results(train_teacher(config))
    print(f"run directory: {config.out_dir}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .experiment import distill

    config = _load(args)
    _print_results(distill(config))
    print(f"run directory: {config.out_dir}")
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from .experiment import precompute

    cache = precompute(_load(args), force=args.force)
    fp = cache.index["fingerprint"]
    print(f"teacher cache: {cache.root} ({len(cache)} samples, {cache.index['dtype']}, "
          f"explainer {fp['explainer']['name']}, teacher weights {fp['teacher']['weights_sha256'][:12]})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .experiment import evaluate_run

    _print_results(evaluate_run(args.run_dir))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    run_demo(args.out, seeds, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e2kd", description="Explanation-enhanced knowledge distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list registered explainers, similarities, metrics and models")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--kind", choices=["explainer", "similarity", "metric", "model"])
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("train-teacher", help="train config.model with cross-entropy")
    _add_config_args(p)
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("distill", help="distill config.teacher into config.model (KD + explanation term)")
    _add_config_args(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("precompute", help="run the teacher once over the training set and cache its logits and "
                       "explanations (for distill.teacher_mode: frozen); resumes after a kill")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild a cache that was made for another setting")
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("evaluate", help="evaluate a finished run directory")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="KD vs e2KD on built-in synthetic data (about 2.5 minutes on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds (default: 0,1,2; the table shows mean ± std)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds, numbers meaningless)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except E2KDError as exc:
        print(f"e2kd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("e2kd: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
