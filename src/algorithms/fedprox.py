"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Each client minimises its loss plus a proximal term that keeps it near the model it received:
    h_k(w) = F_k(w) + (mu / 2) ||w - w_t||^2,   so   grad h_k = grad F_k + mu (w - w_t),
which `adjust_gradients` adds before every optimizer step (the reference code, litian96/FedProx,
does the same inside its PerturbedGradientDescent optimizer; with optim=sgd and momentum 0 the
two are identical, with another optimizer it is that optimizer on h_k). The server is FedAvg's:
any aggregator. mu = 0 is FedAvg exactly. The reference's systems-heterogeneity part (clients
doing fewer epochs, "stragglers") is not simulated.

`use_lora=true`: the proximal term acts on the trained LoRA factors and head (w_t: what the
client started from), as fedlora trains them; otherwise on the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from src.algorithms.base import TensorDict
from src.algorithms.fedlora import FedLoRA
from src.errors import ConfigError


class FedProx(FedLoRA):
    def __init__(
        self,
        name: str,
        mu: float = 0.01,
        use_lora: bool = False,
        lora: dict | None = None,
        trainable: Sequence[str] = ("head",),
        client_ranks: int | Sequence[int] | None = None,
    ):
        if mu < 0:
            raise ConfigError(f"alg.mu must be >= 0, got {mu}")
        super().__init__(name, lora if use_lora else None, trainable, client_ranks)
        self.mu = float(mu)
        self.anchor: TensorDict = {}  # w_t: the running client's starting point

    @torch.no_grad()
    def download(self, model: nn.Module, payload: TensorDict, private: TensorDict, client_id):
        super().download(model, payload, private, client_id)
        params = dict(model.named_parameters())
        self.anchor = {name: params[name].detach().clone() for name in self.shared_names(model)}

    @torch.no_grad()
    def adjust_gradients(self, model: nn.Module) -> None:
        """grad += mu (w - w_t) on every shared parameter."""
        if self.mu == 0:
            return
        for name, p in model.named_parameters():
            if name in self.anchor and p.grad is not None:
                p.grad.add_(p.detach() - self.anchor[name], alpha=self.mu)
