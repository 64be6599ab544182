"""`system.policy=async`: FedBuff (Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba,
"Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022), Algorithm 1, in
simulated time (docs/system.md).

`system.concurrency` clients train at any moment, each from the model version it downloaded when
it started. An event queue in simulated time (no threads) orders their arrivals: a client that
starts at time t finishes at t + t_k (src/engine/system.py's formula, predicted with
fl.local_epochs passes and an upload as large as the download), and its slot is refilled at once
by a new client, sampled uniformly from the available clients not training, which downloads the
current version. The server takes the arrivals in time order; after every fl.clients_per_round of
them (the buffer size K) it steps:

    x <- x + eta_g (1/K) sum_i s(tau_i) (y_i - x_{v_i}),     s(tau) = (1 + tau)^(-a)

with tau_i = the versions the server advanced while client i trained (its staleness),
a = system.staleness_exponent (0.5: the paper's 1/sqrt(1 + tau)) and eta_g = server_opt.lr.
One server step is one round of the run (fl.rounds). Each client is trained when it arrives, from
a copy of the version it downloaded: its result depends only on (seed, round, client, version).

Differences from the paper: a client's download is counted in the round it arrives (comm/*); the
clients are sampled uniformly (fl.sampling=by_samples is refused); the server's learning rate
and optimiser are server_opt's.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from src.errors import AllClientsFailedError
from src.transforms.chain import UploadTransform

TensorDict = dict[str, torch.Tensor]
_REFILL_STREAM = 0xB0F


@dataclass(order=True, frozen=True)
class Flight:
    """A client training: it arrives at `finish_s` (ties: the order it started in)."""

    finish_s: float
    seq: int
    client: int
    version: int


class AsyncQueue:
    """The clients in flight, the simulated clock and the server's model versions."""

    def __init__(self, system, concurrency: int, seed: int):
        self.system, self.concurrency, self.seed = system, concurrency, seed
        self.flights: list[Flight] = []  # a heap
        self.clock_s = 0.0
        self.version = 0
        self.seq = 0
        self.snapshots: dict[int, TensorDict] = {}  # version -> the payload clients downloaded

    def _start(self, predict, snapshot) -> None:
        """Fill the free slots at the current clock with clients downloading this version."""
        busy = {f.client for f in self.flights}
        while len(self.flights) < self.concurrency:
            idle = [k for k in self.system.available(self.seq, self.clock_s) if k not in busy]
            if not idle:
                if self.flights:
                    return  # the next arrival frees a slot
                raise AllClientsFailedError(
                    f"system.policy=async: no client is available at simulated time "
                    f"{self.clock_s:.1f} s; the run stops"
                )
            rng = np.random.default_rng([self.seed, self.seq, _REFILL_STREAM])
            client = int(idle[rng.integers(len(idle))])
            if self.version not in self.snapshots:
                self.snapshots[self.version] = snapshot()
            finish = self.clock_s + predict(client).total_s
            heapq.heappush(self.flights, Flight(finish, self.seq, client, self.version))
            busy.add(client)
            self.seq += 1

    def take(self, count: int, predict, snapshot) -> list[Flight]:
        """The next `count` arrivals in time order; each frees its slot for a new client."""
        self._start(predict, snapshot)
        arrived = []
        for _ in range(count):
            flight = heapq.heappop(self.flights)
            self.clock_s = flight.finish_s
            arrived.append(flight)
            self._start(predict, snapshot)
        return arrived

    def advance(self) -> None:
        """The server stepped: a new version; forget those no client trains from any more."""
        self.version += 1
        alive = {f.version for f in self.flights}
        self.snapshots = {v: s for v, s in self.snapshots.items() if v in alive}

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "flights": [[f.finish_s, f.seq, f.client, f.version] for f in self.flights],
            "clock_s": self.clock_s,
            "version": self.version,
            "seq": self.seq,
            "snapshots": {str(v): s for v, s in self.snapshots.items()},
        }

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.flights = [Flight(float(f), int(s), int(c), int(v)) for f, s, c, v in state["flights"]]
        heapq.heapify(self.flights)
        self.clock_s, self.version, self.seq = state["clock_s"], state["version"], state["seq"]
        self.snapshots = {
            int(v): {n: t.to(device) for n, t in s.items()} for v, s in state["snapshots"].items()
        }


class StalenessWeight(UploadTransform):
    """The last upload transform under FedBuff: client i's upload y_i, trained from x_{v_i},
    becomes x + s(tau_i) (y_i - x_{v_i}), so the server's plain mean of the K uploads is
    x + (1/K) sum_i s(tau_i) Delta_i."""

    name = "staleness"
    client_memory = "system.policy=async"  # the queue of clients in flight lives in this process

    def __init__(self, server, exponent: float):
        self.server, self.exponent = server, exponent
        self.base: dict[int, TensorDict] = {}  # client -> x_{v_i}, this round
        self.staleness: dict[int, int] = {}  # client -> tau_i, this round

    def weight(self, staleness: int) -> float:
        return (1.0 + staleness) ** -self.exponent

    def apply(self, client_id, upload, origin, generator) -> TensorDict:
        now, base = self.server.payload(client_id), self.base[client_id]
        s = self.weight(self.staleness[client_id])
        return {n: now[n] + s * (t - base[n]) for n, t in upload.items()}
