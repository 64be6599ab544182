"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Each client minimises its loss plus a proximal term that keeps it near the model it received:
    h_k(w) = F_k(w) + (mu / 2) ||w - w_t||^2,   so   grad h_k = grad F_k + mu (w - w_t),
which `adjust_gradients` adds before every optimizer step (the reference code, litian96/FedProx,
does the same inside its PerturbedGradientDescent optimizer; with optim=sgd and momentum 0 the
two are identical, with another optimizer it is that optimizer on h_k). The server is FedAvg's:
any aggregator. mu = 0 is FedAvg exactly. The reference's systems-heterogeneity part (clients
doing fewer epochs, "stragglers") is not simulated. mu has no reference default (the reference
README says to tune it in {0.001, 0.01, 0.1, 0.5, 1}); 0.01 is the middle of that range.

`use_lora=true`: the proximal term acts on the trained LoRA factors and head (w_t: what the
client started from), as fedlora trains them; otherwise on the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from src.algorithms.adapters import ModelOrAdapters
from src.algorithms.base import TensorDict
from src.algorithms.proximal import add_proximal, snapshot
from src.errors import ConfigError


class FedProx(ModelOrAdapters):
    privacy = False

    def __init__(
        self,
        name: str,
        mu: float = 0.01,
        use_lora: bool = False,
        lora: dict | None = None,
        trainable: Sequence[str] = ("head",),
        client_ranks: int | Sequence[int] | None = None,
        local_buffers: bool = False,
        weighting: str = "samples",
    ):
        if mu < 0:
            raise ConfigError(f"alg.mu must be >= 0, got {mu}")
        lora = lora if use_lora else None
        super().__init__(name, lora, trainable, client_ranks, (), local_buffers, weighting)
        self.mu = float(mu)

    def download(self, model: nn.Module, received: TensorDict, private: TensorDict, client_id):
        """work: w_t, what the client starts from (its shared tensors as loaded)."""
        state = super().download(model, received, private, client_id)
        state.work = snapshot(model, self.shared_names(model))
        return state

    def adjust_gradients(self, params: TensorDict, work: TensorDict) -> None:
        """grad += mu (w - w_t) on every shared parameter."""
        add_proximal(params, work, self.mu)
