"""Compare runs offline: `python -m src.report PATH [PATH ...]`.

PATH is a run folder or a sweep folder (searched recursively for runs, i.e. folders holding a
`metrics.csv`). Runs are grouped by their overrides minus `seed`; for each group `report.md`
gets mean ± std over seeds of the final and best accuracies, rounds, MB sent and wall time, and
PNG plots (accuracy vs round, accuracy vs MB communicated, per-client accuracy box plot) are
written next to it. Runs still in progress (no summary.json yet) are read from their metrics.csv;
folders that cannot be read are listed in the report, not fatal.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from src.outputs import summarize  # noqa: E402

ACCURACIES = ("val/global_acc", "val/personal_acc", "val/personal_acc_p10")


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


def table(groups: dict[str, list[Run]]) -> str:
    columns = ["group", "runs"]
    for key in ACCURACIES:
        name = key.removeprefix("val/")
        columns += [f"final {name}", f"best {name}"]
    columns += ["rounds", "MB sent", "wall time (s)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, runs in groups.items():
        done = sum(run.finished for run in runs)
        cells = [
            f"`{name}`",
            f"{len(runs)}" + (f" ({len(runs) - done} running)" if done < len(runs) else ""),
        ]
        for key in ACCURACIES:
            cells += [mean_std([r.final(key) for r in runs]), mean_std([r.best(key) for r in runs])]
        cells += [
            mean_std([r.rounds for r in runs], 1),
            mean_std([r.megabytes for r in runs], 3),
            mean_std([r.summary.get("wall_time_s", math.nan) for r in runs], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(groups: dict[str, list[Run]], x_key: str, xlabel: str, path: Path) -> None:
    """Mean accuracy per group (over its seeds) against rounds or MB, one panel per accuracy."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, key in zip(axes[0], ("val/global_acc", "val/personal_acc"), strict=True):
        for name, runs in groups.items():
            rounds = sorted({row["round"] for run in runs for row in run.rows if key in row})
            xs, ys = [], []
            for r in rounds:
                points = [
                    (row[x_key] if x_key != "round" else r, row[key])
                    for run in runs
                    for row in run.rows
                    if row["round"] == r and not math.isnan(row.get(key, math.nan))
                ]
                if points:
                    xs.append(statistics.mean(p[0] for p in points))
                    ys.append(statistics.mean(p[1] for p in points))
            if x_key == "comm/total_bytes":
                xs = [x / 1e6 for x in xs]
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
        if x_key == "comm/total_bytes":
            ax.set_xscale("log")  # algorithms differ by orders of magnitude in bytes sent
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_clients(groups: dict[str, list[Run]], path: Path) -> None:
    """Distribution of the final per-client personal accuracy, pooled over each group's seeds."""
    names = [name for name, runs in groups.items() if any(r.per_client_acc for r in runs)]
    figure, ax = plt.subplots(figsize=(max(5, 1.6 * len(names)), 4))
    data = [[acc for run in groups[name] for acc in run.per_client_acc] for name in names]
    if data:
        ax.boxplot(data)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("final personal accuracy per client")
    ax.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(paths: list[Path], out: Path | None = None) -> Path:
    """Write report.md and the plots into `out` (default: the first PATH); returns report.md."""
    out = Path(out or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    runs, broken = find_runs(paths)
    groups = group_runs(runs)
    plots = {
        "accuracy_vs_round.png": lambda p: plot_curves(groups, "round", "round", p),
        "accuracy_vs_mb.png": lambda p: plot_curves(groups, "comm/total_bytes", "MB sent", p),
        "per_client_accuracy.png": lambda p: plot_clients(groups, p),
    }
    for name, draw in plots.items():
        draw(out / name)
    common = " ".join(common_overrides(runs)) or "none"
    text = [
        "# fedsweep report",
        "",
        f"{len(runs)} runs in {len(groups)} groups (grouped by overrides without `seed`; "
        "mean ± std over the group's runs) from " + ", ".join(f"`{p}`" for p in paths) + ".",
        f"Overrides shared by all runs: `{common}`.",
        "",
        table(groups) if groups else "No runs found.\n",
        *(f"![{name}]({name})" for name in plots),
        "",
    ]
    if broken:
        text += ["## Skipped", "", *(f"- {note}" for note in broken), ""]
    report = out / "report.md"
    report.write_text("\n".join(text))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep folders")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: PATH)")
    args = parser.parse_args(argv)
    report = write_report(args.paths, args.out)
    print(report.read_text())
    print(f"report written to {report}")


if __name__ == "__main__":
    main()
