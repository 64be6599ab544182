"""The run's model from its config, before any algorithm touches it."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn


def build_base_model(cfg: DictConfig) -> nn.Module:
    """The model before the algorithm touches it (no LoRA), initialised from `seed` alone, so it
    can be rebuilt later, e.g. as the base for exported adapters (src/export.py)."""
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    spec.pop("lora", None)  # the model's LoRA defaults, read by the LoRA algorithms' configs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return instantiate(spec)
