"""Federated LoRA: the backbone is frozen; peft LoRA adapters and the head are trained and shared.

Only the trainable tensors (lora_A, lora_B, head) cross the network; the frozen backbone never does.

Heterogeneous ranks (`client_ranks`): the resident model carries one peft adapter of rank
r_max = max(client_ranks). A client of rank r_k uses the first r_k rows of every A and the first
r_k columns of every B; the rest is held at exactly zero (its gradient is exactly zero, so any
optimizer leaves it at zero) and is neither uploaded nor received. Each client's scale is
s_k = alpha / r_k (peft's convention, set per client), so its update is dW_k = s_k B_k A_k,
of rank <= r_k. The global model (evaluation) uses r_max and s = alpha / r_max.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from src.algorithms.base import Algorithm, TensorDict
from src.errors import ConfigError


@dataclass(frozen=True)
class LoraPair:
    """One adapted layer: parameter names of its factors and its frozen base weight."""

    layer: str  # module name, e.g. blocks.0.attn.proj
    a: str  # lora_A weight  [r_max, d_in]
    b: str  # lora_B weight  [d_out, r_max]
    base: str  # frozen base weight [d_out, d_in]


class FedLoRA(Algorithm):
    def __init__(
        self,
        name: str,
        lora: dict,
        trainable: Sequence[str] = ("head",),
        client_ranks: int | Sequence[int] | None = None,
        private: Sequence[str] = (),
    ):
        super().__init__(name, private)
        self.lora = dict(lora)
        self.trainable = list(trainable)
        ranks = self.lora["r"] if client_ranks is None else client_ranks
        self.ranks = [int(ranks)] if isinstance(ranks, int | float) else [int(r) for r in ranks]
        if not self.ranks or min(self.ranks) < 1:
            raise ConfigError(f"alg.client_ranks must be positive integers, got {client_ranks}")
        self.alpha = float(self.lora["alpha"])
        self.r_max = max(self.ranks)
        self.pairs: list[LoraPair] = []
        self._layers: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ ranks
    def client_rank(self, client_id: int | None) -> int:
        """r_k: `alg.client_ranks` cycled over client ids; the global model uses r_max."""
        return self.r_max if client_id is None else self.ranks[client_id % len(self.ranks)]

    def scale(self, rank: int) -> float:
        return self.alpha / rank

    @property
    def heterogeneous(self) -> bool:
        return len(set(self.ranks)) > 1

    def client_view(self, name: str, tensor: torch.Tensor, client_id: int | None) -> torch.Tensor:
        """The r_k-sized part of a shared tensor: rows of an A, columns of a B, else the tensor."""
        return self._slice(name, tensor, self.client_rank(client_id))

    def _slice(self, name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        if name in self._a_names:
            return tensor[:rank]
        if name in self._b_names:
            return tensor[:, :rank]
        return tensor

    # ------------------------------------------------------------------ model
    def prepare_model(self, model: nn.Module) -> nn.Module:
        from src.models.lora import add_lora

        model = add_lora(
            model,
            r=self.r_max,
            alpha=self.alpha,
            dropout=self.lora.get("dropout", 0.0),
            target_modules=list(self.lora["target_modules"]),
            trainable=self.trainable,
        )
        self._layers = {
            n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A
        }
        self.pairs = [
            LoraPair(
                n,
                f"{n}.lora_A.default.weight",
                f"{n}.lora_B.default.weight",
                f"{n}.base_layer.weight",
            )
            for n in self._layers
        ]
        self._a_names = {p.a for p in self.pairs}
        self._b_names = {p.b for p in self.pairs}
        self.check_private(model)
        shared = set(self.shared_names(model))
        # the server sees whole products B A (mean must then refuse mixed ranks; stack/svd work)
        self.shares_products = all(p.a in shared and p.b in shared for p in self.pairs)
        return model

    @torch.no_grad()
    def download(self, model: nn.Module, payload: TensorDict, client_id: int | None) -> None:
        """Load r_k-sized factors (zero beyond r_k) and set s_k = alpha / r_k on every layer.

        A layer that receives neither factor starts from a fresh local init (kaiming A, zero B),
        as FLoRA does after merging the aggregate into the base weights; a frozen A (FFA-LoRA)
        is never re-initialised. A B that is not received starts at zero.
        """
        rank = self.client_rank(client_id)
        params = dict(model.named_parameters())
        for pair in self.pairs:
            self._layers[pair.layer].scaling["default"] = self.scale(rank)
            A, B = params[pair.a], params[pair.b]
            if pair.a in payload:
                A.zero_()
                A[:rank].copy_(payload[pair.a][:rank])
            elif A.requires_grad and pair.b not in payload:
                torch.nn.init.kaiming_uniform_(A, a=5**0.5)  # peft's LoRA init
                A[rank:].zero_()
            B.zero_()
            if pair.b in payload:
                B[:, :rank].copy_(payload[pair.b][:, :rank])
        for name, tensor in payload.items():
            if name not in self._a_names and name not in self._b_names:
                params[name].copy_(tensor)

    def upload(self, model: nn.Module, client_id: int) -> TensorDict:
        """Exactly the r_k-sized factors and the head."""
        return {
            name: self.client_view(name, t, client_id)
            for name, t in super().upload(model, client_id).items()
        }


class FFALoRA(FedLoRA):
    """FFA-LoRA (Sun et al., 2024): every A is frozen at its initialisation, which is identical on
    all clients (it comes from the shared model seed); only B and the head are trained and shared.
    Then dW = s (sum_k p_k B_k) A, so averaging B is exact. Equal ranks only."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.heterogeneous:
            raise ConfigError(f"alg=ffa-lora needs equal ranks, got alg.client_ranks={self.ranks}")
        model = super().prepare_model(model)
        params = dict(model.named_parameters())
        for pair in self.pairs:
            params[pair.a].requires_grad_(False)
        self.shares_products = False  # A never moves: the server sees B only
        return model
