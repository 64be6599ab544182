"""The end of a sweep: one line listing the jobs that failed, and a non-zero exit code.

Registered as a Hydra callback (conf/config.yaml, `hydra.callbacks`); a failed job has already
written `"status": "failed"` and its error into its own summary.json (src/run.py).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

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
