"""fedsa-flora's server: optional grouping of clients, the configured aggregator, optional clustering.

Around the configured aggregator (which holds the global state and takes the server step):
1. groups (`alg.groups=natural`): the round's uploads are first averaged within each group
   (owner-weighted, so mixed ranks are not diluted); the group-level uploads, weighted by the
   group's samples, are what the aggregator and the clustering see.
2. the aggregator turns the (client- or group-level) uploads into the new global state.
3. clustering (`alg.cluster.enabled`): k-means on the uploads (flattened, unit length), k fixed or
   by the elbow; each cluster's owner-weighted mean is kept, and a client of that cluster receives
   (1 - mix) * cluster mean + mix * current global (mix = `alg.cluster.mix`). A client keeps its
   last cluster when not sampled; with groups, every client of a group follows its group.
   Every round's decision goes to `clusters/round_XXXX.json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from src.aggregators.base import Aggregator, TensorDict
from src.aggregators.clustering import cluster_rows
from src.aggregators.mean import leading_block, owner_weighted_mean


@dataclass
class Unit:
    """What the aggregator and the clustering see as one participant: a client or a group."""

    id: int
    members: list[int]  # the clients that follow this unit's cluster
    tensors: TensorDict
    weight: float


class ClusteredAggregator(Aggregator):
    def __init__(
        self,
        inner: Aggregator,
        groups: list[int] | None = None,
        cluster: dict | None = None,
        output_dir: str | Path | None = None,
        seed: int = 0,
    ):
        self.inner = inner
        self.name = inner.name
        self.groups = groups
        self.cluster = cluster  # None: no clustering
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.seed = seed
        self.client_cluster: dict[int, int] = {}  # client -> id of the cluster it follows
        self.cluster_means: dict[int, TensorDict] = {}  # cluster id -> owner-weighted mean
        self.next_cluster_id = 0
        self.last_k: int | None = None
        self.round_idx = 0

    @property
    def state(self) -> TensorDict | None:
        return self.inner.state

    def setup(self, model: nn.Module, algorithm) -> None:
        self.algorithm = algorithm
        self.inner.setup(model, algorithm)

    # ------------------------------------------------------------------ sending
    def broadcast(self, client_id: int) -> TensorDict:
        cluster_id = self.client_cluster.get(client_id)
        if cluster_id is None:
            return self.inner.broadcast(client_id)
        mix, mean = self.cluster["mix"], self.cluster_means[cluster_id]
        return {
            name: self.algorithm.client_view(name, (1 - mix) * mean[name] + mix * glob, client_id)
            for name, glob in self.inner.state.items()
        }

    @contextmanager
    def global_model(self, model: nn.Module) -> Iterator[None]:
        with self.inner.global_model(model):
            yield

    # ------------------------------------------------------------------ a round
    def begin(self, round_idx: int = 0) -> None:
        self.round_idx = round_idx
        self.num_added = 0
        self.last_k = None
        self._uploads: list[tuple[int, TensorDict, float]] = []

    def add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        # uploads are views of the resident model: copy before the next client overwrites it
        self._uploads.append(
            (client_id, {n: t.detach().clone() for n, t in upload.items()}, weight)
        )
        self.num_added += 1

    def finish(self) -> None:
        if not self._uploads:
            return
        units = self._units()
        self.inner.begin(self.round_idx)
        for unit in units:
            self.inner.add(unit.tensors, unit.weight, unit.id)
        self.inner.finish()
        if self.cluster is not None and len(units) >= 2:
            self._cluster(units)
        self._uploads = []

    def round_metrics(self) -> dict[str, float]:
        return {} if self.last_k is None else {"clusters/k": self.last_k}

    def _units(self) -> list[Unit]:
        if self.groups is None:
            return [Unit(cid, [cid], tensors, w) for cid, tensors, w in self._uploads]
        units = []
        for group in sorted({self.groups[cid] for cid, _, _ in self._uploads}):
            sampled = [(t, w) for cid, t, w in self._uploads if self.groups[cid] == group]
            tensors = [t for t, _ in sampled]
            mean = owner_weighted_mean(tensors, [w for _, w in sampled], self.inner.state)
            # the group holds the largest block any member sent (e.g. its largest rank)
            held = {
                name: mean[name][leading_block(max((t[name].shape for t in tensors), key=_size))]
                for name in mean
            }
            members = [cid for cid, g in enumerate(self.groups) if g == group]
            units.append(Unit(group, members, held, sum(w for _, w in sampled)))
        return units

    def _cluster(self, units: list[Unit]) -> None:
        glob = self.inner.state
        rows = np.stack([_flat_padded(unit.tensors, glob) for unit in units])
        found = cluster_rows(
            rows,
            k=self.cluster["k"],
            min_k=self.cluster["min_k"],
            max_k=self.cluster["max_k"],
            seed=self.seed + self.round_idx,
        )
        for label in range(found.k):
            in_cluster = [u for u, lab in zip(units, found.labels, strict=True) if lab == label]
            cluster_id, self.next_cluster_id = self.next_cluster_id, self.next_cluster_id + 1
            self.cluster_means[cluster_id] = owner_weighted_mean(
                [u.tensors for u in in_cluster], [u.weight for u in in_cluster], glob
            )
            for unit in in_cluster:
                self.client_cluster.update(dict.fromkeys(unit.members, cluster_id))
        followed = set(self.client_cluster.values())  # forget clusters nobody follows any more
        self.cluster_means = {c: m for c, m in self.cluster_means.items() if c in followed}
        self.last_k = found.k
        self._write(units, found)

    def _write(self, units: list[Unit], found) -> None:
        if self.output_dir is None:
            return
        folder = self.output_dir / "clusters"
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "round": self.round_idx + 1,
            "unit": "client" if self.groups is None else "group",
            "k": found.k,
            "inertia": {str(k): v for k, v in found.inertia.items()},
            "units": [u.id for u in units],
            "assignment": dict(zip((str(u.id) for u in units), found.labels, strict=True)),
            "members": {str(u.id): u.members for u in units},
            "similarity": found.similarity,
        }
        (folder / f"round_{self.round_idx + 1:04d}.json").write_text(json.dumps(record, indent=1))

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "inner": self.inner.state_dict(),
            "client_cluster": dict(self.client_cluster),
            "cluster_means": self.cluster_means,
            "next_cluster_id": self.next_cluster_id,
        }

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.client_cluster = {int(k): v for k, v in state["client_cluster"].items()}
        self.cluster_means = state["cluster_means"]
        self.next_cluster_id = state["next_cluster_id"]


def _size(shape: torch.Size) -> int:
    return int(np.prod(shape))


def _flat_padded(tensors: TensorDict, like: TensorDict) -> np.ndarray:
    """One row for k-means: every tensor zero-padded to the server's shape, concatenated."""
    parts = []
    for name, full in like.items():
        padded = torch.zeros(full.shape, dtype=torch.float64)
        padded[leading_block(tensors[name].shape)] = tensors[name].detach().double().cpu()
        parts.append(padded.flatten())
    return torch.cat(parts).numpy()
