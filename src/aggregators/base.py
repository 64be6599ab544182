"""The server half of a round: combine the clients' uploads into the next global state.

An aggregator sees the uploads one at a time (`add`), so a mean needs memory for one running sum,
not for every upload; robust aggregators that need all uploads at once keep them themselves.
"""

from __future__ import annotations

import torch

TensorDict = dict[str, torch.Tensor]


class Aggregator:
    """Base class: `begin` a round, `add` each client's upload, `finish` to get the new state.

    `finish` applies the server step  theta <- theta + server_lr * (aggregate - theta);
    server_lr = 1 returns the aggregate itself.
    """

    def __init__(self, name: str, server_lr: float = 1.0):
        if server_lr <= 0:
            raise ValueError(f"aggregator.server_lr must be > 0, got {server_lr}")
        self.name = name
        self.server_lr = server_lr
        self.num_added = 0

    def begin(self, global_state: TensorDict) -> None:
        self.num_added = 0
        self._begin(global_state)

    def add(self, upload: TensorDict, weight: float) -> None:
        self.num_added += 1
        self._add(upload, weight)

    def finish(self, global_state: TensorDict) -> TensorDict:
        """The new global state; the old one if no client contributed this round."""
        if self.num_added == 0:
            return global_state
        aggregate = self._result()
        if self.server_lr == 1.0:
            return aggregate
        return {
            name: old + self.server_lr * (aggregate[name] - old)
            for name, old in global_state.items()
        }

    # subclasses implement these three
    def _begin(self, global_state: TensorDict) -> None:
        raise NotImplementedError

    def _add(self, upload: TensorDict, weight: float) -> None:
        raise NotImplementedError

    def _result(self) -> TensorDict:
        raise NotImplementedError
