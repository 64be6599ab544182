"""The server optimiser (Reddi et al., "Adaptive Federated Optimization", 2021).

The server treats delta = aggregate - theta as a pseudo-gradient step and applies
  sgd:  theta <- theta + lr * m,  m = momentum * m + delta   (momentum 0: plain; > 0: FedAvgM)
  adam: theta <- theta + lr * m / (sqrt(v) + eps),  m = b1 m + (1-b1) delta,  v = b2 v + (1-b2) delta^2
        (FedAdam, without bias correction, eps = tau).
lr = 1 with sgd and no momentum makes theta the aggregate itself (copied exactly).
"""

from __future__ import annotations

import torch

from src.errors import ConfigError

TensorDict = dict[str, torch.Tensor]


class ServerOptimizer:
    def __init__(
        self,
        lr: float = 1.0,
        momentum: float = 0.0,
        opt: str = "sgd",
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
    ):
        if lr <= 0:
            raise ConfigError(f"aggregator.server_lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"aggregator.server_momentum must be in [0, 1), got {momentum}")
        if opt not in ("sgd", "adam"):
            raise ConfigError(f"aggregator.server_opt must be one of sgd, adam; got {opt}")
        self.lr, self.momentum, self.opt = lr, momentum, opt
        self.betas, self.eps = tuple(betas), eps
        self.buffers: dict[str, TensorDict] = {"m": {}, "v": {}}

    @property
    def plain(self) -> bool:
        return self.opt == "sgd" and self.lr == 1.0 and self.momentum == 0.0

    @torch.no_grad()
    def step(self, state: TensorDict, aggregate: TensorDict) -> None:
        """Move every tensor of `state` (in place) towards `aggregate`."""
        for name, theta in state.items():
            if self.plain:
                theta.copy_(aggregate[name])
                continue
            delta = aggregate[name].to(theta.dtype) - theta
            m = self.buffers["m"].setdefault(name, torch.zeros_like(theta))
            if self.opt == "sgd":
                m.mul_(self.momentum).add_(delta)
                theta.add_(m, alpha=self.lr)
            else:
                b1, b2 = self.betas
                v = self.buffers["v"].setdefault(name, torch.zeros_like(theta))
                m.mul_(b1).add_(delta, alpha=1 - b1)
                v.mul_(b2).addcmul_(delta, delta, value=1 - b2)
                theta.addcdiv_(m, v.sqrt().add_(self.eps), value=self.lr)

    def state_dict(self) -> dict:
        return {"buffers": self.buffers}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = state["buffers"]
