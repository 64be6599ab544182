"""A sweep's progress and end: one line per finished job (job i/N, its overrides, its final
metric, its time); at the end a table of every job (the overrides that vary, the final metric,
the time) and the command that compares them, then one line listing the jobs that failed and a
non-zero exit code.

Registered as Hydra callbacks (conf/config.yaml, `hydra.callbacks`); every job has written its
status, final metrics and wall time (or its error) into its own summary.json (src/run.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from src.run_names import SWEEP_KEYS_ENV, override_key

log = logging.getLogger("fedsweep")


def failed_jobs(sweep_dir: Path) -> list[str]:
    """The job folders under `sweep_dir` whose summary.json says the job failed."""
    failed = []
    for summary in sorted(sweep_dir.glob("**/summary.json")):
        try:
            status = json.loads(summary.read_text()).get("status")
        except (OSError, json.JSONDecodeError):
            status = "unreadable"
        if status != "completed":
            failed.append(str(summary.parent.relative_to(sweep_dir)))
    return failed


class FailedJobsReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        failed = failed_jobs(Path(config.hydra.sweep.dir))
        if failed:
            log.error(
                "%d job(s) of the sweep failed (error in each summary.json): %s",
                len(failed),
                ", ".join(failed),
            )
            sys.exit(1)


def sweep_plan(overrides: list[str]) -> tuple[int | None, set[str]]:
    """(how many jobs the basic sweeper makes of these command-line overrides: the product of
    the sweep lists' lengths, None where it cannot be counted (ranges, intervals); the keys that
    vary across the sweep)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    sweeps = [o for o in parsed if o.is_sweep_override()]
    keys = {o.get_key_element() for o in sweeps}
    if not all(o.is_discrete_sweep() for o in sweeps):
        return None, keys
    return math.prod(len(list(o.sweep_string_iterator())) for o in sweeps), keys


def job_line(done: int, total: int | None, overrides: list[str], summary: dict, metric: str) -> str:
    """One finished job: `job 3/8 alg=fedlora seed=1: val/personal_acc 0.812 in 12.3 s`."""
    count = f"{done}/{total}" if total else str(done)
    status = summary.get("status", "no summary.json")
    if status == "completed":
        value = summary.get("final", {}).get(metric)
        outcome = f"{metric} {value:.4g}" if isinstance(value, int | float) else f"no {metric}"
    else:  # the first line of the job's error (all of it is in its summary.json)
        error = str(summary.get("error", "")).strip().splitlines()
        outcome = f"{status.upper()}: {error[0][:160]}" if error else status.upper()
    seconds = summary.get("wall_time_s")
    took = f" in {seconds:.1f} s" if isinstance(seconds, int | float) else ""
    return f"job {count} {' '.join(overrides)}: {outcome}{took}"


def results_table(rows: list[tuple[dict[str, str], dict]], metric: str) -> str:
    """The finished jobs as an aligned table: one row per job, a column per override that varies,
    the final `metric` (or the job's status), the time."""
    keys = sorted({key for overrides, _ in rows for key in overrides})
    header = ["#", *keys, metric, "time (s)"]
    lines = [header]
    for number, (overrides, summary) in enumerate(rows, start=1):
        value = summary.get("final", {}).get(metric)
        if summary.get("status") != "completed":
            shown = str(summary.get("status", "no summary.json")).upper()
        else:
            shown = f"{value:.4g}" if isinstance(value, int | float) else "-"
        seconds = summary.get("wall_time_s")
        took = f"{seconds:.1f}" if isinstance(seconds, int | float) else "-"
        lines.append([str(number), *(overrides.get(k, "") for k in keys), shown, took])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


class SweepProgress(Callback):
    """Prints one line per finished job of a multirun, so a long sweep can be followed, and a
    table of all of them at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.done = 0
        self.rows: list[tuple[dict[str, str], dict]] = []
        # the command line's sweeps and a preset's hydra.sweeper.params (experiment=..._cpu)
        params = config.hydra.sweeper.get("params") or {}
        task = list(config.hydra.overrides.task)
        given = {o.get_key_element() for o in OverridesParser.create().parse_overrides(task)}
        # as the basic sweeper: a key on the command line replaces the preset's sweep of it
        overrides = [*task, *(f"{k}={v}" for k, v in params.items() if k not in given)]
        self.total, self.varying = sweep_plan(overrides)
        # the jobs' folders and W&B names show these keys only (src/run_names.py)
        os.environ[SWEEP_KEYS_ENV] = ",".join(sorted(self.varying))
        if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
            self.total = None  # e.g. Optuna: as many jobs as its n_trials, not a product

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        os.environ.pop(SWEEP_KEYS_ENV, None)
        rows = getattr(self, "rows", [])
        if rows:
            sweep_dir = config.hydra.sweep.dir
            print(f"\nsweep of {len(rows)} jobs in {sweep_dir}:", flush=True)
            print(results_table(rows, config.optimized_metric), flush=True)
            print(f"compare them: python -m src.report {sweep_dir}", flush=True)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode is None or config.hydra.mode.name != "MULTIRUN":
            return
        self.done = getattr(self, "done", 0) + 1
        summary_path = Path(config.paths.output_dir) / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        varying = getattr(self, "varying", None)  # a sweeper's own (e.g. Optuna): all shown
        shown = [o for o in job_return.overrides if not varying or override_key(o) in varying]
        if hasattr(self, "rows"):
            self.rows.append((dict(o.split("=", 1) for o in shown if "=" in o), summary))
        line = job_line(
            self.done, getattr(self, "total", None), shown, summary, config.optimized_metric
        )
        print(line, flush=True)  # stdout, whatever the job's logging settings
