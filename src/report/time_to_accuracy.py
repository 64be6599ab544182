"""Time to accuracy (--target): the first evaluated round and cumulative MB at which each run
reaches a value of a metric, and the per-group table."""

from __future__ import annotations

import math
from dataclasses import dataclass

from src.outputs import LOWER_IS_BETTER
from src.report.errors import ReportError
from src.report.runs import Run
from src.report.tables import mean_std


@dataclass(frozen=True)
class Target:
    metric: str
    value: float


def parse_target(text: str, main_metric: str) -> Target:
    """`0.8` (on the main metric) or `KEY=0.8`."""
    metric, _, value = text.rpartition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if math.isnan(number) or math.isinf(number) or (metric == "" and "=" in text):
        raise ReportError(f"--target {text!r}: expected a number or KEY=NUMBER, e.g. 0.8")
    return Target(metric or main_metric, number)


@dataclass
class Reached:
    """Where a run first reached the target: the evaluated round, the cumulative MB and (with
    system=...) the simulated seconds."""

    round: float
    megabytes: float
    sim_s: float = math.nan


def time_to_target(run: Run, target: Target) -> Reached | None:
    """The first evaluated round whose metric reaches the target (None: not reached): at or
    above it, or at or below it for a lower-is-better metric (loss, ...)."""
    lower_is_better = any(tag in target.metric for tag in LOWER_IS_BETTER)
    for row in run.rows:
        value = row.get(target.metric, math.nan)
        if math.isnan(value):
            continue
        if (value <= target.value) if lower_is_better else (value >= target.value):
            return Reached(
                row["round"],
                row.get("comm/total_bytes", math.nan) / 1e6,
                row.get("time/sim_total_s", math.nan),
            )
    return None


def time_to_target_table(groups: dict[str, list[Run]], target: Target) -> str:
    simulated = any(
        "time/sim_total_s" in row for runs in groups.values() for r in runs for row in r.rows
    )
    sim_column = " simulated s |" if simulated else ""
    lines = [
        f"## Time to {target.metric} reaching {target.value:g}",
        "",
        f"| group | reached | round | MB sent |{sim_column} per run (round, MB) |",
        "|---|---|---|---|---|" + ("---|" if simulated else ""),
    ]
    for name, runs in groups.items():
        reached = [time_to_target(run, target) for run in runs]
        hits = [r for r in reached if r is not None]
        per_run = ", ".join(
            "not reached" if r is None else f"({r.round:g}, {r.megabytes:.3f})" for r in reached
        )
        cells = [
            f"`{name}`",
            f"{len(hits)}/{len(runs)} reached",
            mean_std([r.round for r in hits], 1),
            mean_std([r.megabytes for r in hits], 3),
            *([mean_std([r.sim_s for r in hits], 1)] if simulated else []),
            per_run,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
