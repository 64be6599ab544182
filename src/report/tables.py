"""The summary table, mean ± std over each group's runs: as markdown (report.md) and as a
booktabs LaTeX tabular with the best of each column in bold (report.tex)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from src.report.runs import Run

ACCURACIES = ("val/global_acc", "val/personal_acc", "val/personal_acc_p10")


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


def summary_columns(groups: dict[str, list[Run]] | None = None) -> list[Column]:
    """The table's columns: the accuracies, and for text runs (a run of `groups` logged
    `val/ppl`) the loss and perplexity too, then rounds, MB and wall time."""
    columns = []
    for key in ACCURACIES:
        name = key.removeprefix("val/")
        columns.append(Column(f"final {name}", lambda r, k=key: r.final(k)))
        columns.append(Column(f"best {name}", lambda r, k=key: r.best(k)))
    runs = [run for group in (groups or {}).values() for run in group]
    if any("val/ppl" in row for run in runs for row in run.rows):  # text: lower is better
        for key, digits in (("val/loss", 3), ("val/ppl", 2)):
            name = key.removeprefix("val/")
            columns.append(Column(f"final {name}", lambda r, k=key: r.final(k), digits, "min"))
            columns.append(Column(f"best {name}", lambda r, k=key: r.best(k), digits, "min"))
    return columns + [
        Column("rounds", lambda r: r.rounds, 1, None),
        Column("MB sent", lambda r: r.megabytes, 3, "min"),
        Column("wall time (s)", lambda r: r.summary.get("wall_time_s", math.nan), 1, "min"),
    ]


def runs_cell(runs: list[Run]) -> str:
    done = sum(run.finished for run in runs)
    return f"{len(runs)}" + (f" ({len(runs) - done} running)" if done < len(runs) else "")


def table(groups: dict[str, list[Run]]) -> str:
    columns = summary_columns(groups)
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
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    if round(spread, digits) == 0:  # one run, or runs that agree to the digits shown
        return f"${mean}$"
    return rf"${mean} \pm {spread:.{digits}f}$"


def tied_best(means: dict[str, float], better: str | None, digits: int) -> set[str]:
    """The groups whose mean, at the digits shown, equals the best one's: all of them bold."""
    best = best_group(means, better)
    if best is None:
        return set()
    shown = round(means[best], digits)
    return {name for name, m in means.items() if not math.isnan(m) and round(m, digits) == shown}


def latex_table(groups: dict[str, list[Run]]) -> str:
    """A booktabs table (mean ± std over seeds) with a caption and a label, scaled to the
    column's width: one row per group, the best of each column bold (ties too)."""
    columns = summary_columns(groups)
    best = {c.title: tied_best(group_means(groups, c), c.better, c.digits) for c in columns}
    header = ["group", "runs", *(latex_escape(c.title) for c in columns)]
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\caption{Final metrics: mean and standard deviation over seeds (the best of each "
        r"column in bold).}",
        r"\label{tab:fedsweep}",
        r"\resizebox{\columnwidth}{!}{%",
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for name, runs in groups.items():
        cells = [latex_escape(name), latex_escape(runs_cell(runs))]
        for c in columns:
            values = [c.per_run(r) for r in runs]
            cells.append(latex_cell(values, c.digits, name in best[c.title]))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}", ""]
    return "\n".join(lines)
