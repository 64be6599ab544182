"""Which clients train in a round and how long the round lasts in simulated time: the plain
seeded sample (system=none), or with a `system` the available clients under its policy
(src/engine/system.py; FedBuff's arrivals: src/engine/buffered.py; docs/system.md)."""

from __future__ import annotations

import torch

from src.engine.buffered import AsyncQueue, StalenessWeight
from src.engine.sampling import sample_clients
from src.engine.system import ClientTime, SystemModel
from src.errors import AllClientsFailedError

TensorDict = dict[str, torch.Tensor]


class Schedule:
    def __init__(
        self,
        system: SystemModel | None,
        federation,
        server,
        clients_per_round: int,
        local_epochs: int,
        seed: int,
        sampling: str = "uniform",
    ):
        self.system, self.federation, self.server = system, federation, server
        self.clients_per_round, self.local_epochs = clients_per_round, local_epochs
        self.seed, self.sampling = seed, sampling
        self.sim_total_s = 0.0  # the simulated clock: when the next round starts
        self.available = 0  # clients available in this round
        # system.policy=async (FedBuff): the clients in flight and the versions they train from
        async_ = system is not None and system.policy == "async"
        self.queue = AsyncQueue(system, system.concurrency, seed) if async_ else None
        self.staleness: StalenessWeight | None = None  # its upload transform (src/run.py)

    # ------------------------------------------------------------------ before the round
    def clients(self, round_idx: int) -> tuple[list[int], list[dict]]:
        """This round's clients (sorted), and the ones sampled but dropped before training
        (system.policy=over_select: others are predicted to finish first)."""
        weights = (
            self.federation.summary["train_samples"] if self.sampling == "by_samples" else None
        )
        num = self.federation.num_clients
        if self.system is None:
            return sample_clients(num, self.clients_per_round, self.seed, round_idx, weights), []
        if self.queue is not None:
            return self._arrivals(round_idx), []
        available = self.system.available(round_idx, self.sim_total_s)
        self.available = len(available)
        if not available:
            raise AllClientsFailedError(
                f"round {round_idx + 1}: no client is available at simulated time "
                f"{self.sim_total_s:.1f} s (system.trace's windows); the run stops"
            )
        count = min(self.system.per_round(self.clients_per_round), len(available))
        sampled = sample_clients(num, count, self.seed, round_idx, weights, among=available)
        if self.system.policy != "over_select" or len(sampled) <= self.clients_per_round:
            return sampled, []
        predicted = {k: self.predicted_time(k) for k in sampled}
        kept = self.system.keep_first(sampled, self.clients_per_round, predicted)
        planned = [
            {
                "round": round_idx + 1,
                "client": k,
                "reason": f"over-selected: predicted {predicted[k].total_s:.1f} s, after the "
                f"first {len(kept)}",
            }
            for k in sampled
            if k not in kept
        ]
        return kept, planned

    def _arrivals(self, round_idx: int) -> list[int]:
        """FedBuff: the next fl.clients_per_round clients to arrive, each to train from the
        version it downloaded (a copy), its update weighed by its staleness."""
        queue = self.queue
        arrived = queue.take(self.clients_per_round, self.predicted_time, self._snapshot)
        self.available = len(self.system.available(round_idx, queue.clock_s))
        self.staleness.base = {f.client: queue.snapshots[f.version] for f in arrived}
        self.staleness.staleness = {f.client: queue.version - f.version for f in arrived}
        return sorted(f.client for f in arrived)

    @property
    def downloads(self) -> dict[int, TensorDict]:
        """async: what each of this round's arrivals downloaded (its version); else nothing."""
        return self.staleness.base if self.queue is not None else {}

    def _snapshot(self) -> TensorDict:
        return {n: t.detach().clone() for n, t in self.server.payload(None).items()}

    def predicted_time(self, client_id: int) -> ClientTime:
        """A client's simulated time before it trains: fl.local_epochs passes over its
        training split, and an upload as large as its download."""
        down = self.server.download_bytes(client_id, self.server.payload(client_id))
        samples = self.local_epochs * len(self.federation.clients[client_id].train)
        return self.system.client_time(client_id, down, samples, down)

    # ------------------------------------------------------------------ after the round
    def finish(self, arrivals: list[float], late: int, over_selected: int) -> dict[str, float]:
        """The round's simulated time and the system's metrics (none without a system);
        `arrivals`: the simulated seconds of the clients the server kept."""
        if self.system is None:
            return {}
        metrics = {}
        if self.queue is not None:  # the server stepped at the clock of the K-th arrival
            self.queue.advance()
            round_s = self.queue.clock_s - self.sim_total_s
            self.sim_total_s = self.queue.clock_s
            staleness = list(self.staleness.staleness.values())
            metrics = {
                "clients/staleness_mean": sum(staleness) / len(staleness),
                "clients/staleness_max": max(staleness),
            }
        else:
            round_s = self.system.round_time(arrivals, any_late=late > 0)
            self.sim_total_s += round_s
        return metrics | {
            "time/sim_round_s": round_s,
            "time/sim_total_s": self.sim_total_s,
            "clients/available": self.available,
            "clients/late": late,
            "clients/over_selected": over_selected,
        }

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "sim_total_s": self.sim_total_s,
            "async": self.queue.state_dict() if self.queue is not None else None,
        }

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.sim_total_s = float(state.get("sim_total_s", 0.0))
        if self.queue is not None and state.get("async"):
            self.queue.load_state_dict(state["async"], device)
