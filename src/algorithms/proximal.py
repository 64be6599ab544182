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
def add_proximal(grads: TensorDict, params: TensorDict, anchor: TensorDict, coef: float) -> None:
    """grads[n] += coef (params[n] - anchor[n]) for every gradient whose name `anchor` has (also
    for tensors stacked along a client dimension)."""
    if coef == 0:
        return
    for name, grad in grads.items():
        if name in anchor:
            grad.add_(params[name] - anchor[name], alpha=coef)


def add_proximal_gradient(model: nn.Module, anchor: TensorDict, coef: float) -> None:
    """The proximal gradient on the model's own parameters (those with a gradient)."""
    params = {n: p for n, p in model.named_parameters() if p.grad is not None}
    grads = {n: p.grad for n, p in params.items()}
    add_proximal(grads, {n: p.detach() for n, p in params.items()}, anchor, coef)
