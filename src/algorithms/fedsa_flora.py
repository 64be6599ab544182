"""fedsa-flora: FedSA-LoRA's selective sharing with FLoRA-style, rank-aware aggregation of A and
optional grouping and clustering of clients.

Client half. Clients train A and B (ranks may differ: `client_ranks`) and the head. Only the A's
are uploaded; what matches `private` (lora_B and the head by default) stays on the client across
rounds, in the client state store. A client deploys (global or cluster A, its own B, its own head).

Server half, around the configured aggregator (which holds the global A and takes the step
A <- A + server_lr (A_bar - A); aggregator=mean/rank_aware average row j over its owners):
1. groups (`groups=natural`): the round's uploads are first averaged within each group
   (owner-weighted, so mixed ranks are not diluted); the group-level uploads, weighted by the
   group's samples, are what the aggregator and the clustering see.
2. the aggregator turns the (client- or group-level) uploads into the new global state.
3. clustering (`cluster.enabled`): k-means on the uploads (flattened, unit length), k fixed or by
   the elbow; each cluster's owner-weighted mean is kept, and a client of that cluster receives
   (1 - mix) * cluster mean + mix * current global (mix = `cluster.mix`). A client keeps its last
   cluster when not sampled; with groups, every client of a group follows its group. Every
   round's decision goes to `clusters/round_XXXX.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from src.algorithms.adapters import ModelOrAdapters, TensorDict
from src.algorithms.clustering import cluster_rows
from src.contract.means import leading_block, owner_weighted_mean
from src.contract.sharing import SharedSpec
from src.errors import ConfigError

log = logging.getLogger(__name__)

CLUSTER_DEFAULTS = {"enabled": False, "k": None, "min_k": 2, "max_k": 5, "mix": 0.3}


@dataclass
class Unit:
    """What the aggregator and the clustering see as one participant: a client or a group."""

    id: int
    members: list[int]  # the clients that follow this unit's cluster
    tensors: TensorDict
    weight: float


class FedSAFLoRA(ModelOrAdapters):
    privacy = True

    def __init__(
        self,
        name: str,
        lora: dict,
        trainable: Sequence[str] = ("head",),
        client_ranks: int | Sequence[int] | None = None,
        private: Sequence[str] | None = None,
        groups: str = "none",
        cluster: dict | None = None,
        local_buffers: bool = False,
        weighting: str = "samples",
    ):
        if private is None:  # B and every other trained tensor (the ViT's head) stay personal
            private = ["lora_B", *trainable]
        super().__init__(name, lora, trainable, client_ranks, private, local_buffers, weighting)
        if not self.private:
            raise ConfigError("alg.private must keep something on the clients (e.g. [lora_B])")
        if any("lora_A" in p for p in self.private):
            raise ConfigError(f"alg.private={self.private}: fedsa-flora shares lora_A; keep it out")
        if groups not in ("none", "natural"):
            raise ConfigError(f"alg.groups must be one of none, natural; got {groups!r}")
        self.groups = groups
        self.cluster = _cluster_config(cluster)
        self.client_groups: list[int] | None = None  # group of each client (groups=natural)
        self.output_dir: Path | None = None
        self.seed = 0
        self.client_cluster: dict[int, int] = {}  # client -> id of the cluster it follows
        self.cluster_means: dict[int, TensorDict] = {}  # cluster id -> owner-weighted mean
        self.next_cluster_id = 0
        self.last_k: int | None = None

    # ------------------------------------------------------------------ set-up
    def configure(self, federation, output_dir, seed: int) -> None:
        if self.groups == "natural":
            if federation.groups is None:
                raise ConfigError(
                    "alg.groups=natural needs a grouping of the clients: for image data set "
                    "partitioner.groups=G"
                )
            self.client_groups = list(federation.groups)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.seed = seed

    def shared_spec(self, model: nn.Module, clients_per_round: int) -> SharedSpec:
        spec = super().shared_spec(model, clients_per_round)
        if self.client_groups is not None:
            # the rule sees one upload per group that has a sampled client: at most G of them
            groups = len(set(self.client_groups))
            self.spec = spec = dataclasses.replace(
                spec,
                uploads_per_round=min(groups, clients_per_round),
                upload_unit="group",
                options=f"{spec.options} alg.groups=natural ({groups} groups)",
            )
        if self.cluster["enabled"] and spec.uploads_per_round < 2:
            raise ConfigError(
                f"alg.cluster.enabled=true but the server sees {spec.uploads_per_round} "
                f"{spec.upload_unit} a round: nothing to cluster; use fl.clients_per_round >= 2"
            )
        if self.cluster["enabled"] and self.clusters_needed > spec.uploads_per_round:
            key = "k" if self.cluster["k"] is not None else "max_k"
            source = (
                "the groups of alg.groups=natural" if self.client_groups else "fl.clients_per_round"
            )
            raise ConfigError(
                f"alg.cluster.{key}={self.clusters_needed} but k-means sees at most "
                f"{spec.uploads_per_round} {spec.upload_unit}s a round ({source}); "
                f"use alg.cluster.{key} <= {spec.uploads_per_round}"
            )
        return spec

    @property
    def clusters_needed(self) -> int:
        """The uploads k-means needs in a round: k, or max_k for the elbow over [min_k, max_k]."""
        k = self.cluster["k"]
        return int(k) if k is not None else int(self.cluster["max_k"])

    @property
    def streams_uploads(self) -> bool:
        return self.client_groups is None and not self.cluster["enabled"]

    # ------------------------------------------------------------------ server half
    def server_payload(self, server, client_id: int | None) -> TensorDict:
        cluster_id = None if client_id is None else self.client_cluster.get(client_id)
        if cluster_id is None:
            return super().server_payload(server, client_id)
        mix, mean = self.cluster["mix"], self.cluster_means[cluster_id]
        return self.spec.views(
            {name: (1 - mix) * mean[name] + mix * g for name, g in server.state.items()},
            client_id,
        )

    def server_begin(self, server, round_idx: int) -> None:
        self.round_idx = round_idx
        self.last_k = None
        self._uploads: list[tuple[int, TensorDict, float]] = []
        if self.streams_uploads:
            server.aggregator.begin(round_idx)

    def server_add(self, server, upload: TensorDict, weight: float, client_id: int) -> None:
        if self.streams_uploads:
            return server.aggregator.add(upload, weight, client_id)
        # uploads are views of the resident model: copy before the next client overwrites it
        self._uploads.append(
            (client_id, {n: t.detach().clone() for n, t in upload.items()}, weight)
        )

    def server_finish(self, server) -> None:
        if self.streams_uploads:
            return server.step()
        if not self._uploads:
            return
        units = self._units(server.state)
        server.aggregator.begin(self.round_idx)
        for unit in units:
            server.aggregator.add(unit.tensors, unit.weight, unit.id)
        server.step()
        if self.cluster["enabled"] and len(units) >= max(2, self.clusters_needed):
            self._cluster(units, server.state)
        elif self.cluster["enabled"]:  # clients dropped out this round (fault injection)
            log.warning(
                "round %d: %d %ss uploaded, k-means needs %d (alg.cluster): no clustering this "
                "round; every client keeps the cluster it follows",
                self.round_idx + 1, len(units), self.spec.upload_unit, self.clusters_needed,
            )  # fmt: skip
        self._uploads = []

    def server_metrics(self) -> dict[str, float]:
        return {} if self.last_k is None else {"clusters/k": self.last_k}

    def _units(self, glob: TensorDict) -> list[Unit]:
        if self.client_groups is None:
            return [Unit(cid, [cid], tensors, w) for cid, tensors, w in self._uploads]
        units = []
        for group in sorted({self.client_groups[cid] for cid, _, _ in self._uploads}):
            sampled = [(t, w) for cid, t, w in self._uploads if self.client_groups[cid] == group]
            tensors = [t for t, _ in sampled]
            mean = owner_weighted_mean(tensors, [w for _, w in sampled], glob)
            # the group holds the largest block any member sent (e.g. its largest rank)
            held = {
                name: mean[name][leading_block(max((t[name].shape for t in tensors), key=_size))]
                for name in mean
            }
            members = [cid for cid, g in enumerate(self.client_groups) if g == group]
            units.append(Unit(group, members, held, sum(w for _, w in sampled)))
        return units

    def _cluster(self, units: list[Unit], glob: TensorDict) -> None:
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
            "unit": "client" if self.client_groups is None else "group",
            "k": found.k,
            "inertia": {str(k): v for k, v in found.inertia.items()},
            "units": [u.id for u in units],
            "assignment": dict(zip((str(u.id) for u in units), found.labels, strict=True)),
            "members": {str(u.id): u.members for u in units},
            "similarity": found.similarity,
        }
        (folder / f"round_{self.round_idx + 1:04d}.json").write_text(json.dumps(record, indent=1))

    def server_state_dict(self) -> dict:
        return {
            "client_cluster": dict(self.client_cluster),
            "cluster_means": self.cluster_means,
            "next_cluster_id": self.next_cluster_id,
        }

    def load_server_state_dict(self, state: dict) -> None:
        self.client_cluster = {int(k): v for k, v in state.get("client_cluster", {}).items()}
        self.cluster_means = state.get("cluster_means", {})
        self.next_cluster_id = state.get("next_cluster_id", 0)


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


def _cluster_config(cluster: dict | None) -> dict:
    config = CLUSTER_DEFAULTS | dict(cluster or {})
    unknown = set(config) - set(CLUSTER_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown alg.cluster option(s) {sorted(unknown)}")
    if not 0.0 <= config["mix"] <= 1.0:
        raise ConfigError(f"alg.cluster.mix must be in [0, 1], got {config['mix']}")
    if config["k"] is not None and int(config["k"]) < 1:
        raise ConfigError(f"alg.cluster.k must be >= 1 or null (elbow), got {config['k']}")
    if not 1 <= int(config["min_k"]) <= int(config["max_k"]):
        raise ConfigError(
            f"alg.cluster needs 1 <= min_k <= max_k, got min_k={config['min_k']}, "
            f"max_k={config['max_k']}"
        )
    return config
