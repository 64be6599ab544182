"""FedAvg: every parameter is trained locally and shared (McMahan et al., 2017)."""

from __future__ import annotations

import logging

from torch import nn

from src.algorithms.base import Algorithm

log = logging.getLogger(__name__)

LARGE_MODEL = 50_000_000  # parameters; above this full fine-tuning of every client is costly


class FedAvg(Algorithm):
    privacy = True

    def prepare_model(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        size = sum(p.numel() for p in model.parameters())
        if size > LARGE_MODEL:
            megabytes = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
            log.warning(
                "alg=fedavg fine-tunes all %.0f M parameters: every sampled client receives and "
                "sends %.0f MB per round and needs optimizer state for all of them; alg=fedlora "
                "or fedsa-flora train and send only LoRA adapters",
                size / 1e6,
                megabytes,
            )
        return super().prepare_model(model)
