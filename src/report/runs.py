"""Reading run folders (metrics.csv, summary.json, .hydra/overrides.yaml) and grouping them by
their overrides without seed."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from src.outputs import summarize
from src.run_names import NOISE_KEYS, override_key


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

    def client_acc_by_round(self) -> dict[int, list[float]]:
        """Each evaluated round's per-client personal accuracies, from clients.csv (empty for a
        run written before it existed)."""
        path = self.folder / "clients.csv"
        if not path.is_file():
            return {}
        found: dict[int, list[float]] = {}
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row["personal_acc"]:
                    found.setdefault(int(row["round"]), []).append(float(row["personal_acc"]))
        return found

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
    kept = [o for o in overrides or [] if override_key(o) != "seed"]
    return Run(folder, kept, rows, summary)


def common_overrides(runs: list[Run]) -> list[str]:
    """The overrides every run shares (shown once, above the table)."""
    if not runs:
        return []
    shared = set.intersection(*(set(run.overrides) for run in runs))
    return [o for o in runs[0].overrides if o in shared]


def varying_keys(runs: list[Run]) -> list[str]:
    """The keys whose value differs between runs (a key a run does not override counts as its
    default), without seed and the keys that do not change what a run computes (trainer.*,
    logger.*, paths.*, ...: src/run_names.py); in the order they first appear."""
    values: dict[str, set] = {}
    for run in runs:
        for override in run.overrides:
            key = override_key(override)
            if key.split(".")[0] not in NOISE_KEYS:
                values.setdefault(key, set())
    for key in values:
        for run in runs:
            given = [o.split("=", 1)[-1] for o in run.overrides if override_key(o) == key]
            values[key].add(given[-1] if given else None)
    return [key for key, seen in values.items() if len(seen) > 1]


def group_runs(runs: list[Run], labels: dict[str, str] | None = None) -> dict[str, list[Run]]:
    """Runs with the same values of the keys that vary (apart from seed), named by those values
    (or by `labels`, which renames groups); in the order of the sweep's job numbers."""
    keys = varying_keys(runs)
    labels = labels or {}
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: _job_number(r.folder)):
        shown = [o for o in run.overrides if override_key(o) in keys]
        name = " ".join(shown) or "(all the same)"
        run.group = labels.get(name, name)
        groups.setdefault(run.group, []).append(run)
    return groups


def _job_number(folder: Path) -> tuple:
    """Hydra names sweep jobs `<number>_<overrides>`: sort 2 before 10."""
    head = folder.name.split("_", 1)[0]
    return (int(head), str(folder)) if head.isdigit() else (1 << 30, str(folder))
