"""Scaling with the number of clients (issue 7): for 10 ... 10,000 clients, the time to partition
60,000 samples (iid), the memory of the client state store once every client has
trained (fedsa-flora: each client keeps its LoRA B's and head), and the second round (the first
warms up) of 10 sampled clients, each running the same 5 local batches of 8 samples (the pool
grows to 50 samples per client above 1,200 clients so that every client has them).

What it shows: the store grows with clients x private size (not clients x model size), and the
round time depends on the sampled clients' work, not on how many clients exist.

    python -m benchmarks.scaling [--clients 10 100 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hydra.utils import instantiate

from benchmarks.bench import RESULTS, RoundTimes, compose_case
from src.run import build_module, build_trainer

CASE = [
    "alg=fedsa-flora",
    "model=vit_small32",
    "data=synthetic",
    "partitioner=iid",  # Dirichlet cannot give 10,000 clients >= 2 of 60,000 samples each
    "fl.clients_per_round=10",
]


def measure(num_clients: int, out: Path) -> dict:
    pool = max(60000, 50 * num_clients)
    sizes = [f"fl.num_clients={num_clients}", f"data.loader.num_train={pool}", "fl.batch_size=8"]
    cfg = compose_case([*CASE, *sizes], 2, "cpu", out)
    partitioner = instantiate(cfg.partitioner)
    dataset = instantiate(cfg.data.loader)
    started = time.perf_counter()
    partitioner(dataset.train.partition_labels.numpy(), num_clients, cfg.seed)
    partition_s = time.perf_counter() - started

    module = build_module(cfg, out)
    algorithm = module.algorithm

    # the same work per sampled client, whatever its data size
    algorithm.local_batches = lambda run: run.batches(steps=5)
    rounds = RoundTimes()
    trainer = build_trainer(cfg, logger=False, callbacks=[rounds], enable_checkpointing=False)
    trainer.fit(module)
    # every client trains once: its private state (B's, head) enters the store
    private = module.algorithm.private_state(module.model, None)
    for client_id in range(num_clients):
        module.store.save(client_id, module.algorithm.private_state(module.model, client_id))
    store_bytes = sum(
        t.numel() * t.element_size()
        for state in module.store.saved.values()
        for t in state.values()
    )
    model_bytes = sum(p.numel() * p.element_size() for p in module.model.parameters())
    return {
        "clients": num_clients,
        "partition_s": partition_s,
        "round_s": rounds.times[1],
        "store_bytes": store_bytes,
        "private_bytes_per_client": sum(t.numel() * t.element_size() for t in private.values()),
        "model_bytes": model_bytes,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[10, 100, 1000, 10000])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [measure(n, args.out / "runs" / f"scaling_{n}") for n in args.clients]
    lines = [
        "| clients | partition (s) | round, 10 clients x 5 batches (s) | store (MB) | private / client (kB) | "
        "model (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['partition_s']:.3f} | {r['round_s']:.3f} | "
            f"{r['store_bytes'] / 1e6:.1f} | {r['private_bytes_per_client'] / 1e3:.1f} | "
            f"{r['model_bytes'] / 1e6:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    (args.out / "scaling.json").write_text(json.dumps(rows, indent=2))
    (args.out / "scaling.md").write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
