"""Algorithms: what is trained, what crosses the network, and how a client trains.

An algorithm is a small object with the client half of federated learning: it prepares the model
(`prepare_model`), loads what the server sends into the one resident model (`download`), trains
(`local_update`) and says what the client sends back (`upload`). The orchestrator does the
plumbing (sampling, seeding, the loop) and the aggregator the server half.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from src.errors import ConfigError
from src.federated.objective import mean_loss

Batch = tuple[torch.Tensor, torch.Tensor]
TensorDict = dict[str, torch.Tensor]


class Algorithm:
    """`private`: name patterns (substrings) of trained tensors that never leave the client; they
    persist per client across rounds (the client state store) and make the algorithm personalised:
    each client deploys (shared tensors from the server, its own private tensors)."""

    local_steps: int | None = (
        None  # a fixed number of local batches per round (else fl.local_epochs)
    )

    def __init__(self, name: str, private: Sequence[str] = ()):
        self.name = name
        if isinstance(private, str):
            raise ConfigError(f"alg.private must be a list of name patterns, got {private!r}")
        self.private = list(private)

    @property
    def personalized(self) -> bool:
        """True: each client deploys its own model, so evaluation runs client by client."""
        return bool(self.private)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Freeze / wrap the freshly built model; returns the model the federation trains."""
        self.check_private(model)
        return model

    def check_private(self, model: nn.Module) -> None:
        """Every `alg.private` pattern names some trained tensor, and something is left to share."""
        trained = self.trained_names(model)
        for pattern in self.private:
            if not any(pattern in name for name in trained):
                raise ConfigError(
                    f"alg.private: '{pattern}' matches no trained parameter; trained are e.g. "
                    f"{trained[:4]}"
                )
        if not self.shared_names(model):
            raise ConfigError(f"alg.private={self.private} leaves nothing to share with the server")

    def trained_names(self, model: nn.Module) -> list[str]:
        return [name for name, p in model.named_parameters() if p.requires_grad]

    def is_private(self, name: str) -> bool:
        return any(pattern in name for pattern in self.private)

    def shared_names(self, model: nn.Module) -> list[str]:
        """Names of the parameters the server broadcasts and the clients upload."""
        return [name for name in self.trained_names(model) if not self.is_private(name)]

    def private_names(self, model: nn.Module) -> list[str]:
        """Names of the trained parameters each client keeps to itself."""
        return [name for name in self.trained_names(model) if self.is_private(name)]

    def server_state(self, model: nn.Module) -> TensorDict:
        """The server's tensors at the start: copies of the shared parameters."""
        params = dict(model.named_parameters())
        return {name: params[name].detach().clone() for name in self.shared_names(model)}

    def private_state(self, model: nn.Module, client_id: int | None) -> TensorDict:
        """Views of the client's private tensors (its r_k-sized part), for the client state store."""
        params = dict(model.named_parameters())
        return {
            name: self.client_view(name, params[name].detach(), client_id)
            for name in self.private_names(model)
        }

    def client_view(self, name: str, tensor: torch.Tensor, client_id: int | None) -> torch.Tensor:
        """The part of a shared tensor that client `client_id` holds (all of it, by default)."""
        return tensor

    @torch.no_grad()
    def download(self, model: nn.Module, payload: TensorDict, client_id: int | None) -> None:
        """Copy what the server sent into the resident model, in place (`None`: the global model)."""
        params = dict(model.named_parameters())
        for name, tensor in payload.items():
            params[name].copy_(tensor)

    def wrap_aggregator(self, aggregator, federation, output_dir, seed: int):
        """The server the orchestrator talks to; an algorithm may put its own server logic
        (grouping, clustering) around the configured aggregator."""
        return aggregator

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
        """Train on the client's batches; returns (sum of per-target losses, targets seen): samples
        for images, response tokens for text."""
        model.train()
        loss_sum, seen = 0.0, 0  # become device tensors: read once per client, not per step
        for step, (inputs, targets) in enumerate(batches, start=1):
            loss, count = mean_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            backward(loss)
            self.adjust_gradients(model)
            optimizer.step()
            self.after_step(model, step)
            loss_sum = loss_sum + loss.detach() * count
            seen = seen + count
        return float(loss_sum), int(seen)

    def adjust_gradients(self, model: nn.Module) -> None:
        """Hook between backward and the optimizer step (e.g. a regulariser's gradient)."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Hook after optimizer step number `step` (1-based) of the client's round."""
