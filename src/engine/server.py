"""The server the orchestrator talks to. A round runs one way:

    begin -> add (each upload, weighted by SharedSpec.weighting) -> finish:
    aggregate = aggregator.aggregate()              (the reduction of the uploads)
    postprocessors (e.g. privacy=dp_fedavg's noise) change the aggregate in place
    algorithm.server_update(state, aggregate, optimizer.step)   (the algorithm's server rule,
        which hands the server optimiser, server_opt, the target each tensor steps towards)
    aggregator.after_step(...)                      (e.g. FedEx-LoRA's residual)

The algorithm's hooks `server_begin` / `server_add` / `server_finish` see this server and may
regroup uploads before they reach the aggregator (fedsa-flora's groups and clusters, RoLoRA's
frozen factor); the aggregator never sees the algorithm.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from src.contract.sharing import SharedSpec
from src.engine.server_opt import ServerOptimizer

TensorDict = dict[str, torch.Tensor]


class AggregatePostprocessor(Protocol):
    """Changes the round's aggregate in place before the server step (e.g. adds DP noise)."""

    def postprocess(
        self, aggregate: TensorDict, state: TensorDict, num_uploads: int, round_idx: int
    ) -> None: ...


class Server:
    def __init__(
        self,
        algorithm,
        aggregator,
        optimizer: ServerOptimizer | None = None,
        postprocessors: list[AggregatePostprocessor] = (),
        reporters=(),
    ):
        self.algorithm, self.aggregator = algorithm, aggregator
        self.optimizer = optimizer or ServerOptimizer()
        # applied to the aggregate before the server step, in order (e.g. central DP noise)
        self.postprocessors = list(postprocessors)
        # more per-round metrics, from objects with `round_metrics()` (privacy=dp_fedavg's epsilon)
        self.reporters = list(reporters)
        self.round_idx = 0

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
        return self.algorithm.server_payload(self, client_id)

    def download_bytes(self, client_id: int, payload: TensorDict) -> int:
        return self.aggregator.download_bytes(client_id, payload)

    # ------------------------------------------------------------------ one round
    def begin(self, round_idx: int) -> None:
        self.round_idx = round_idx
        self.algorithm.server_begin(self, round_idx)

    def add(self, upload: TensorDict, samples: float, client_id: int) -> None:
        """Client `client_id`'s upload; `samples`: its train samples (n_k)."""
        weight = samples if self.spec.weighting == "samples" else 1.0
        self.algorithm.server_add(self, upload, weight, client_id)

    def all_reduce(self, ranks) -> None:
        self.aggregator.all_reduce(ranks)

    def finish(self) -> None:
        self.algorithm.server_finish(self)

    def step(self) -> None:
        """The aggregate of the uploads the aggregator has, through the postprocessors, the
        algorithm's server rule and the server optimiser; a round without uploads changes
        nothing."""
        aggregator = self.aggregator
        if not aggregator.num_added:
            return
        aggregate = aggregator.aggregate()
        for postprocessor in self.postprocessors:
            postprocessor.postprocess(
                aggregate, aggregator.state, aggregator.num_added, self.round_idx
            )
        self.algorithm.server_update(aggregator.state, aggregate, self.optimizer.step)
        aggregator.after_step(aggregate, self.optimizer.lr)

    def round_metrics(self) -> dict[str, float]:
        metrics = self.aggregator.round_metrics() | self.algorithm.server_metrics()
        for reporter in self.reporters:
            metrics |= reporter.round_metrics()
        return metrics

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "aggregator": self.aggregator.state_dict(),
            "server_opt": self.optimizer.state_dict(),
            "algorithm": self.algorithm.server_state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        aggregator = dict(state["aggregator"])
        # checkpoints before the server optimiser was the server's kept it in the aggregator's
        self.optimizer.load_state_dict(state.get("server_opt") or aggregator.pop("server"))
        self.aggregator.load_state_dict(aggregator)
        self.algorithm.load_server_state_dict(state.get("algorithm", {}))
