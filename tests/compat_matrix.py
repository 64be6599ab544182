"""The compatibility matrix: every option of conf/alg x conf/aggregator x conf/attack (read from
the config folders, so a new option joins by itself), plus mixed ranks for the LoRA algorithms
and fedsa-flora's grouping and clustering. Each cell either runs one tiny round with no dropped
client, or is refused before training with one line.

    python -m tests.compat_matrix docs/compatibility.md    # run every cell, write the table
    python -m tests.compat_matrix --system docs/compatibility_system.md   # x system x compression
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from src.config_checks import validate_config
from src.errors import user_error
from src.run import build_module, build_trainer
from tests.conftest import CONF_DIR, compose_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# A tiny federation: 6 iid clients of digits, all sampled, one round, a one-block ViT.
TINY = [
    "experiment=quickstart",
    "logger=none",
    "fl.rounds=1",
    "fl.num_clients=6",
    "fl.clients_per_round=6",
    "fl.local_epochs=1",
    "fl.batch_size=64",
    "partitioner=iid",
    "model.depth=1",
    "model.embed_dim=32",
    "model.num_heads=2",
]


def variants(alg: str) -> list[tuple[str, list[str]]]:
    """(label, overrides) of an algorithm: as configured, plus the variants its config offers
    that change what is shared (found from its keys, so a new algorithm gets them too)."""
    keys = compose_config([f"alg={alg}"]).alg
    # a few local steps only where the algorithm counts steps, not epochs (perfed)
    base = ["alg.local_rounds=1", "alg.steps=2"] if "steps" in keys else []
    found = [("", base)]
    if "use_lora" in keys:  # LoRA is optional: also run it on the adapters
        found.append(("lora", [*base, "alg.use_lora=true"]))
    if "client_ranks" in keys:
        found.append(("ranks [2,4]", [*base, "alg.client_ranks=[2,4]"]))
    if "groups" in keys:
        found += [
            ("groups 2", [*base, "alg.groups=natural", "partitioner.groups=2"]),
            ("groups 3", [*base, "alg.groups=natural", "partitioner.groups=3"]),
        ]
    if "cluster" in keys:
        found.append(("clusters", [*base, "alg.cluster.enabled=true", "alg.cluster.k=2"]))
    return found


@dataclass
class Cell:
    alg: str
    variant: str
    aggregator: str
    attack: str
    overrides: list[str]

    @property
    def label(self) -> str:
        alg = f"{self.alg} ({self.variant})" if self.variant else self.alg
        return f"{alg} | {self.aggregator} | {self.attack}"


def cells() -> list[Cell]:
    return [
        Cell(
            alg, label, agg, attack, [f"alg={alg}", f"aggregator={agg}", f"attack={attack}", *extra]
        )
        for alg in options("alg")
        for label, extra in variants(alg)
        for agg in options("aggregator")
        for attack in options("attack")
    ]


# The second table: every algorithm variant under each system policy and compression (the mean
# aggregator, no attack). Four of the six clients a round, so that over_select has a choice.
SYSTEMS = {
    "none": [],
    "deadline+partial": [
        "system=heavy_tail", "system.policy=deadline", "system.deadline_s=5",
        "system.partial_work=true",
    ],
    "over_select": ["system=heavy_tail", "system.policy=over_select", "system.over_selection=1.5"],
    "async": ["system=heavy_tail", "system.policy=async", "system.concurrency=5"],
}  # fmt: skip


def system_cells() -> list[Cell]:
    return [
        Cell(
            alg,
            label,
            system,
            compression,
            [
                f"alg={alg}",
                f"compression={compression}",
                "fl.clients_per_round=4",
                *SYSTEMS[system],
                *extra,
            ],
        )  # fmt: skip
        for alg in options("alg")
        for label, extra in variants(alg)
        for system in SYSTEMS
        for compression in options("compression")
    ]


def check_cell(cell: Cell, tmp_path: Path):
    """What happens before training: ("refused", the one-line reason), or ("ok", the module)."""
    cfg = compose_config([*TINY, *cell.overrides], tmp_path)
    try:
        validate_config(cfg)
        return "ok", (cfg, build_module(cfg, tmp_path / "run"))
    except Exception as error:
        reason = user_error(error)
        if reason is None:
            raise
        assert "\n" not in str(reason), f"{cell.label}: a refusal must be one line: {reason}"
        return "refused", str(reason)


def run_cell(cell: Cell, tmp_path: Path) -> tuple[str, str]:
    """("ok", "") after one round with no dropped client, or ("refused", the one-line reason).
    Anything else raises: a cell must never fail during training."""
    status, found = check_cell(cell, tmp_path)
    if status == "refused":
        return status, found
    cfg, module = found
    trainer = build_trainer(cfg, logger=False, enable_checkpointing=False)
    trainer.fit(module)
    row = module.recorder.rows[-1]
    if row["clients/dropped"] or row["clients/nonfinite"]:
        raise AssertionError(f"{cell.label}: dropped clients {module.dropped}")
    return "ok", ""


def read_table(path: Path) -> dict[str, tuple[str, str]]:
    """The table `write_table` wrote: cell label -> ("ok", "") or (status, reason)."""
    results = {}
    for line in path.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| algorithm |"):
            continue
        alg, aggregator, attack, shown = line[2:-2].split(" | ", 3)
        status, _, reason = shown.partition(": ")
        results[f"{alg} | {aggregator} | {attack}"] = (
            ("ok", "") if shown == "✔" else (status, reason.replace("\\|", "|"))
        )
    return results


def write_table(results: dict[str, tuple[str, str]], path: Path, system: bool = False) -> None:
    ok = sum(status == "ok" for status, _ in results.values())
    failed = sum(status == "FAILED" for status, _ in results.values())
    refused = len(results) - ok - failed
    what, columns, command = (
        ("system policies and compressed uploads", "system | compression",
         "--system docs/compatibility_system.md")
        if system
        else ("aggregators and attacks", "aggregator | attack", "docs/compatibility.md")
    )  # fmt: skip
    lines = [
        f"# Compatibility of algorithms, {what}",
        "",
        f"Generated by `python -m tests.compat_matrix {command}` (each cell runs one tiny",
        "round, or is refused before training with the reason shown). "
        f"{len(results)} cells: {ok} run, {refused} refused, {failed} failed.",
        "",
        f"| algorithm | {columns} | result |",
        "|---|---|---|---|",
    ]
    for label, (status, reason) in results.items():
        shown = "✔" if status == "ok" else f"{status}: " + reason.replace("|", "\\|")
        lines.append(f"| {label} | {shown} |")
    path.write_text("\n".join(lines) + "\n")


def main(out: str, system: bool = False) -> None:
    import tempfile

    logging.disable(logging.WARNING)
    results = {}
    all_cells = system_cells() if system else cells()
    with tempfile.TemporaryDirectory() as tmp:
        for i, cell in enumerate(all_cells, 1):
            try:
                results[cell.label] = run_cell(cell, Path(tmp) / str(i))
            except Exception as error:  # listed as a failure in the table, never hidden
                results[cell.label] = ("FAILED", f"{type(error).__name__}: {error}")
            print(f"[{i}/{len(all_cells)}] {cell.label}: {results[cell.label][0]}", flush=True)
            write_table(results, Path(out), system)  # as it goes: a long run can be followed


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--system"]:
        main(args[1] if len(args) > 1 else "docs/compatibility_system.md", system=True)
    else:
        main(args[0] if args else "docs/compatibility.md")
