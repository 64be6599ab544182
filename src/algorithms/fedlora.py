"""fedlora (federated LoRA, as FedIT, Zhang et al. 2024): the backbone is frozen; peft LoRA
adapters and the head are trained and shared, averaged by the aggregator (plain FedAvg of the
factors, or a rule that aggregates their products). Mixed client ranks: src/algorithms/adapters.py.
FFA-LoRA: the same with every A frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from src.algorithms.adapters import ModelOrAdapters
from src.errors import ConfigError


class FedLoRA(ModelOrAdapters):
    privacy = True

    def __init__(
        self,
        name: str,
        lora: dict | None,
        trainable: Sequence[str] = ("head",),
        client_ranks: int | Sequence[int] | None = None,
        local_buffers: bool = False,
        weighting: str = "samples",
    ):
        if not lora:
            raise ConfigError(
                f"alg.lora must give the adapters' r, alpha, dropout and target_modules, got "
                f"{lora}: alg={name} trains LoRA adapters (alg=fedavg trains the whole model)"
            )
        super().__init__(name, lora, trainable, client_ranks, (), local_buffers, weighting)


class FFALoRA(FedLoRA):
    """FFA-LoRA (Sun et al., 2024): every A is frozen at its initialisation, which is identical on
    all clients (it comes from the shared model seed); only B and the head are trained and shared.
    Then dW = s (sum_k p_k B_k) A, so averaging B is exact. Equal ranks only."""

    privacy = False

    def prepare_model(self, model: nn.Module) -> nn.Module:
        self.require_equal_ranks("averaging B is exact only over one shared A")
        model = super().prepare_model(model)
        params = dict(model.named_parameters())
        for pair in self.pairs:
            params[pair.a].requires_grad_(False)
        return model
