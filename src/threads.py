"""CPU threads on a machine shared with other jobs (`trainer.threads`).

torch starts one OpenMP thread per core by default, and a thread that waits for the others spins
on its core. When another process holds one of those cores, every parallel step waits for the
thread that shares it, and the spinning threads take time from it: a training step of
vit_small32 with one busy process beside it took 2.2 x its quiet time on 2 cores. So:
- OpenMP threads sleep while they wait (`OMP_WAIT_POLICY=PASSIVE`), unless the environment sets
  a policy: this must happen before torch loads its OpenMP runtime, so `src/__init__.py` does it;
- `trainer.threads=auto` uses the cores this process may run on (its CPU affinity, e.g. a SLURM
  allocation or `taskset`), divided among the jobs a local sweep launcher runs at once.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "OMP_WAIT_POLICY"


_wait_note = "not set"


def default_to_passive_wait() -> None:
    """Waiting OpenMP threads sleep instead of spinning (the user's own setting wins)."""
    global _wait_note
    if WAIT_POLICY in os.environ:
        _wait_note = f"{WAIT_POLICY}={os.environ[WAIT_POLICY]} (the environment's)"
    elif "torch" in sys.modules:  # too late: its OpenMP runtime has read the policy
        _wait_note = "torch was loaded before fedsweep: OpenMP's own wait policy"
    else:
        os.environ[WAIT_POLICY] = "PASSIVE"
        _wait_note = f"{WAIT_POLICY}=PASSIVE"


def wait_note() -> str:
    """How waiting OpenMP threads behave in this process, for the log."""
    return _wait_note


def usable_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_count(setting: int | str, parallel_jobs: int = 1) -> tuple[int, str]:
    """(threads, why) for `trainer.threads` = `auto` or a count."""
    if setting != "auto":
        return int(setting), "trainer.threads"
    cores, jobs = usable_cores(), max(1, parallel_jobs)
    why = f"auto: {cores} cores in this process's CPU affinity"
    if jobs > 1:
        why += f" / {jobs} jobs the sweep launcher runs at once"
    return max(1, cores // jobs), why
