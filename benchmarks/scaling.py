"""Scaling with the number of clients at a fixed cohort (cross-device): N = 100, 1,000 and 10,000
clients, 100 sampled per round (`--per-round`), every client holding the same 10 samples (8 train
+ 2 local test; the pool grows with N, so a sampled client's work is the same at every N: one
batch of 8 per local epoch), vit_small32 on 28 px synthetic images, iid.

Two algorithms: fedavg (nothing per client) and ditto, the personalised one whose round costs the
cohort only: it keeps a whole personal model per client (0.8 M floats, 3.2 MB; 32 GB for 10,000
clients that have all trained), the client state store's heavy case. perfed keeps the same, but
its reference trains every client each round (`alg.train_all_clients=true`, perfed.py's
`trains_unsampled`): a round there is O(N) by definition.

Each case runs in a process of its own (a clean peak memory), `--rounds` rounds with a
checkpoint after each, and reports:
  setup (s)        build_module: data generation, partition, model (partition: Federation.build);
  round (s)        the orchestrator's time/round_s (sampling, training, aggregation), mean over
                   the rounds after the first (which warms up);
  checkpoint (s)   writing checkpoints/last.ckpt (and the client states it refers to), mean
                   over the same rounds; checkpoint (MB): its size after the last round;
  peak RSS (MB)    the process's peak resident memory while fitting (reset after setup) and
                   during setup;
  states           the client state store at the end: clients with a state of their own, MB in
                   memory (ditto: within `--budget-gb`, fl.client_state_memory_gb) and on disk.
Evaluation (the last round: fl.eval_clients=100) is in none of the times.

    python -m benchmarks.scaling [--clients 100 1000 10000] [--algs fedavg ditto]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench import RESULTS, RoundTimes, compose_case
from src.engine import data as federated_data
from src.engine.checkpoint import LastRoundCheckpoint
from src.run import build_module, build_trainer, set_threads

SAMPLES_PER_CLIENT = 10  # 8 train + 2 local test (partitioner.test_fraction=0.2)
CASE = [
    "model=vit_small32",
    "data=synthetic",
    "data.loader.num_test=1000",
    "partitioner=iid",  # Dirichlet cannot give 10,000 clients >= 2 samples each of a small pool
    "fl.batch_size=8",
    "fl.local_epochs=1",
]


def peak_rss_mb() -> float:
    """This process's peak resident memory since start or the last `reset_peak_rss`."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1e3


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


class TimedCheckpoint(LastRoundCheckpoint):
    """checkpoints/last.ckpt every round, each write timed."""

    def __init__(self, dirpath: Path):
        super().__init__(dirpath, 1)
        self.times: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        started = time.perf_counter()
        super().on_train_epoch_end(trainer, pl_module)
        self.times.append(time.perf_counter() - started)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def measure(alg: str, num_clients: int, per_round: int, rounds: int, budget_gb: float, out: Path):
    """One case in this process (run by `main` in a subprocess per case)."""
    overrides = [
        *CASE,
        f"alg={alg}",
        f"fl.num_clients={num_clients}",
        f"fl.clients_per_round={per_round}",
        f"fl.eval_clients={min(per_round, num_clients)}",
        f"data.loader.num_train={SAMPLES_PER_CLIENT * num_clients}",
        f"fl.client_state_memory_gb={budget_gb}",
    ]
    cfg = compose_case(overrides, rounds, "cpu", out)
    set_threads(cfg)  # as a run does: fewer threads when a core is busy (src/threads.py)
    partition = []
    build = federated_data.Federation.build.__func__

    def timed_build(cls, *args, **kwargs):
        started = time.perf_counter()
        federation = build(cls, *args, **kwargs)
        partition.append(time.perf_counter() - started)
        return federation

    federated_data.Federation.build = classmethod(timed_build)
    started = time.perf_counter()
    module = build_module(cfg, out)
    setup_s = time.perf_counter() - started
    setup_peak = peak_rss_mb()
    reset_peak_rss()

    rounds_timer, checkpoint = RoundTimes(), TimedCheckpoint(out / "checkpoints")
    trainer = build_trainer(cfg, logger=False, callbacks=[rounds_timer, checkpoint])
    trainer.fit(module)
    store = module.store
    private = module.algorithm.initial_private_state(module.model)
    return {
        "alg": alg,
        "clients": num_clients,
        "per_round": per_round,
        "rounds": rounds,
        "budget_gb": budget_gb,
        "threads": torch.get_num_threads(),
        "setup_s": setup_s,
        "partition_s": partition[0],
        "round_s": sum(rounds_timer.times[1:]) / (rounds - 1),
        "checkpoint_s": sum(checkpoint.times[1:]) / (rounds - 1),
        "checkpoint_bytes": checkpoint.path.stat().st_size,
        "fit_peak_rss_mb": peak_rss_mb(),
        "setup_peak_rss_mb": setup_peak,
        "clients_with_state": len(store),
        "states_in_memory_bytes": store.resident_bytes,
        "states_on_disk_bytes": folder_bytes(out / "client_state"),
        "private_bytes_per_client": sum(t.numel() * t.element_size() for t in private.values()),
        "model_bytes": sum(p.numel() * p.element_size() for p in module.model.parameters()),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| alg | clients | budget (GB) | setup (s) | partition (s) | round (s) | checkpoint (s) | "
        "checkpoint (MB) | peak RSS fit / setup (MB) | clients with a state | "
        "states in memory / on disk (MB) | private / client (kB) | model (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['alg']} | {r['clients']:,} | {r['budget_gb']:g} | {r['setup_s']:.2f} | {r['partition_s']:.2f} | "
            f"{r['round_s']:.2f} | {r['checkpoint_s']:.2f} | {r['checkpoint_bytes'] / 1e6:.1f} | "
            f"{r['fit_peak_rss_mb']:.0f} / {r['setup_peak_rss_mb']:.0f} | "
            f"{r['clients_with_state']} | {r['states_in_memory_bytes'] / 1e6:.0f} / "
            f"{r['states_on_disk_bytes'] / 1e6:.0f} | "
            f"{r['private_bytes_per_client'] / 1e3:.1f} | {r['model_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    """scaling.md: what was run, then the table."""
    first = rows[0]
    threads = sorted({r["threads"] for r in rows})
    return (
        "# Scaling with the number of clients (cross-device)\n\n"
        f"`python -m benchmarks.scaling`: {first['per_round']} clients per round, "
        f"{first['rounds']} rounds (a checkpoint after each; round and checkpoint times are "
        "means over rounds 2 on), every client with 10 samples (8 train + 2 local test), "
        "vit_small32 on 28 px synthetic images, iid, batch 8, one local epoch, AdamW; "
        f"fl.eval_clients={first['per_round']} on the last round (not timed). CPU, "
        f"{'/'.join(str(t) for t in threads)} torch threads on 2 shared cores; each case in a "
        "process of its own. The budget (fl.client_state_memory_gb) only matters for ditto, "
        "which keeps a whole personal model per client that has trained. Columns: see the "
        "docstring of benchmarks/scaling.py.\n\n" + table(rows)
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[100, 1000, 10000])
    parser.add_argument("--algs", nargs="*", default=["fedavg", "ditto"])
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--budget-gb", type=float, default=0.25, help="fl.client_state_memory_gb of every case"
    )
    parser.add_argument(
        "--contrast-budget-gb",
        type=float,
        default=4.0,
        help="one more row: the last alg at the most clients with this budget (the default's)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--case", nargs=3, metavar=("ALG", "CLIENTS", "GB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    runs = args.out / "runs"
    if args.case:  # one case, in this (fresh) process
        alg, clients, budget = args.case[0], int(args.case[1]), float(args.case[2])
        out = runs / f"scaling_{alg}_{clients}_{budget:g}gb"
        row = measure(alg, clients, args.per_round, args.rounds, budget, out)
        (out / "scaling_row.json").write_text(json.dumps(row))
        return [row]

    cases = [(alg, n, args.budget_gb) for alg in args.algs for n in args.clients]
    if args.contrast_budget_gb:
        cases.append((args.algs[-1], max(args.clients), args.contrast_budget_gb))
    rows = []
    for alg, clients, budget in cases:
        command = [sys.executable, "-m", "benchmarks.scaling", "--case", alg, str(clients)]
        command += [str(budget), f"--per-round={args.per_round}", f"--rounds={args.rounds}"]
        command += [f"--out={args.out}"]
        out = runs / f"scaling_{alg}_{clients}_{budget:g}gb"
        if out.exists():  # a fresh folder: no earlier run's client states or checkpoint
            shutil.rmtree(out)
        subprocess.run(command, check=True)
        rows.append(json.loads((out / "scaling_row.json").read_text()))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    (args.out / "scaling.json").write_text(json.dumps(rows, indent=2))
    (args.out / "scaling.md").write_text(markdown(rows))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
