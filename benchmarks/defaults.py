"""Do the defaults learn? Every algorithm (conf/alg) on ``model=vit_small32 data=digits`` with
otherwise default keys (the model's client optimizer, 20 rounds, Dirichlet 0.5 label skew), one
run each, as a new user would start it. Prints, per algorithm, val/personal_acc and
val/global_acc after round 5 and after the last round, and the first round at which
val/personal_acc reached the target.

    python -m benchmarks.defaults [overrides ...] [--target 0.5] [--algs fedavg ditto ...]
    python -m benchmarks.defaults fl.num_clients=10 optim=sgd   # e.g. the old default optimizer

Runs on the CPU with the csv logger, one run after the other (about 35 minutes on 2 cores, perfed,
which trains every client every round, 20 of them).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = sorted(p.stem for p in (ROOT / "conf" / "alg").glob("*.yaml"))
BASE = [
    "model=vit_small32",
    "data=digits",
    "trainer=cpu",
    "logger=csv",
    "trainer.enable_progress_bar=false",
]
EARLY_ROUND = 5


def read_curve(run_dir: Path) -> list[dict[str, float]]:
    """The evaluated rounds of a run's metrics.csv, as floats (empty cells dropped)."""
    with open(run_dir / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return [row for row in rows if "val/personal_acc" in row]


def first_round_reaching(curve: list[dict[str, float]], target: float) -> int | None:
    return next((int(r["round"]) for r in curve if r["val/personal_acc"] >= target), None)


def at_round(curve: list[dict[str, float]], round_idx: int) -> dict[str, float]:
    """The last evaluation at or before ``round_idx``."""
    return [r for r in curve if r["round"] <= round_idx][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.5, help="val/personal_acc to reach")
    parser.add_argument("--algs", nargs="+", default=ALGORITHMS, choices=ALGORITHMS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to every run")
    args = parser.parse_args()

    print(f"model=vit_small32 data=digits {' '.join(args.overrides)}".strip())
    header = (
        f"| alg | personal r{EARLY_ROUND} | global r{EARLY_ROUND} | personal last | global last"
        f" | first round ≥ {args.target} | time |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    with tempfile.TemporaryDirectory() as tmp:
        for alg in args.algs:
            run_dir = Path(tmp) / alg
            command = [sys.executable, "-m", "src.run", f"alg={alg}", *BASE, *args.overrides]
            started = time.perf_counter()
            done = subprocess.run(
                [*command, f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True
            )
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                print(
                    f"| {alg} | failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1]} |"
                )
                continue
            curve = read_curve(run_dir)
            early, last = at_round(curve, EARLY_ROUND), curve[-1]
            reached = first_round_reaching(curve, args.target)
            reached_text = str(reached) if reached is not None else f"not in {int(last['round'])}"
            print(
                f"| {alg} | {early['val/personal_acc']:.3f} | {early['val/global_acc']:.3f}"
                f" | {last['val/personal_acc']:.3f} | {last['val/global_acc']:.3f}"
                f" | {reached_text} | {seconds:.0f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
