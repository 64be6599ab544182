"""The report itself: `write_report` checks the options, reads and groups the runs and writes
report.md, report.tex and the figures; `main` is its command line (bad options: one line, exit 2)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from src.report.errors import ReportError
from src.report.figures import write_plots
from src.report.runs import Run, common_overrides, find_runs, group_runs
from src.report.significance import find_baseline, significance_table
from src.report.tables import latex_table, table
from src.report.time_to_accuracy import parse_target, time_to_target_table

MAIN_METRIC = "val/personal_acc"


def check_metric(runs: list[Run], metric: str, option: str) -> None:
    if runs and not any(metric in row for run in runs for row in run.rows):
        raise ReportError(f"{option} {metric}: no run has this metric in its metrics.csv")


def write_report(
    paths: list[Path],
    out: Path | None = None,
    *,
    metric: str = MAIN_METRIC,
    baseline: str | None = None,
    target: str | None = None,
    ci: bool = False,
    labels: list[tuple[str, str]] = (),
) -> Path:
    """Write report.md, report.tex and the plots into `out` (default: the first PATH); returns
    report.md. Raises ReportError for a --baseline, --target or --metric that cannot be used."""
    out = Path(out or paths[0])
    goal = parse_target(target, metric) if target is not None else None
    runs, broken = find_runs(paths)
    names = set(group_runs(runs))
    for old, _ in labels:
        if old not in names:
            raise ReportError(
                f"--label {old!r}: no such group; the groups are {', '.join(sorted(names))}"
            )
    groups = group_runs(runs, dict(labels))
    if metric != MAIN_METRIC or baseline is not None:  # the default may be absent otherwise
        check_metric(runs, metric, "--metric")
    if goal is not None:
        check_metric(runs, goal.metric, "--target")
    base = find_baseline(groups, baseline) if baseline is not None else None
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(groups, out, ci)
    common = " ".join(common_overrides(runs)) or "none"
    band = "95 % bootstrap CI of the mean" if ci else "± std"
    text = [
        "# fedsweep report",
        "",
        f"{len(runs)} runs in {len(groups)} groups (grouped by the keys whose values differ, "
        "without `seed` and the keys that do not change a run, such as `trainer.*` and "
        "`logger.*`; "
        "mean ± std over the group's runs) from " + ", ".join(f"`{p}`" for p in paths) + ".",
        f"Overrides shared by all runs: `{common}`. Main metric: `{metric}`. "
        f"Curve bands: {band}. LaTeX table: `report.tex`; figures also as PDF.",
        "",
        table(groups) if groups else "No runs found.\n",
        *(f"![{name}]({name})" for name in plots),
        "",
    ]
    if base is not None:
        text += [significance_table(groups, base, metric)]
    if goal is not None:
        text += [time_to_target_table(groups, goal)]
    if broken:
        text += ["## Skipped", "", *(f"- {note}" for note in broken), ""]
    (out / "report.tex").write_text(latex_table(groups))
    report = out / "report.md"
    report.write_text("\n".join(text))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m src.report",
        description="Compare runs offline: report.md, report.tex and figures (see src/report/__init__.py).",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep folders")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: PATH)")
    parser.add_argument("--metric", default=MAIN_METRIC, help="main metric (%(default)s)")
    parser.add_argument("--baseline", help="override of the baseline group, e.g. alg=fedavg")
    parser.add_argument("--target", help="time-to-accuracy target: 0.8 or KEY=0.8")
    parser.add_argument("--ci", action="store_true", help="bootstrap 95 %% CI bands, not ± std")
    parser.add_argument(
        "--label",
        nargs=2,
        action="append",
        default=[],
        metavar=("GROUP", "NAME"),
        help="rename a group in tables and legends, e.g. --label alg=fedavg FedAvg",
    )
    args = parser.parse_args(argv)
    try:
        report = write_report(
            args.paths,
            args.out,
            metric=args.metric,
            baseline=args.baseline,
            target=args.target,
            ci=args.ci,
            labels=[tuple(pair) for pair in args.label],
        )
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(report.read_text())
    print(f"report written to {report}")
