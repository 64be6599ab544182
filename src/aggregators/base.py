"""The server half of a round: hold the global state, send it, combine the uploads, step.

An aggregator is a small object with one job (like a Flower strategy). It keeps the server's
tensors (`state`), decides what each client receives (`broadcast`), sees the uploads one at a time
(`add`, so a mean needs one running sum, not every upload) and turns them into the next state
(`finish`: the aggregate, then the server optimiser step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from src.aggregators.server_opt import ServerOptimizer

TensorDict = dict[str, torch.Tensor]


def nbytes(tensors: TensorDict) -> int:
    """Bytes on the wire for a dict of tensors (numel x element size)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Aggregator:
    # True: a round's uploads are folded into sums, which DDP ranks combine with `all_reduce`;
    # otherwise every rank is given every upload (DESIGN §3.6, src/federated/distributed.py)
    sums_uploads = False
    output_dir = None  # where an aggregator writes its extras (rank 0's only)
    checkpointed: tuple[str, ...] = ()  # attributes kept in checkpoints besides state and server

    def __init__(
        self,
        name: str,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_opt: str = "sgd",
        server_betas: tuple[float, float] = (0.9, 0.99),
        server_eps: float = 1e-3,
    ):
        self.name = name
        self.server = ServerOptimizer(
            server_lr, server_momentum, server_opt, server_betas, server_eps
        )
        self.state: TensorDict | None = None
        self.num_added = 0

    # ------------------------------------------------------------------ set-up and sending
    def setup(self, model: nn.Module, algorithm) -> None:
        """Build the initial server state from the freshly prepared model."""
        self.algorithm = algorithm
        self.state = algorithm.server_state(model)

    def broadcast(self, client_id: int) -> TensorDict:
        """What client `client_id` receives at the start of a round (each tensor as sent)."""
        return {
            name: self.algorithm.client_view(name, t, client_id) for name, t in self.state.items()
        }

    def download_bytes(self, client_id: int, payload: TensorDict) -> int:
        """Bytes actually sent to the client (by default: the payload)."""
        return nbytes(payload)

    @contextmanager
    def global_model(self, model: nn.Module) -> Iterator[None]:
        """Load the global model into the resident model (for evaluation)."""
        self.algorithm.download(model, self.state, None)
        yield

    # ------------------------------------------------------------------ aggregation
    def begin(self, round_idx: int = 0) -> None:
        """A new round (0-based `round_idx`) starts; uploads follow through `add`."""
        self.num_added = 0
        self.round_idx = round_idx
        self._begin()

    def add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        self.num_added += 1
        self._add(upload, weight, client_id)

    def finish(self) -> None:
        """Aggregate and take the server step; a round without uploads leaves the state as it was."""
        if self.num_added:
            aggregate = self._result()
            self.server.step(self.state, aggregate)
            self._after_step(aggregate)

    def all_reduce(self, ranks) -> None:
        """Under DDP, between the last `add` and `finish`: sum the ranks' partial sums in place
        (aggregators with `sums_uploads` only)."""
        raise NotImplementedError

    def round_metrics(self) -> dict[str, float]:
        """Extra per-round metrics for the loggers (e.g. the number of clusters)."""
        return {}

    def _after_step(self, aggregate: TensorDict) -> None:
        """Hook for what follows the server step (e.g. folding a residual into the base weights)."""

    def _begin(self) -> None:
        raise NotImplementedError

    def _add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        raise NotImplementedError

    def _result(self) -> TensorDict:
        """The aggregate, with the same names and shapes as `state`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        extra = {name: getattr(self, name) for name in self.checkpointed}
        return {"state": self.state, "server": self.server.state_dict(), **extra}

    def load_state_dict(self, state: dict) -> None:
        self.state = state["state"]
        self.server.load_state_dict(state["server"])
        for name in self.checkpointed:
            setattr(self, name, state[name])
