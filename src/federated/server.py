"""The server the orchestrator talks to: the algorithm's server rule around the configured
aggregator. Neither knows the other's attributes: the algorithm's hooks receive the aggregator
as an object with `broadcast`, `begin`, `add`, `finish` and `state`; the aggregator sees the
`SharedSpec` and tensors only."""

from __future__ import annotations

import torch
from torch import nn

from src.federated.contract import SharedSpec

TensorDict = dict[str, torch.Tensor]


class Server:
    def __init__(self, algorithm, aggregator, reporters=()):
        self.algorithm, self.aggregator = algorithm, aggregator
        # more per-round metrics, from objects with `round_metrics()` (privacy=dp_fedavg's epsilon)
        self.reporters = list(reporters)

    @property
    def ready(self) -> bool:
        return self.aggregator.state is not None

    def setup(self, model: nn.Module, spec: SharedSpec) -> None:
        self.spec = spec
        self.aggregator.setup(
            spec, self.algorithm.server_state(model), self.algorithm.base_weights(model)
        )

    @property
    def state(self) -> TensorDict:
        return self.aggregator.state

    @property
    def sums_uploads(self) -> bool:
        """Uploads are folded into sums, which DDP ranks combine with `all_reduce`."""
        return self.aggregator.sums_uploads and self.algorithm.streams_uploads

    def payload(self, client_id: int | None) -> TensorDict:
        """What client `client_id` receives (None: the global model, for evaluation)."""
        return self.algorithm.server_payload(self.aggregator, client_id)

    def download_bytes(self, client_id: int, payload: TensorDict) -> int:
        return self.aggregator.download_bytes(client_id, payload)

    def begin(self, round_idx: int) -> None:
        self.algorithm.server_begin(self.aggregator, round_idx)

    def add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        self.algorithm.server_add(self.aggregator, upload, weight, client_id)

    def all_reduce(self, ranks) -> None:
        self.aggregator.all_reduce(ranks)

    def finish(self) -> None:
        self.algorithm.server_finish(self.aggregator)

    def round_metrics(self) -> dict[str, float]:
        metrics = self.aggregator.round_metrics() | self.algorithm.server_metrics()
        for reporter in self.reporters:
            metrics |= reporter.round_metrics()
        return metrics

    def state_dict(self) -> dict:
        return {
            "aggregator": self.aggregator.state_dict(),
            "algorithm": self.algorithm.server_state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.aggregator.load_state_dict(state["aggregator"])
        self.algorithm.load_server_state_dict(state.get("algorithm", {}))
