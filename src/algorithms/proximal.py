"""The proximal term (coef / 2) ||w - w_anchor||^2 that FedProx and Ditto add to a client's loss,
applied as its gradient coef (w - w_anchor) between backward and the optimizer step."""

from __future__ import annotations

import torch
from torch import nn

TensorDict = dict[str, torch.Tensor]


@torch.no_grad()
def snapshot(model: nn.Module, names: list[str]) -> TensorDict:
    """Copies of the named parameters (and buffers) as they are now."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {name: tensors[name].detach().clone() for name in names}


@torch.no_grad()
def add_proximal_gradient(model: nn.Module, anchor: TensorDict, coef: float) -> None:
    """grad += coef (w - w_anchor) on every parameter of `anchor` that has a gradient."""
    if coef == 0:
        return
    for name, p in model.named_parameters():
        if name in anchor and p.grad is not None:
            p.grad.add_(p.detach() - anchor[name], alpha=coef)
