"""``e2kd reproduce``: a miniature of each of the paper's claims, run and judged from its numbers.

Each claim is an experiment on shape images written in the on-disk format of the paper's data
(:mod:`e2kd.data.shape_formats`, read by the same dataset plugins as a real copy): a teacher, then
students distilled from it with KD and with e2KD for every seed, evaluated on held-out images.
For every measured quantity the report gives the paper's number, the mean ± std over seeds, the
paired difference e2KD − KD per seed, and a verdict computed by :func:`verdict` — never written by
hand. ``quick`` shrinks data and epochs (a smoke run: its verdicts are computed the same way but
say little).

Given a real copy of a dataset (:class:`RealData`), the claims on it run at full size instead: the
students are the paper's settings shipped in ``e2kd/configs`` (:class:`PaperSetting`) pointed at the
folder, distilled from the user's teacher checkpoint, and judged by the same rule.

The package: :mod:`.claims` (each claim, its miniature data and configs), :mod:`.planning` (the
configs of a run, miniature or full size on real folders, checked before anything trains),
:mod:`.verdict` (the rule, the report and the figures); here, running them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import ExperimentConfig
from ..experiment import distill, train_teacher
from ..report import teacher_results
from ..runs import load_run
from ..storage import atomic_write_json, atomic_write_text
from .claims import CLAIMS, MINIATURE, VARIANTS, Claim, Measure, PaperSetting
from .planning import RealData, check_teacher_files, miniature_configs, paper_configs, select_claims
from .verdict import RULE, figures, report, verdict

__all__ = [
    "CLAIMS",
    "MINIATURE",
    "RULE",
    "VARIANTS",
    "Claim",
    "Measure",
    "PaperSetting",
    "RealData",
    "check_teacher_files",
    "figures",
    "miniature_configs",
    "paper_configs",
    "report",
    "run_claim",
    "run_reproduce",
    "select_claims",
    "verdict",
]


def run_claim(
    claim: Claim, configs: dict[int, dict[str, ExperimentConfig]], log: Callable[[str], None], data: str = MINIATURE
) -> dict[str, Any]:
    """Teacher and students of one claim (``configs`` per seed); the paired rows of the report."""
    seeds = list(configs)
    teacher_config = configs[seeds[0]].get("teacher")
    teacher = train_teacher(teacher_config) if teacher_config is not None else {}
    values: dict[str, list[list[float]]] = {}
    curves: dict[str, list[dict[str, float]]] = {}  # shift-equivariance curves, for the figure
    of_teacher: dict[str, Any] | None = None  # the teacher under the students' metrics, for towards_teacher
    for seed in seeds:
        for variant in claim.variants:
            log(f"[e2kd reproduce] {claim.key}: {variant}, seed {seed}")
            results = distill(configs[seed][variant])
            if of_teacher is None and any(m.towards_teacher for m in claim.measures):
                log(f"[e2kd reproduce] {claim.key}: the teacher under the students' faithfulness metrics")
                of_teacher = teacher_results(load_run(configs[seed][variant].out_dir))
            values.setdefault(variant, []).append([m.read(results, of_teacher) for m in claim.measures])
            for m in claim.measures:
                if m.key == "mean_shift":
                    curves.setdefault(variant, []).append(results["splits"][m.split][m.metric])
    base = claim.variants[0]
    rows = []
    for other in claim.variants[1:]:
        for i, measure in enumerate(claim.measures):
            kd = [v[i] for v in values[base]]
            e2 = [v[i] for v in values[other]]
            diffs = [b - a for a, b in zip(kd, e2)]
            rows.append(
                {
                    "measure": measure.label,
                    "paper": measure.paper,
                    "baseline": base,
                    "variant": other,
                    base: kd,
                    other: e2,
                    "differences": diffs,
                    "verdict": verdict(diffs),
                }
            )
    teacher_splits = teacher.get("splits", {})
    if of_teacher is not None:  # its measured values, beside its own metrics
        for m in claim.measures:
            teacher_splits.setdefault(m.split, {})[f"{m.metric}.{m.key}"] = m.value_in(of_teacher)
    if curves:
        split = next(m.split for m in claim.measures if m.key == "mean_shift")
        if "shift_equivariance" in teacher_splits.get(split, {}):  # a given checkpoint has no run to read it from
            curves = {"teacher": [teacher_splits[split]["shift_equivariance"]], **curves}
    return {
        "key": claim.key,
        "title": claim.title,
        "variants": list(claim.variants),
        "rows": rows,
        "data": data,
        "teacher": {s: {k: v for k, v in m.items() if not isinstance(v, dict)} for s, m in teacher_splits.items()},
        "curves": curves,
    }


def run_reproduce(
    out_dir: str | Path = "reproduce_out",
    seeds: Sequence[int] = (0, 1, 2),
    *,
    quick: bool = False,
    claims: Sequence[str] | None = None,
    real: RealData | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the claims (all, those named, or those on the ``real`` folders); write ``reproduce.md``,
    ``reproduce.json`` and the figures in ``out_dir``. Every config is validated, and every given
    teacher checkpoint loaded, before the first run starts."""
    if len(seeds) < 1:
        raise ValueError("at least one seed")
    real = real or RealData({}, {})
    out, start = Path(out_dir), time.time()
    scale = 0.25 if quick else 1.0
    planned = []
    for claim in select_claims(claims, real if real.folders else None, log):
        setting = claim.paper
        if setting is not None and setting.dataset in real.folders:
            root = out / f"{claim.root}_{setting.dataset}"
            data = f"{setting.dataset} at {real.folders[setting.dataset]}, paper settings e2kd/configs/{setting.config}.yaml"
            planned.append((claim, paper_configs(claim, root, seeds, real), data))
        else:  # frozen reuses the few-data runs' teacher and KD
            planned.append((claim, miniature_configs(claim, out / claim.root, seeds, scale), MINIATURE))
    check_teacher_files([(claim, configs) for claim, configs, _ in planned], real)
    done = [run_claim(claim, configs, log, data) for claim, configs, data in planned]
    seconds = time.time() - start
    figures(done, out)
    text = report(done, seeds, quick, seconds, list(real.overrides))
    atomic_write_text(out / "reproduce.md", text)
    results = {
        "seeds": list(seeds),
        "quick": quick,
        "seconds": round(seconds, 1),
        "rule": RULE,
        "claims": done,
        "overrides": list(real.overrides),
    }
    atomic_write_json(out / "reproduce.json", results)
    log(text)
    return results
