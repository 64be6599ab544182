"""Compare runs offline: `python -m src.report PATH [PATH ...] [options]`.

PATH is a run folder or a sweep folder (searched recursively for runs, i.e. folders holding a
`metrics.csv`). Runs are grouped by their overrides minus `seed`; for each group `report.md`
gets mean ± std over seeds of the final and best accuracies, rounds, MB sent and wall time, and
`report.tex` the same table as a booktabs tabular ready to `\\input` (best value of each column in
bold). Plots (accuracy vs round, accuracy vs cumulative MB on a log axis, per-client accuracy box
plot) are written next to it as PNG and PDF: the mean over seeds with a shaded band (± std, or
with `--ci` a seeded 95 % bootstrap interval of the mean), one colour per group in every figure.

Options:
  --metric KEY        the main metric (default val/personal_acc)
  --baseline OVERRIDE the group with that override (e.g. alg=fedavg) is the baseline: every other
                      group's final and best main metric against it, Welch's t-test over seeds
                      (p-value, difference of means with its 95 % confidence interval)
  --target V | KEY=V  time-to-accuracy: per run the first evaluated round and cumulative MB at
                      which the metric reaches V; per group mean ± std over the runs that did
  --ci                bootstrap bands instead of ± std

Runs still in progress (no summary.json yet) are read from their metrics.csv; folders that cannot
be read are listed in the report, not fatal. Bad options are refused with one line, exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from scipy import stats  # noqa: E402

from src.outputs import LOWER_IS_BETTER, summarize  # noqa: E402

ACCURACIES = ("val/global_acc", "val/personal_acc", "val/personal_acc_p10")
MAIN_METRIC = "val/personal_acc"
BOOTSTRAP_SEED = 0  # bootstrap bands are seeded: the same runs give the same report
BOOTSTRAP_RESAMPLES = 2000


class ReportError(ValueError):
    """A bad command-line input: refused with one line and exit code 2."""


@dataclass
class Run:
    folder: Path
    overrides: list[str]  # the job's command-line overrides, without seed
    rows: list[dict]  # metrics.csv
    summary: dict = field(default_factory=dict)  # empty while the run is in progress
    group: str = ""  # the overrides that tell it apart from the other runs (set by group_runs)

    def __post_init__(self) -> None:
        self.stats = summarize(self.rows)  # final and best of each metric, as in summary.json

    @property
    def finished(self) -> bool:
        return self.summary.get("status") == "completed"

    def final(self, key: str) -> float:
        return self.stats["final"].get(key, math.nan)

    def best(self, key: str) -> float:
        return self.stats["best"].get(key, {}).get("value", math.nan)

    @property
    def rounds(self) -> int:
        return int(self.rows[-1]["round"]) if self.rows else 0

    @property
    def megabytes(self) -> float:
        return self.final("comm/total_bytes") / 1e6

    @property
    def per_client_acc(self) -> list[float]:
        return [
            c["personal_acc"]
            for c in self.summary.get("per_client", [])
            if c.get("personal_acc") is not None and not math.isnan(c["personal_acc"])
        ]


def find_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """Every run under `paths`, and a note for each folder that could not be read."""
    runs, broken = [], []
    for path in paths:
        for metrics in sorted(Path(path).glob("**/metrics.csv")):
            if not _is_run_folder(metrics.parent):  # e.g. Lightning's csv/metrics.csv in a run
                continue
            try:
                runs.append(read_run(metrics.parent))
            except (OSError, ValueError, KeyError, yaml.YAMLError) as error:
                broken.append(f"{metrics.parent}: {type(error).__name__}: {error}")
        for summary in sorted(Path(path).glob("**/summary.json")):  # failed before any metrics
            if not (summary.parent / "metrics.csv").exists():
                broken.append(f"{summary.parent}: {_status(summary)}, no metrics.csv")
    return runs, broken


def _is_run_folder(folder: Path) -> bool:
    return (folder / ".hydra").is_dir() or (folder / "summary.json").is_file()


def _status(summary: Path) -> str:
    try:
        data = json.loads(summary.read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable summary.json"
    return f"{data.get('status', 'unknown')} ({data.get('error', '')})".replace(" ()", "")


def read_run(folder: Path) -> Run:
    with (folder / "metrics.csv").open() as f:
        rows = [
            {k: float(v) if v != "" else math.nan for k, v in r.items()} for r in csv.DictReader(f)
        ]
    if not rows or "round" not in rows[0]:
        raise ValueError("metrics.csv has no rounds yet")
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    overrides_path = folder / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.exists() else []
    kept = [o for o in overrides or [] if o.split("=")[0].lstrip("+~") != "seed"]
    return Run(folder, kept, rows, summary)


def common_overrides(runs: list[Run]) -> list[str]:
    """The overrides every run shares (shown once, above the table)."""
    if not runs:
        return []
    shared = set.intersection(*(set(run.overrides) for run in runs))
    return [o for o in runs[0].overrides if o in shared]


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs with the same overrides apart from seed, named by what differs between groups; in
    the order of the sweep's job numbers."""
    common = set(common_overrides(runs))
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: _job_number(r.folder)):
        run.group = " ".join(o for o in run.overrides if o not in common) or "(all the same)"
        groups.setdefault(run.group, []).append(run)
    return groups


def _job_number(folder: Path) -> tuple:
    """Hydra names sweep jobs `<number>_<overrides>`: sort 2 before 10."""
    head = folder.name.split("_", 1)[0]
    return (int(head), str(folder)) if head.isdigit() else (1 << 30, str(folder))


def mean_std(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


@dataclass(frozen=True)
class Column:
    """One numeric column of the summary table: a value per run, and which way is better."""

    title: str
    per_run: object  # Run -> float
    digits: int = 3
    better: str | None = "max"  # "max", "min", or None (not ranked)


def summary_columns() -> list[Column]:
    columns = []
    for key in ACCURACIES:
        name = key.removeprefix("val/")
        columns.append(Column(f"final {name}", lambda r, k=key: r.final(k)))
        columns.append(Column(f"best {name}", lambda r, k=key: r.best(k)))
    return columns + [
        Column("rounds", lambda r: r.rounds, 1, None),
        Column("MB sent", lambda r: r.megabytes, 3, "min"),
        Column("wall time (s)", lambda r: r.summary.get("wall_time_s", math.nan), 1, "min"),
    ]


def runs_cell(runs: list[Run]) -> str:
    done = sum(run.finished for run in runs)
    return f"{len(runs)}" + (f" ({len(runs) - done} running)" if done < len(runs) else "")


def table(groups: dict[str, list[Run]]) -> str:
    columns = summary_columns()
    titles = ["group", "runs", *(c.title for c in columns)]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for name, runs in groups.items():
        cells = [f"`{name}`", runs_cell(runs)]
        cells += [mean_std([c.per_run(r) for r in runs], c.digits) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- LaTeX ---------------------------------------------------------------------------------

LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(char, char) for char in text)


def group_means(groups: dict[str, list[Run]], column: Column) -> dict[str, float]:
    means = {}
    for name, runs in groups.items():
        values = [v for v in (column.per_run(r) for r in runs) if not math.isnan(v)]
        means[name] = statistics.mean(values) if values else math.nan
    return means


def best_group(means: dict[str, float], better: str | None) -> str | None:
    ranked = {name: m for name, m in means.items() if not math.isnan(m)}
    if better is None or not ranked:
        return None
    return (max if better == "max" else min)(ranked, key=ranked.get)


def latex_cell(values: list[float], digits: int, bold: bool) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "--"
    mean = f"{statistics.mean(values):.{digits}f}"
    mean = rf"\textbf{{{mean}}}" if bold else mean
    if len(values) == 1:
        return f"${mean}$"
    return rf"${mean} \pm {statistics.stdev(values):.{digits}f}$"


def latex_table(groups: dict[str, list[Run]]) -> str:
    """A booktabs tabular (mean ± std over seeds), one row per group, best of each column bold."""
    columns = summary_columns()
    best = {c.title: best_group(group_means(groups, c), c.better) for c in columns}
    header = ["group", "runs", *(latex_escape(c.title) for c in columns)]
    lines = [
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for name, runs in groups.items():
        cells = [latex_escape(name), latex_escape(runs_cell(runs))]
        for c in columns:
            values = [c.per_run(r) for r in runs]
            cells.append(latex_cell(values, c.digits, best[c.title] == name))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


# --- curves with uncertainty -----------------------------------------------------------------


@dataclass
class Band:
    """A group's curve: x (round or mean cumulative MB), the mean over seeds, and the band."""

    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def group_colours(names) -> dict[str, tuple]:
    """One colour per group, from the sorted names, so it is the same in every figure."""
    palette = plt.get_cmap("tab10").colors
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(names))}


def points_by_round(runs: list[Run], key: str, x_key: str) -> dict[float, list[tuple]]:
    """(x, metric) of every seed at each evaluated round; x in MB for comm/total_bytes."""
    by_round: dict[float, list[tuple]] = {}
    for run in runs:
        for row in run.rows:
            y = row.get(key, math.nan)
            if math.isnan(y):
                continue
            x = row["round"] if x_key == "round" else row.get(x_key, math.nan) / 1e6
            by_round.setdefault(row["round"], []).append((x, y))
    return by_round


def bootstrap_interval(values: np.ndarray) -> tuple[float, float]:
    """Seeded 95 % bootstrap interval of the mean (the mean itself where it cannot vary)."""
    if len(values) < 2 or np.ptp(values) == 0:
        return float(np.mean(values)), float(np.mean(values))
    result = stats.bootstrap(
        (values,),
        np.mean,
        n_resamples=BOOTSTRAP_RESAMPLES,
        confidence_level=0.95,
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    low, high = result.confidence_interval
    if math.isnan(low) or math.isnan(high):  # BCa degenerate on tiny samples
        return float(np.mean(values)), float(np.mean(values))
    return float(low), float(high)


def curve_band(runs: list[Run], key: str, x_key: str = "round", ci: bool = False) -> Band:
    """Mean over seeds per evaluated round, with ± std (sample std) or the bootstrap CI."""
    by_round = points_by_round(runs, key, x_key)
    x, mean, low, high = [], [], [], []
    for r in sorted(by_round):
        xs = np.array([p[0] for p in by_round[r]])
        ys = np.array([p[1] for p in by_round[r]])
        x.append(float(np.mean(xs)))
        mean.append(float(np.mean(ys)))
        if ci:
            lo, hi = bootstrap_interval(ys)
        else:
            spread = float(np.std(ys, ddof=1)) if len(ys) > 1 else 0.0
            lo, hi = mean[-1] - spread, mean[-1] + spread
        low.append(lo)
        high.append(hi)
    return Band(*(np.array(a) for a in (x, mean, low, high)))


def save_figure(figure, png: Path) -> None:
    """The figure as PNG and, beside it, as PDF (for papers)."""
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    figure.savefig(png.with_suffix(".pdf"))
    plt.close(figure)


def plot_curves(
    groups: dict[str, list[Run]],
    x_key: str,
    xlabel: str,
    path: Path,
    colours: dict[str, tuple] | None = None,
    ci: bool = False,
) -> dict[tuple[str, str], Band]:
    """Mean accuracy per group (over its seeds) with a shaded band against rounds or MB, one
    panel per accuracy; returns the plotted bands by (accuracy, group)."""
    colours = colours or group_colours(groups)
    bands = {}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, key in zip(axes[0], ("val/global_acc", "val/personal_acc"), strict=True):
        for name, runs in groups.items():
            band = bands[key, name] = curve_band(runs, key, x_key, ci)
            colour = colours[name]
            ax.plot(band.x, band.mean, marker="o", markersize=3, label=name, color=colour)
            ax.fill_between(band.x, band.low, band.high, color=colour, alpha=0.2, linewidth=0)
        if x_key == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.set_xscale("log")  # algorithms differ by orders of magnitude in bytes sent
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key + (" (95 % bootstrap CI)" if ci else " (± std)"))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(figure, path)
    return bands


def plot_clients(
    groups: dict[str, list[Run]], path: Path, colours: dict[str, tuple] | None = None
) -> None:
    """Distribution of the final per-client personal accuracy, pooled over each group's seeds."""
    colours = colours or group_colours(groups)
    names = [name for name, runs in groups.items() if any(r.per_client_acc for r in runs)]
    figure, ax = plt.subplots(figsize=(max(5, 1.6 * len(names)), 4))
    data = [[acc for run in groups[name] for acc in run.per_client_acc] for name in names]
    if data:
        boxes = ax.boxplot(data, patch_artist=True)
        for box, name in zip(boxes["boxes"], names, strict=True):
            box.set_facecolor(colours[name])
            box.set_alpha(0.6)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("final personal accuracy per client")
    ax.grid(alpha=0.3, axis="y")
    save_figure(figure, path)


# --- significance against a baseline ---------------------------------------------------------


@dataclass
class Comparison:
    """A group's values against the baseline's: Welch's t-test over seeds."""

    difference: float = math.nan  # mean(group) - mean(baseline)
    low: float = math.nan  # 95 % confidence interval of the difference
    high: float = math.nan
    p_value: float = math.nan
    note: str = ""


def welch_comparison(values: list[float], baseline: list[float]) -> Comparison:
    """Welch's t-test (unequal variances); the CI uses the Welch–Satterthwaite df."""
    values = [v for v in values if not math.isnan(v)]
    baseline = [v for v in baseline if not math.isnan(v)]
    smallest = min(len(values), len(baseline))
    if smallest < 2:
        return Comparison(note=f"no test: {smallest} run(s) on one side, a variance needs 2")
    result = stats.ttest_ind(values, baseline, equal_var=False)
    interval = result.confidence_interval(confidence_level=0.95)
    note = "fewer than 3 seeds: the test has little power" if smallest < 3 else ""
    difference = statistics.mean(values) - statistics.mean(baseline)
    return Comparison(difference, interval.low, interval.high, float(result.pvalue), note)


def find_baseline(groups: dict[str, list[Run]], override: str) -> str:
    """The one group whose overrides contain `override`; refused if none or several do."""
    matches = [name for name, runs in groups.items() if override in runs[0].overrides]
    if len(matches) != 1:
        found = "no group" if not matches else f"{len(matches)} groups ({', '.join(matches)})"
        raise ReportError(f"--baseline {override} matches {found}; it must match exactly one")
    return matches[0]


def comparison_cell(comparison: Comparison) -> str:
    if math.isnan(comparison.difference):
        return "–"
    return f"{comparison.difference:+.3f} [{comparison.low:+.3f}, {comparison.high:+.3f}]"


def significance_table(groups: dict[str, list[Run]], baseline: str, metric: str) -> str:
    titles = ["group", "runs", "Δ final [95 % CI]", "p (final)", "Δ best [95 % CI]", "p (best)"]
    lines = [
        f"## Against the baseline `{baseline}` ({metric}, Welch's t-test over seeds)",
        "",
        "| " + " | ".join([*titles, "note"]) + " |",
        "|" + "---|" * (len(titles) + 1),
    ]
    base = groups[baseline]
    for name, runs in groups.items():
        if name == baseline:
            continue
        final = welch_comparison([r.final(metric) for r in runs], [r.final(metric) for r in base])
        best = welch_comparison([r.best(metric) for r in runs], [r.best(metric) for r in base])
        notes = sorted({final.note, best.note} - {""})
        cells = [f"`{name}`", str(len(runs)), comparison_cell(final), _p(final)]
        cells += [comparison_cell(best), _p(best), "; ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _p(comparison: Comparison) -> str:
    return "–" if math.isnan(comparison.p_value) else f"{comparison.p_value:.3g}"


# --- time to accuracy -------------------------------------------------------------------------


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
    """Where a run first reached the target: the evaluated round and the cumulative MB."""

    round: float
    megabytes: float


def time_to_target(run: Run, target: Target) -> Reached | None:
    """The first evaluated round whose metric reaches the target (None: not reached): at or
    above it, or at or below it for a lower-is-better metric (loss, ...)."""
    lower_is_better = any(tag in target.metric for tag in LOWER_IS_BETTER)
    for row in run.rows:
        value = row.get(target.metric, math.nan)
        if math.isnan(value):
            continue
        if (value <= target.value) if lower_is_better else (value >= target.value):
            return Reached(row["round"], row.get("comm/total_bytes", math.nan) / 1e6)
    return None


def time_to_target_table(groups: dict[str, list[Run]], target: Target) -> str:
    lines = [
        f"## Time to {target.metric} reaching {target.value:g}",
        "",
        "| group | reached | round | MB sent | per run (round, MB) |",
        "|---|---|---|---|---|",
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
            per_run,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- the report -------------------------------------------------------------------------------


def check_metric(runs: list[Run], metric: str, option: str) -> None:
    if runs and not any(metric in row for run in runs for row in run.rows):
        raise ReportError(f"{option} {metric}: no run has this metric in its metrics.csv")


def write_plots(groups: dict[str, list[Run]], out: Path, ci: bool = False) -> list[str]:
    """Every figure as PNG and PDF, group colours shared; returns the PNG names."""
    colours = group_colours(groups)
    plots = {
        "accuracy_vs_round.png": lambda p: plot_curves(groups, "round", "round", p, colours, ci),
        "accuracy_vs_mb.png": lambda p: plot_curves(
            groups, "comm/total_bytes", "cumulative MB sent", p, colours, ci
        ),
        "per_client_accuracy.png": lambda p: plot_clients(groups, p, colours),
    }
    for name, draw in plots.items():
        draw(out / name)
    return list(plots)


def write_report(
    paths: list[Path],
    out: Path | None = None,
    *,
    metric: str = MAIN_METRIC,
    baseline: str | None = None,
    target: str | None = None,
    ci: bool = False,
) -> Path:
    """Write report.md, report.tex and the plots into `out` (default: the first PATH); returns
    report.md. Raises ReportError for a --baseline, --target or --metric that cannot be used."""
    out = Path(out or paths[0])
    goal = parse_target(target, metric) if target is not None else None
    runs, broken = find_runs(paths)
    groups = group_runs(runs)
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
        f"{len(runs)} runs in {len(groups)} groups (grouped by overrides without `seed`; "
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep folders")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: PATH)")
    parser.add_argument("--metric", default=MAIN_METRIC, help="main metric (%(default)s)")
    parser.add_argument("--baseline", help="override of the baseline group, e.g. alg=fedavg")
    parser.add_argument("--target", help="time-to-accuracy target: 0.8 or KEY=0.8")
    parser.add_argument("--ci", action="store_true", help="bootstrap 95 %% CI bands, not ± std")
    args = parser.parse_args(argv)
    try:
        report = write_report(
            args.paths,
            args.out,
            metric=args.metric,
            baseline=args.baseline,
            target=args.target,
            ci=args.ci,
        )
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(report.read_text())
    print(f"report written to {report}")


if __name__ == "__main__":
    main()
