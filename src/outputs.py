"""The run folder's files: metrics.csv (one row per evaluated round) and summary.json."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

# Metrics where lower is better; every other metric's best value is its maximum.
LOWER_IS_BETTER = ("loss", "ppl", "time/", "bytes", "dropped")


class RoundRecorder:
    """Collects the evaluated rounds and rewrites `metrics.csv` after each one."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.rows: list[dict] = []

    def record(self, round_done: int, metrics: dict) -> None:
        self.rows.append({"round": round_done, **{k: float(v) for k, v in metrics.items()}})
        if self.path is None:
            return
        columns = ["round"] + sorted({k for row in self.rows for k in row} - {"round"})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)


def summarize(rows: list[dict]) -> dict:
    """Final and best value of every metric over the evaluated rounds."""
    final, best = {}, {}
    for key in sorted({k for row in rows for k in row} - {"round"}):
        values = [
            (row["round"], row[key]) for row in rows if key in row and not math.isnan(row[key])
        ]
        if not values:
            continue
        final[key] = values[-1][1]
        pick = min if any(tag in key for tag in LOWER_IS_BETTER) else max
        best_round, best_value = pick(values, key=lambda rv: rv[1])
        best[key] = {"value": best_value, "round": best_round}
    return {"final": final, "best": best}


def write_summary(path: str | Path, **fields) -> dict:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields, indent=2, default=str))
    return fields
