"""Significance against a baseline group: Welch's t-test over seeds on the final and best value
of the main metric, with the 95 % confidence interval of the difference."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

from src.report.errors import ReportError
from src.report.runs import Run


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
