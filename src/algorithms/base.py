"""Algorithms: what is trained, what crosses the network, and how a client trains.

An algorithm is a small object with the client half of federated learning: it prepares the model
(`prepare_model`), loads what the server sends into the one resident model (`download`), trains
(`local_update`) and says what the client sends back (`upload`). The orchestrator does the
plumbing (sampling, seeding, the loop) and the aggregator the server half.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
TensorDict = dict[str, torch.Tensor]


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

    def client_view(self, name: str, tensor: torch.Tensor, client_id: int | None) -> torch.Tensor:
        """The part of a shared tensor that client `client_id` holds (all of it, by default)."""
        return tensor

    @torch.no_grad()
    def download(self, model: nn.Module, payload: TensorDict, client_id: int | None) -> None:
        """Copy what the server sent into the resident model, in place (`None`: the global model)."""
        params = dict(model.named_parameters())
        for name, tensor in payload.items():
            params[name].copy_(tensor)

    def upload(self, model: nn.Module, client_id: int) -> TensorDict:
        """What the client sends back: views of its shared parameters (read before the next client)."""
        params = dict(model.named_parameters())
        return {name: params[name].detach() for name in self.shared_names(model)}

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
