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

Modules: `runs` (reading and grouping run folders), `tables` (the markdown and LaTeX tables),
`figures` (curves with bands, group colours, the plots), `significance` (Welch's t-test against a
baseline), `time_to_accuracy` (the --target table), `cli` (write_report and the command line),
`errors` (ReportError).
"""

from src.report.cli import main
from src.report.figures import (
    bootstrap_interval,
    curve_band,
    group_colours,
    plot_client_spread,
    plot_curves,
)
from src.report.runs import find_runs, group_runs
from src.report.significance import welch_comparison
from src.report.tables import latex_escape
from src.report.time_to_accuracy import Target, parse_target, time_to_target

__all__ = [
    "Target",
    "bootstrap_interval",
    "curve_band",
    "find_runs",
    "group_colours",
    "group_runs",
    "latex_escape",
    "main",
    "parse_target",
    "plot_client_spread",
    "plot_curves",
    "time_to_target",
    "welch_comparison",
]
