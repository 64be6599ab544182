"""FedAvg: every parameter is trained locally and shared (McMahan et al., 2017)."""

from __future__ import annotations

from torch import nn

from src.algorithms.base import Algorithm


class FedAvg(Algorithm):
    def prepare_model(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return super().prepare_model(model)
