"""Algorithms: what is trained, what is shared, and how a client trains.

An algorithm is a small object with a client half (`prepare_model`, `local_update`) and a
description of what crosses the network (`shared_names`); the orchestrator does the plumbing
(copying tensors in place, sampling, seeding) and the aggregator the server half.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


class Algorithm:
    personalized = False  # True: each client deploys its own model (evaluated per client)

    def __init__(self, name: str):
        self.name = name

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Freeze / wrap the freshly built model; returns the model the federation trains."""
        return model

    def shared_names(self, model: nn.Module) -> list[str]:
        """Names of the parameters the server broadcasts and the clients upload."""
        return [name for name, p in model.named_parameters() if p.requires_grad]

    def local_update(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Iterable[Batch],
        backward: Callable[[torch.Tensor], None],
    ) -> tuple[float, int]:
        """Train on the client's batches; returns (sum of per-sample losses, samples seen)."""
        model.train()
        loss_sum, seen = 0.0, 0
        for images, labels in batches:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            backward(loss)
            optimizer.step()
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
        return loss_sum, seen
