"""The base of the algorithms that train either the whole model or LoRA adapters (`ModelOrAdapters`).

`lora: null`: every parameter is trained and shared (fedprox, scaffold, ditto, feddyn without
`use_lora`). With `lora` {r, alpha, dropout, target_modules}: the backbone is frozen; peft LoRA
adapters and the `trainable` modules (the head) are trained and shared, and the frozen backbone
never crosses the network.

Heterogeneous ranks (`client_ranks`): the resident model carries one peft adapter of rank
r_max = max(client_ranks). A client of rank r_k uses the first r_k rows of every A and the first
r_k columns of every B; the rest is held at exactly zero (its gradient is exactly zero, so any
optimizer leaves it at zero) and is neither uploaded nor received. Each client's scale is
s_k = alpha / r_k (peft's convention, set per client), so its update is dW_k = s_k B_k A_k,
of rank <= r_k. The global model (evaluation) uses r_max and s = alpha / r_max.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from src.algorithms.base import Algorithm, TensorDict
from src.contract.sharing import LoraLayer, LoraRanks, Role, SharedSpec
from src.errors import ConfigError


class ModelOrAdapters(Algorithm):
    """The whole model (`lora` None) or LoRA adapters at per-client ranks, and the head."""

    def __init__(
        self,
        name: str,
        lora: dict | None,
        trainable: Sequence[str] = ("head",),
        client_ranks: int | Sequence[int] | None = None,
        private: Sequence[str] = (),
        local_buffers: bool = False,
        weighting: str = "samples",
    ):
        super().__init__(name, private, local_buffers, weighting)
        self.lora = dict(lora) if lora else None
        self.trainable = list(trainable)
        if self.lora is None:
            if client_ranks is not None:
                raise ConfigError(
                    f"alg.client_ranks={client_ranks} needs LoRA adapters (alg.use_lora=true)"
                )
            self.lora_ranks = LoraRanks()
        else:
            given = self.lora["r"] if client_ranks is None else client_ranks
            ranks = [int(given)] if isinstance(given, int | float) else [int(r) for r in given]
            if not ranks or min(ranks) < 1:
                raise ConfigError(f"alg.client_ranks must be positive integers, got {client_ranks}")
            self.lora_ranks = LoraRanks(ranks=tuple(ranks), alpha=float(self.lora["alpha"]))
        self.pairs: list[LoraLayer] = []
        self._layers: dict[str, nn.Module] = {}
        self.spec: SharedSpec | None = None

    # ------------------------------------------------------------------ ranks
    @property
    def ranks(self) -> list[int]:
        return list(self.lora_ranks.ranks)

    @property
    def r_max(self) -> int:
        return self.lora_ranks.r_max

    @property
    def heterogeneous(self) -> bool:
        return self.lora_ranks.heterogeneous

    def require_equal_ranks(self, why: str) -> None:
        """Refuse mixed client ranks, for a rule that holds only when all clients share a rank."""
        if self.heterogeneous:
            raise ConfigError(
                f"alg.client_ranks={self.ranks}: alg={self.name} needs equal ranks ({why}); "
                "use one rank"
            )

    def client_rank(self, client_id: int | None) -> int:
        """r_k: `alg.client_ranks` cycled over client ids; the global model uses r_max."""
        return self.lora_ranks.rank(client_id)

    def client_view(self, name: str, tensor: torch.Tensor, client_id: int | None) -> torch.Tensor:
        """The r_k-sized part of a tensor: rows of an A, columns of a B, else the tensor."""
        if name in self._a_names:
            return tensor[: self.client_rank(client_id)]
        if name in self._b_names:
            return tensor[:, : self.client_rank(client_id)]
        return tensor

    # ------------------------------------------------------------------ model
    def prepare_model(self, model: nn.Module) -> nn.Module:
        self._a_names: set[str] = set()
        self._b_names: set[str] = set()
        if self.lora is None:  # the whole model is trained
            for p in model.parameters():
                p.requires_grad_(True)
            self.check_private(model)
            return model
        from src.models.lora import add_lora

        model = add_lora(
            model,
            r=self.r_max,
            alpha=self.lora_ranks.alpha,
            dropout=self.lora.get("dropout", 0.0),
            target_modules=list(self.lora["target_modules"]),
            trainable=self.trainable,
        )
        self._layers = {
            n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A
        }
        self.pairs = [
            LoraLayer(
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
        return model

    def role(self, name: str) -> Role:
        if name in self._a_names:
            return Role.LORA_A
        return Role.LORA_B if name in self._b_names else Role.OTHER

    def shared_spec(self, model: nn.Module, clients_per_round: int) -> SharedSpec:
        options = f"alg={self.name}"
        if self.heterogeneous:
            options += f" alg.client_ranks={self.ranks}"
        self.spec = SharedSpec(
            roles={name: self.role(name) for name in self.shared_names(model)},
            uploads_per_round=clients_per_round,
            layers=tuple(self.pairs),
            ranks=self.lora_ranks.ranks,
            alpha=self.lora_ranks.alpha,
            personalized=self.personalized,
            weighting=self.weighting,
            options=options,
        )
        return self.spec

    def base_weights(self, model: nn.Module) -> TensorDict:
        params = dict(model.named_parameters())
        return {pair.base: params[pair.base].detach() for pair in self.pairs}

    def private_views(self, model: nn.Module, client_id: int | None) -> TensorDict:
        """Views of the client's private tensors at its own size r_k (for the client state store)."""
        return {
            name: self.client_view(name, t, client_id)
            for name, t in super().private_views(model, client_id).items()
        }

    @torch.no_grad()
    def load(self, model: nn.Module, received: TensorDict, client_id: int | None) -> None:
        """Load r_k-sized factors (zero beyond r_k) and set s_k = alpha / r_k on every layer.

        A layer that receives neither factor starts from a fresh local init (kaiming A, zero B),
        as FLoRA does after merging the aggregate into the base weights; a frozen A (FFA-LoRA)
        is never re-initialised. A B that is not received starts at zero. Base weights in the
        payload (a rule that merges products into them) are loaded as they are.
        """
        params = self.tensors(model)
        rank = self.client_rank(client_id) if self.pairs else 0
        for pair in self.pairs:
            self._layers[pair.name].scaling["default"] = self.lora_ranks.scale(rank)
            A, B = params[pair.a], params[pair.b]
            if pair.a in received:
                A.zero_()
                A[:rank].copy_(received[pair.a][:rank])
            elif A.requires_grad and pair.b not in received:
                torch.nn.init.kaiming_uniform_(A, a=5**0.5)  # peft's LoRA init
                A[rank:].zero_()
            B.zero_()
            if pair.b in received:
                B[:, :rank].copy_(received[pair.b][:, :rank])
        for name, tensor in received.items():
            if name not in self._a_names and name not in self._b_names:
                params[name].copy_(tensor)

    def shared_views(self, model: nn.Module, client_id: int | None) -> TensorDict:
        """Exactly the r_k-sized factors and the head."""
        return {
            name: self.client_view(name, t, client_id)
            for name, t in super().shared_views(model, client_id).items()
        }
