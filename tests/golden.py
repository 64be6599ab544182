"""The golden runs: a short run of every algorithm (and the variants its config offers), every
aggregator, every attack, privacy and clients trained together, whose `metrics.csv` (without the
wall-clock columns) must not change when the code is restructured. They are recorded once, on
the code before a redesign, in `tests/golden/`; `tests/test_golden.py` (slow) runs them again and
compares byte for byte: with the stored files on the machine that recorded them, elsewhere with
files recorded afresh from the commit in `tests/golden/SOURCE` (a git worktree), so the check is
exact on any CPU.

    python -m tests.golden record tests/golden     # write <cell>.csv for every cell, MACHINE
    python -m tests.golden check tests/golden      # run every cell, report those that differ

`tests/golden/compatibility.md` is docs/compatibility.md as it was: regenerated after a redesign
(`python -m tests.compat_matrix docs/compatibility.md`), it must be the same table.
"""

from __future__ import annotations

import csv
import io
import platform
import re
import sys
from pathlib import Path

import torch

from src.config_checks import validate_config
from src.errors import user_error
from src.run import build_module, build_trainer
from tests.compat_matrix import TINY, options, variants
from tests.conftest import compose_config

# two rounds (the second starts from an aggregate), one thread: the same floats on every run
BASE = [*TINY, "fl.rounds=2", "fl.eval_every=1", "trainer.threads=1", "trainer.processes=1"]
LORA_MIXED = ["alg=fedlora", "alg.client_ranks=[2,4]"]
FIRST_AGGREGATORS = ("mean", "zeropad", "rank_aware", "stack")


def cells() -> dict[str, list[str]]:
    """Cell name (a file name) -> its overrides."""
    found = {}
    for alg in options("alg"):
        for label, extra in variants(alg):
            found[_name(f"alg {alg} {label}")] = [f"alg={alg}", *extra]
    for aggregator in options("aggregator"):  # on LoRA, with mixed ranks where the rule can
        found[_name(f"aggregator {aggregator}")] = [f"aggregator={aggregator}"]
    for attack in options("attack"):
        if attack != "none":  # a robust rule, so that every attack runs
            found[_name(f"attack {attack}")] = [
                "alg=fedavg",
                "aggregator=median",
                f"attack={attack}",
            ]
    found["privacy_dp_fedavg"] = ["alg=fedavg", "privacy=dp_fedavg"]
    found["parallel_clients_3"] = ["alg=fedlora", "fl.parallel_clients=3"]
    found["parallel_clients_3_mixed_ranks"] = [*LORA_MIXED, "fl.parallel_clients=3"]
    return found


def _name(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def run_cell(overrides: list[str], folder: Path) -> str:
    """The cell's metrics.csv without the columns that measure time, or its refusal. A cell that
    names no aggregator runs with the first of `FIRST_AGGREGATORS` it is allowed (mixed ranks
    need one that combines them); an aggregator's cell runs fedlora with mixed ranks if the rule
    combines them, else with equal ranks."""
    if not any(o.startswith("alg=") for o in overrides):  # an aggregator's cell
        tried = [[*LORA_MIXED, *overrides], ["alg=fedlora", *overrides]]
    elif not any(o.startswith("aggregator=") for o in overrides):
        tried = [[*overrides, f"aggregator={aggregator}"] for aggregator in FIRST_AGGREGATORS]
    else:
        tried = [overrides]
    for attempt in tried:
        cfg = compose_config([*BASE, *attempt], folder)
        try:
            validate_config(cfg)
            module = build_module(cfg, folder / "run")
            break
        except Exception as error:  # a refusal is recorded (the last one tried); a bug raises
            reason = user_error(error)
            if reason is None:
                raise
            if attempt is tried[-1]:
                return f"refused: {reason}\n"
    torch.set_num_threads(1)
    build_trainer(cfg, logger=False, enable_checkpointing=False).fit(module)
    rows = list(csv.DictReader(io.StringIO((folder / "run" / "metrics.csv").read_text())))
    kept = [c for c in rows[0] if not c.startswith("time/") and not c.endswith("_per_s")]
    out = io.StringIO()
    writer = csv.DictWriter(out, kept, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def machine() -> str:
    """What the floats of a run depend on besides the code."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
        platform.processor(),
    )
    return f"{cpu}; torch {torch.__version__}; python {platform.python_version()}\n"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def record(folder: Path, scratch: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, overrides in cells().items():
        print(f"golden: {name}", flush=True)
        (folder / f"{name}.csv").write_text(run_cell(overrides, scratch / name))
    (folder / "MACHINE").write_text(machine())


def differing(reference: Path, scratch: Path) -> list[str]:
    """The recorded cells whose run now differs from the reference's file, or that are gone (a
    cell added since, e.g. a new algorithm's, has nothing to be compared with)."""
    now = cells()
    found = []
    for stored in sorted(reference.glob("*.csv")):
        name = stored.stem
        if name not in now or run_cell(now[name], scratch / name) != stored.read_text():
            found.append(name)
    return found


if __name__ == "__main__":
    import tempfile

    command, folder = sys.argv[1], Path(sys.argv[2])
    with tempfile.TemporaryDirectory() as scratch:
        if command == "record":
            record(folder, Path(scratch))
        else:
            bad = differing(folder, Path(scratch))
            print("golden: all identical" if not bad else f"golden: differ: {', '.join(bad)}")
            sys.exit(1 if bad else 0)
