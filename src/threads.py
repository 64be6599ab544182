"""CPU threads on a machine shared with other jobs (`trainer.threads`).

torch starts one OpenMP thread per core, and a thread that waits for the others spins on its core
(libgomp: 300,000 iterations) before it sleeps. When another process holds one of those cores,
every parallel step waits for the thread that shares it, and the spinning takes time from it:
a vit_small32 training step took 7-13 x its quiet time with one busy process beside it on
2 cores (benchmarks/shared_machine.py). So:
- waiting threads spin at most `GOMP_SPINCOUNT=10000` iterations, then sleep: as fast as the
  default on a quiet machine (measured 61.8 ms per step either way) and about 3 x instead of
  7-13 x when a neighbour arrives during the run. (OMP_WAIT_POLICY=PASSIVE, sleeping at once,
  was 1.3 x under a neighbour but 1.5 x slower on a quiet machine.) This must be in the
  environment before torch loads its OpenMP runtime, so `src/__init__.py` does it; a setting
  of the user's (GOMP_SPINCOUNT or OMP_WAIT_POLICY) wins;
- `trainer.threads=auto` uses the cores this process may run on (its CPU affinity: a SLURM
  allocation, `taskset`) that are idle when the run starts (sampled from /proc/stat), divided
  among the jobs a local sweep launcher runs at once.
"""

from __future__ import annotations

import os
import sys
import time

SPIN = "GOMP_SPINCOUNT"
WAIT_KEYS = (SPIN, "OMP_WAIT_POLICY")
BUSY_SHARE = 0.5  # a core busier than this (other processes) is not counted as ours

_wait_note = "not set"


def bound_spin_wait() -> None:
    """Waiting OpenMP threads spin briefly, then sleep (the user's own setting wins)."""
    global _wait_note
    given = [f"{key}={os.environ[key]}" for key in WAIT_KEYS if key in os.environ]
    if given:
        _wait_note = f"{', '.join(given)} (the environment's)"
    elif "torch" in sys.modules:  # too late: its OpenMP runtime has read the setting
        _wait_note = "torch was loaded before fedsweep: OpenMP's own spin-wait"
    else:
        os.environ[SPIN] = "10000"
        _wait_note = f"{SPIN}=10000"


def wait_note() -> str:
    """How waiting OpenMP threads behave in this process, for the log."""
    return _wait_note


def usable_cores() -> set[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def busy_cores(cores: set[int], seconds: float = 0.1) -> set[int]:
    """The cores of `cores` that other processes kept more than half busy over `seconds`
    (Linux /proc/stat; elsewhere none)."""

    def sample() -> dict[int, tuple[int, int]]:
        times = {}
        with open("/proc/stat") as stat:
            for line in stat:
                name, *values = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    ticks = [int(v) for v in values]
                    times[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))  # idle + iowait
        return times

    try:
        before = sample()
        time.sleep(seconds)
        after = sample()
    except OSError:
        return set()
    busy = set()
    for core in cores & before.keys() & after.keys():
        total = after[core][1] - before[core][1]
        idle = after[core][0] - before[core][0]
        if total > 0 and 1 - idle / total > BUSY_SHARE:
            busy.add(core)
    return busy


def thread_count(setting: int | str, parallel_jobs: int = 1) -> tuple[int, str]:
    """(threads, why) for `trainer.threads` = `auto` or a count."""
    if setting != "auto":
        return int(setting), "trainer.threads"
    cores, jobs = usable_cores(), max(1, parallel_jobs)
    busy = busy_cores(cores)
    why = (
        f"auto: {len(cores) - len(busy)} idle of the {len(cores)} cores in this process's affinity"
    )
    if jobs > 1:
        why += f" / {jobs} jobs the sweep launcher runs at once"
    return max(1, (len(cores) - len(busy)) // jobs), why
