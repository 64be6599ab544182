"""The run folder's files: metrics.csv (one row per evaluated round), clients.csv (one row per
client and round it trained or was scored in) and summary.json."""

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


CLIENT_COLUMNS = [
    "round",  # 1-based, as metrics.csv
    "client",
    "sampled",  # 1: its upload was aggregated this round (perfed also trains unsampled clients)
    "trained",  # 1: it trained this round
    "dropped",  # why it was dropped (a fault, an error, a non-finite upload); empty if not
    "malicious",  # 1: a client of the attack
    "train_samples",
    "personal_acc",  # its deployed model on its local test split, where this round evaluated it
]


class ClientRecorder:
    """Appends each round's clients to `clients.csv`: the clients that trained (sampled or not,
    dropped or not) and, in an evaluated round, every scored client with its accuracy. The rows
    of rounds after a resumed checkpoint's are cut, so a resumed run writes the same file."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None

    def record(self, rows: list[dict]) -> None:
        if self.path is None or not rows:
            return
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CLIENT_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def keep_rounds(self, rounds_done: int, source: Path | None = None) -> None:
        """At resume: the rows of the first `rounds_done` rounds, from this run's file or, for a
        run resumed into a new folder, from `source` (the checkpoint's run's clients.csv)."""
        if self.path is None:
            return
        found = self.path if self.path.is_file() else source
        if found is None or not found.is_file():
            return
        with found.open(newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["round"]) <= rounds_done]
        self.path.unlink(missing_ok=True)
        self.record(rows)


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
