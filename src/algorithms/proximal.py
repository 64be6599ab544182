"""The proximal term (coef / 2) ||w - w_anchor||^2 that FedProx and Ditto add to a client's loss,
applied as its gradient coef (w - w_anchor) between backward and the optimizer step."""

from __future__ import annotations

import torch
from torch import nn

from src.algorithms.base import Algorithm, TensorDict


@torch.no_grad()
def snapshot(model: nn.Module, names: list[str]) -> TensorDict:
    """Copies of the named parameters (and buffers) as they are now."""
    tensors = Algorithm.tensors(model)
    return {name: tensors[name].detach().clone() for name in names}


@torch.no_grad()
def add_proximal(params: TensorDict, anchor: TensorDict, coef: float) -> None:
    """grad += coef (w - w_anchor) for every parameter with a gradient whose name `anchor` has
    (also for tensors stacked along a client dimension)."""
    if coef == 0:
        return
    for name, param in params.items():
        if param.grad is not None and name in anchor:
            param.grad.add_(param.detach() - anchor[name], alpha=coef)
