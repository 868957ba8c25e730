"""The verdict of a claim from its paired differences, the Markdown report and the figures."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .claims import MINIATURE

#: How a verdict is reached from the paired differences e2KD − KD (one per seed).
RULE = (
    "holds here: the mean paired difference is positive, larger than its standard error, and at least two "
    "thirds of the seeds are positive; does not hold here: otherwise"
)


def verdict(differences: Sequence[float]) -> str:
    """``holds here`` when the mean of the paired differences is > 0 and above its standard error
    (sd / √n; not required of a single seed), and at least 2/3 of the differences are > 0."""
    if not differences:
        raise ValueError("no paired differences")
    n, mean = len(differences), statistics.fmean(differences)
    error = statistics.stdev(differences) / n**0.5 if n > 1 else 0.0
    positive = sum(d > 0 for d in differences)
    return "holds here" if mean > 0 and mean > error and 3 * positive >= 2 * n else "does not hold here"


def _stat(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def report(
    claims: list[dict[str, Any]], seeds: Sequence[int], quick: bool, seconds: float, overrides: Sequence[str] = ()
) -> str:
    """The Markdown report: one table row per measured quantity (values in percent)."""
    miniature = all(c.get("data", MINIATURE) == MINIATURE for c in claims)
    where = "on shape images in the paper's data formats" if miniature else "on the data listed per claim below"
    lines = [
        "# e2kd reproduce",
        "",
        f"{'Quick (smoke) run' if quick else 'Full run'} {where}; seeds "
        f"{', '.join(map(str, seeds))}; {seconds / 60:.1f} min. Values in percent, mean ± std over seeds; "
        f"Δ = e2KD − KD per seed (paired). Verdict rule: {RULE}.",
        "",
        "| claim | measure | paper (KD → e2KD) | KD | e2KD | Δ per seed | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for claim in claims:
        for row in claim["rows"]:
            base, other = row["baseline"], row["variant"]
            deltas = ", ".join(f"{100 * d:+.1f}" for d in row["differences"])
            lines.append(
                f"| {claim['title']} ({other} vs {base}) | {row['measure']} | {row['paper']} | "
                f"{_stat(row[base])} | {_stat(row[other])} | {deltas} | **{row['verdict']}** |"
            )
    lines += ["", "Data and teachers (the teacher is the same for every seed of a claim):", ""]
    for claim in claims:
        values = ", ".join(
            f"{split} {metric} {100 * value:.1f}"
            for split, metrics in claim.get("teacher", {}).items()
            for metric, value in metrics.items()
            if isinstance(value, (int, float))
        )
        data = claim.get("data", MINIATURE)
        lines.append(f"- {claim['key']}: {data}; teacher: {values or 'a given checkpoint (not evaluated here)'}")
    if overrides:
        lines += ["", f"Full-size runs with {' '.join(f'--set {o}' for o in overrides)}."]
    return "\n".join(lines) + "\n"


def figures(claims: list[dict[str, Any]], out: Path) -> list[Path]:
    """``reproduce.png``: every row's paired differences; ``shift.png``: the shift-equivariance
    curves (teacher, and each student variant's mean over seeds) where a claim measured them."""
    from ..viz import plot_curves, plot_paired

    rows = [
        (
            f"{c['key']}: {r['measure']} ({r['variant']})"[:70],
            [100 * d for d in r["differences"]],
            r["verdict"] == "holds here",
        )
        for c in claims
        for r in c["rows"]
    ]
    paths = [
        plot_paired(
            rows,
            out / "reproduce.png",
            xlabel="e2KD − KD per seed (points); bar: mean, green: holds here",
            title="e2kd reproduce: paired differences",
        )
    ]
    for claim in claims:
        if claim.get("curves"):
            shifts = sorted(int(k.split("_")[1]) for k in next(iter(claim["curves"].values()))[0])
            lines = {
                name: (shifts, [statistics.fmean(c[f"shift_{t}"] for c in runs) for t in shifts])
                for name, runs in claim["curves"].items()
            }
            paths.append(
                plot_curves(
                    lines,
                    out / "shift.png",
                    xlabel="diagonal shift (px)",
                    ylabel="cosine on the overlap",
                    title=f"{claim['key']}: shift equivariance of explanations",
                )
            )
    return paths
