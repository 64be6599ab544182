"""The learning tests' margins: every test marked `learning` run under several seeds and thread
counts, and the final metrics of each of its runs side by side.

    python -m benchmarks.learning_margins                    # make-test ones, seeds 0-2, threads 1, 2
    python -m benchmarks.learning_margins --slow --seeds 0 1 2 3 --threads 1 2

A learning threshold must sit clearly under the smallest value seen here (the tests' comments quote
these spreads): a model trained from scratch for a few rounds lands in different places with other
float summation orders, and other CPUs sum in other orders. Results in
benchmarks/results/learning_margins.{jsonl,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METRICS = ("val/global_acc", "val/personal_acc", "val/loss")


def run_combo(seed: int, threads: int, slow: bool, out: Path) -> int:
    env = {
        **os.environ,
        "FEDSWEEP_TEST_OVERRIDES": f"seed={seed} trainer.threads={threads}",
        "FEDSWEEP_MARGINS_FILE": str(out),
    }
    marker = "learning" if slow else "learning and not slow"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    print(f"seed={seed} threads={threads}: {done.stdout.strip().splitlines()[-1]}", flush=True)
    return done.returncode


def table(rows: list[dict]) -> str:
    """One line per (test, run of that test, metric): the value under every seed/threads combo."""
    last: dict[tuple, dict] = {}
    for row in rows:  # the last evaluated round of each run
        last[(row["test"], " ".join(row["overrides"]), row["run"])] = row
    runs: dict[tuple, dict[str, float]] = defaultdict(dict)
    order: dict[tuple, list] = defaultdict(list)
    for (test, combo, run), row in last.items():
        order[(test, combo)].append(run)
        index = sorted(order[(test, combo)]).index(run)
        for metric in METRICS:
            if metric in row:
                runs[(test, index, metric)][combo] = row[metric]
    combos = sorted({combo for _, combo, _ in last})
    lines = ["| test (run) | metric | min | median | max | " + " | ".join(combos) + " |"]
    lines.append("|" + "---|" * (5 + len(combos)))
    for (test, index, metric), values in sorted(runs.items()):
        seen = sorted(values.values())
        cells = " | ".join(f"{values[c]:.3f}" if c in values else "-" for c in combos)
        name = test.split("::", 1)[-1]
        lines.append(
            f"| {name} ({index}) | {metric} | {seen[0]:.3f} | {seen[len(seen) // 2]:.3f} | "
            f"{seen[-1]:.3f} | {cells} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--slow", action="store_true", help="the slow learning tests too")
    parser.add_argument("--jobs", type=int, default=1, help="combos run at once")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "learning_margins.jsonl"
    out.unlink(missing_ok=True)
    combos = list(itertools.product(args.seeds, args.threads))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda c: run_combo(*c, args.slow, out), combos))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    text = table(rows)
    (RESULTS / "learning_margins.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
