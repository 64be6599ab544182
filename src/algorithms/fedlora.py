"""Federated LoRA: the backbone is frozen; peft LoRA adapters and the head are trained and shared.

Only the trainable tensors (lora_A, lora_B, head) are broadcast and uploaded; the frozen backbone
never crosses the network.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from src.algorithms.base import Algorithm
from src.models.lora import add_lora


class FedLoRA(Algorithm):
    def __init__(self, name: str, lora: dict, trainable: Sequence[str] = ("head",)):
        super().__init__(name)
        self.lora = dict(lora)
        self.trainable = list(trainable)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return add_lora(
            model,
            r=self.lora["r"],
            alpha=self.lora["alpha"],
            dropout=self.lora.get("dropout", 0.0),
            target_modules=list(self.lora["target_modules"]),
            trainable=self.trainable,
        )
