"""fedsa-flora: FedSA-LoRA's selective sharing with FLoRA-style, rank-aware aggregation of A and
optional clustering of clients (DESIGN §5).

Clients train A and B (ranks may differ: `client_ranks`) and the head. Only the A's are uploaded;
what matches `private` (lora_B and the head by default) stays on the client across rounds, in the
client state store. The server averages A rank-aware (aggregator=mean/rank_aware: row j over the
clients that own it), then steps A <- A + server_lr (A_bar - A). A client deploys (global or
cluster A, its own B, its own head).
"""

from __future__ import annotations

from collections.abc import Sequence

from src.algorithms.fedlora import FedLoRA
from src.errors import ConfigError

CLUSTER_DEFAULTS = {"enabled": False, "k": None, "min_k": 2, "max_k": 5, "mix": 0.3}


class FedSAFLoRA(FedLoRA):
    def __init__(
        self,
        name: str,
        lora: dict,
        trainable: Sequence[str] = ("head",),
        client_ranks: int | Sequence[int] | None = None,
        private: Sequence[str] | None = None,
        server_lr: float = 1.0,
        groups: str = "none",
        cluster: dict | None = None,
        export_adapters: bool = False,
    ):
        if private is None:  # B and every other trained tensor (the ViT's head) stay personal
            private = ["lora_B", *trainable]
        super().__init__(name, lora, trainable, client_ranks, private)
        if not self.private:
            raise ConfigError("alg.private must keep something on the clients (e.g. [lora_B])")
        if any("lora_A" in p for p in self.private):
            raise ConfigError(f"alg.private={self.private}: fedsa-flora shares lora_A; keep it out")
        if groups not in ("none", "natural"):
            raise ConfigError(f"alg.groups must be one of none, natural; got {groups!r}")
        self.groups = groups
        self.server_lr = server_lr  # the aggregator's server_lr follows it (conf/aggregator/*)
        self.cluster = _cluster_config(cluster)
        self.export_adapters = bool(export_adapters)

    def wrap_aggregator(self, aggregator, federation, output_dir, seed: int):
        """Grouping and clustering around the configured aggregator, when asked for."""
        from src.aggregators.clustered import ClusteredAggregator

        groups = None
        if self.groups == "natural":
            groups = federation.groups
            if groups is None:
                raise ConfigError(
                    "alg.groups=natural needs a grouping of the clients: for image data set "
                    "partitioner.groups=G"
                )
        if groups is None and not self.cluster["enabled"]:
            return aggregator
        cluster = self.cluster if self.cluster["enabled"] else None
        return ClusteredAggregator(aggregator, groups, cluster, output_dir, seed)


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
